"""Workspace scenarios for the published Matchlock Python SDK (matchlock==0.2.17), unchanged.

Run by crates/matchlock-cli/tests/e2e_sdk_workspace.rs with the SDK's virtualenv python:
    MATCHLOCK_BIN=<matchlock> MATCHLOCK_TEST_IMAGE=<tag> RW_DIR=<dir> RO_DIR=<dir> python sdk_workspace.py
`with_workspace` + `mount_host_dir` + `mount_host_dir_readonly`; prints one JSON line with
what the guest saw; the Rust side checks the host directories.
"""

import json
import os

from matchlock import Client, Config, Sandbox

BIN = os.environ["MATCHLOCK_BIN"]
IMAGE = os.environ["MATCHLOCK_TEST_IMAGE"]
RW = os.environ["RW_DIR"]
RO = os.environ["RO_DIR"]

result = {}
with Client(Config(binary_path=BIN)) as client:
    sandbox = (
        Sandbox(IMAGE)
        .with_workspace("/workspace")
        .mount_host_dir("/workspace/repo", RW)
        .mount_host_dir_readonly("/workspace/ref", RO)
        .mount_host_dir("/workspace/owned", RO, owner_uid=4242, owner_gid=4343)
    )
    client.launch(sandbox)
    r = client.exec(
        "cd /workspace/repo && echo direct > direct.txt && cat direct.txt && "
        "echo atomic > tmp.xyz && mv tmp.xyz renamed.txt && cat renamed.txt"
    )
    result["atomic"] = {"code": r.exit_code, "out": r.stdout, "err": r.stderr}
    r = client.exec("pwd")
    result["pwd"] = r.stdout.strip()
    r = client.exec("cat /workspace/ref/host.txt; touch /workspace/ref/new")
    result["ro"] = {"code": r.exit_code, "out": r.stdout, "err": r.stderr}
    r = client.exec("stat -c %u:%g /workspace/owned /workspace/owned/host.txt")
    result["owned"] = r.stdout
    client.write_file("/workspace/repo/from-sdk.txt", "written-by-sdk")
    result["read_back"] = client.read_file("/workspace/ref/host.txt").decode()
    result["listed"] = sorted(f.name for f in client.list_files("/workspace/repo"))
print(json.dumps(result))

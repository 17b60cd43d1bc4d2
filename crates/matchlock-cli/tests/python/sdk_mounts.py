"""Nested mounts through the published Matchlock Python SDK (matchlock==0.2.17), unchanged.

Run by crates/matchlock-cli/tests/e2e_mounts.rs with the SDK's virtualenv python:
    MATCHLOCK_BIN=<matchlock> MATCHLOCK_TEST_IMAGE=<tag> HOST_DIR=<dir> python sdk_mounts.py
The RPC `vfs` config holds `/workspace` host_fs, `/workspace/cache` memory inside it and
`/workspace/ro/deep` read-only inside that; prints one JSON line with what the guest and
the SDK's file calls saw; the Rust side checks the host directory.
"""

import json
import os

from matchlock import Client, Config, Sandbox

BIN = os.environ["MATCHLOCK_BIN"]
IMAGE = os.environ["MATCHLOCK_TEST_IMAGE"]
HOST = os.environ["HOST_DIR"]

result = {}
with Client(Config(binary_path=BIN)) as client:
    sandbox = (
        Sandbox(IMAGE)
        .with_workspace("/workspace")
        .mount_host_dir("/workspace", HOST)
        .mount_memory("/workspace/cache")
        .mount_host_dir_readonly("/workspace/cache/deep/ro", HOST)
    )
    client.launch(sandbox)
    r = client.exec(
        "echo in-memory > /workspace/cache/m.txt && cat /workspace/cache/m.txt && "
        "ls /workspace/cache | tr '\\n' ' ' && echo && "
        "cat /workspace/cache/deep/ro/host.txt && "
        "touch /workspace/cache/deep/ro/x 2>&1 | grep -c Read-only"
    )
    result["guest"] = {"code": r.exit_code, "out": r.stdout, "err": r.stderr}
    client.write_file("/workspace/cache/from-sdk.txt", "sdk-in-memory")
    result["read_back"] = client.read_file("/workspace/cache/from-sdk.txt").decode()
    client.write_file("/workspace/outer.txt", "sdk-outer")
    result["listed"] = sorted(f.name for f in client.list_files("/workspace"))
print(json.dumps(result))

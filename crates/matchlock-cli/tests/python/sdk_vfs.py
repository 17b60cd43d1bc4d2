"""VFS interception scenarios for the published Matchlock Python SDK (matchlock==0.2.17), unchanged.

Run by crates/matchlock-cli/tests/e2e_sdk_vfs.rs with the SDK's virtualenv python:
    MATCHLOCK_BIN=<matchlock> MATCHLOCK_TEST_IMAGE=<image> WORKDIR=<dir> LOWER=<dir> python sdk_vfs.py
The workspace /workspace holds a host_fs mount of WORKDIR at /workspace/host, a memory
mount at /workspace/mem and an overlay of LOWER at /workspace/ov. Prints one JSON line with what the
SDK and the guest saw; the Rust side also checks the host directory.
Scenarios follow the reference's sdk_vfs_interception tests (spec §13.2 items 142-145).
"""

import json
import os
import sys
import threading
import time

from matchlock import Client, Config, Sandbox
from matchlock.types import VFSHookRule, VFSInterceptionConfig

BIN = os.environ["MATCHLOCK_BIN"]
IMAGE = os.environ["MATCHLOCK_TEST_IMAGE"]
WORKDIR = os.environ["WORKDIR"]
LOWER = os.environ["LOWER"]
CFG = Config(binary_path=BIN)

safe_runs = []
dangerous_runs = []
lock = threading.Lock()


def safe_hook(event):
    # Writes into the workspace from inside the hook: the write's own events arrive while
    # the hook is active and must be dropped (no recursion).
    with lock:
        safe_runs.append({"op": event.op, "path": event.path, "size": event.size})
    holder["client"].exec("echo callback > /workspace/host/s/callback.log")


def dangerous_hook(client, event):
    with lock:
        dangerous_runs.append(event.path)
        n = len(dangerous_runs)
    if n == 1:
        client.exec("echo hook > /workspace/host/d/hook.log")


holder = {}


def mutate(req):
    return b"mutated-by-hook"


def main():
    rules = VFSInterceptionConfig(
        rules=[
            VFSHookRule(name="deny-create", phase="before", ops=["create"], path="/workspace/host/blocked.txt", action="block"),
            VFSHookRule(name="deny-write", phase="before", ops=["write"], path="/workspace/host/locked/*", action="block"),
            VFSHookRule(name="mutate", phase="before", ops=["write"], path="/workspace/host/mutate.txt", mutate_hook=mutate),
            VFSHookRule(name="safe", phase="after", ops=["write"], path="/workspace/host/s/*", hook=safe_hook, timeout_ms=5000),
            VFSHookRule(name="dangerous", phase="after", ops=["write"], path="/workspace/host/d/*", dangerous_hook=dangerous_hook, timeout_ms=5000),
        ]
    )
    sb = (
        Sandbox(IMAGE)
        .with_workspace("/workspace")
        .mount_host_dir("/workspace/host", WORKDIR)
        .mount_memory("/workspace/mem")
        .mount_overlay("/workspace/ov", LOWER)
        .with_vfs_interception(rules)
    )
    out = {}
    with Client(CFG) as client:
        holder["client"] = client
        client.create(sb.options())

        def run(cmd):
            r = client.exec(cmd)
            return {"code": r.exit_code, "out": r.stdout, "err": r.stderr}

        # 142: a wire block rule on create, through the SDK file API and from a guest shell.
        try:
            client.write_file("/workspace/host/blocked.txt", b"no")
            out["sdk_blocked"] = "written"
        except Exception as e:  # noqa: BLE001 - the SDK raises its own error type
            out["sdk_blocked"] = "error: " + str(e)
        client.write_file("/workspace/host/ok.txt", b"ok")
        out["shell_blocked"] = run("echo x > /workspace/host/blocked.txt; echo rc=$?")
        out["ok"] = run("cat /workspace/host/ok.txt")
        out["locked"] = run("mkdir -p /workspace/host/locked && echo a > /workspace/host/locked/f; echo rc=$?")
        # 143: SDK-local mutate hook.
        client.write_file("/workspace/host/mutate.txt", b"original")
        out["mutated"] = client.read_file("/workspace/host/mutate.txt").decode()
        # 145 then 144: after hooks driven by file events.
        run("mkdir -p /workspace/host/s /workspace/host/d && echo go > /workspace/host/s/trigger.txt")
        deadline = time.time() + 20
        while time.time() < deadline and not safe_runs:
            time.sleep(0.1)
        time.sleep(2)  # settle: late events would re-run the safe hook
        out["safe_runs"] = list(safe_runs)
        out["callback_log"] = run("cat /workspace/host/s/callback.log")
        run("echo go > /workspace/host/d/trigger.txt")
        deadline = time.time() + 20
        while time.time() < deadline and len(dangerous_runs) < 2:
            time.sleep(0.1)
        time.sleep(2)
        out["dangerous_runs"] = len(dangerous_runs)
        out["hook_log"] = run("cat /workspace/host/d/hook.log")
        # memory and overlay mounts next to the host directory.
        out["mem"] = run("echo m > /workspace/mem/a && mv /workspace/mem/a /workspace/mem/b && cat /workspace/mem/b && ls /workspace/mem")
        out["ov"] = run(
            "cat /workspace/ov/seed.txt && echo changed > /workspace/ov/seed.txt && echo new > /workspace/ov/new.txt"
            " && rm /workspace/ov/gone.txt && mv /workspace/ov/dir /workspace/ov/moved && cat /workspace/ov/seed.txt /workspace/ov/moved/inner.txt && ls /workspace/ov"
        )
        out["ls_ws"] = run("ls /workspace")
        print(json.dumps(out))
        client.close()
        client.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())

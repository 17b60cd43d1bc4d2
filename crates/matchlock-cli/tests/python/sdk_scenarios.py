"""Scenarios for the published Matchlock Python SDK (matchlock==0.2.17) against our binary.

Run by crates/matchlock-cli/tests/e2e_python_sdk.rs with the SDK's virtualenv python:
    MATCHLOCK_BIN=<matchlock> MATCHLOCK_TEST_IMAGE=<tag> python sdk_scenarios.py
Every scenario uses the SDK unchanged; failures are collected and reported, exit code 1.
"""

import io
import os
import socket
import subprocess
import sys
import threading
import time
import traceback

from matchlock import Client, Config, RPCError, Sandbox

BIN = os.environ["MATCHLOCK_BIN"]
IMAGE = os.environ["MATCHLOCK_TEST_IMAGE"]
CFG = Config(binary_path=BIN)


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def vm_status(vm_id):
    out = subprocess.run([BIN, "list"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith(vm_id):
            return line.split()[1]
    return None


def scenario_exec_files_and_remove():
    client = Client(CFG)
    client.start()
    vm_id = client.launch(Sandbox(IMAGE).with_env("PLAIN_ENV", "from-builder"))
    check(vm_id.startswith("vm-"), vm_id)
    r = client.exec("echo hello; echo oops >&2; exit 7")
    check((r.exit_code, r.stdout, r.stderr) == (7, "hello\n", "oops\n"), r)
    check(client.exec("pwd", working_dir="/tmp").stdout == "/tmp\n", "working_dir")
    check(client.exec("echo $PLAIN_ENV").stdout == "from-builder\n", "builder env")
    check(len(client.exec("seq 1 1000").stdout.splitlines()) == 1000, "large output")

    client.write_file("/workspace/test.txt", "hello file")
    check(client.read_file("/workspace/test.txt") == b"hello file", "read back")
    client.write_file("/workspace/run.sh", b"#!/bin/sh\necho script-output\n", mode=0o755)
    check(client.exec("/workspace/run.sh").stdout == "script-output\n", "mode 0755")
    blob = bytes(range(256)) * 400
    client.write_file("/workspace/blob", blob)
    check(client.read_file("/workspace/blob") == blob, "100 KB roundtrip")
    names = {f.name: f for f in client.list_files("/workspace")}
    check({"test.txt", "run.sh", "blob"} <= set(names), names)
    check(names["run.sh"].mode & 0o777 == 0o755 and not names["run.sh"].is_dir, names["run.sh"])
    try:
        client.read_file("/no/such/file")
        raise AssertionError("read of a missing file succeeded")
    except RPCError as e:
        check(e.is_file_error(), e)
    client.close()
    check(vm_status(vm_id) == "stopped", vm_status(vm_id))
    client.remove()
    check(vm_status(vm_id) is None, "removed")


def scenario_streams_and_interactive():
    with Client(CFG) as client:
        client.create(Sandbox(IMAGE).options())
        out, err = io.StringIO(), io.StringIO()
        r = client.exec_stream("for i in 1 2 3; do echo $i; done; echo e >&2", stdout=out, stderr=err)
        check(r.exit_code == 0 and out.getvalue() == "1\n2\n3\n" and err.getvalue() == "e\n", out.getvalue())

        out = io.StringIO()
        r = client.exec_pipe("tr a-z A-Z", stdin=io.BytesIO(b"hello pipe\n"), stdout=out)
        check(r.exit_code == 0 and out.getvalue() == "HELLO PIPE\n", out.getvalue())
        out = io.StringIO()
        r = client.exec_pipe("wc -c", stdin=None, stdout=out)
        check(r.exit_code == 0 and out.getvalue().strip() == "0", out.getvalue())

        def resizes():
            time.sleep(1.0)
            yield (40, 132)

        out = io.StringIO()
        r = client.exec_interactive(
            "stty size; sleep 3; stty size; tty",
            stdout=out, rows=30, cols=100, resize=resizes(),
        )
        text = out.getvalue()
        check(r.exit_code == 0, r)
        check("30 100" in text and "40 132" in text and "/dev/pts/" in text, repr(text))


def scenario_log_and_log_stream():
    with Client(CFG) as client:
        client.launch(
            Sandbox(IMAGE).with_no_network().with_entrypoint(
                "sh", "-c", "echo first-marker && sleep 2 && echo second-marker"
            )
        )
        deadline = time.time() + 30
        while "first-marker" not in client.log():
            check(time.time() < deadline, "entrypoint output not in log")
            time.sleep(0.2)
        buf = io.StringIO()
        try:
            client.log_stream(stdout=buf, timeout=5)
            raise AssertionError("log_stream ended without cancellation")
        except TimeoutError:
            pass
        check("first-marker" in buf.getvalue() and "second-marker" in buf.getvalue(), buf.getvalue())


def scenario_timeouts_cancel():
    with Client(CFG) as client:
        client.create(Sandbox(IMAGE).options())
        for call in (
            lambda: client.exec("touch /tmp/m1; sleep 60", timeout=1.5),
            lambda: client.exec_stream("touch /tmp/m2; sleep 60", timeout=1.5),
            lambda: client.exec_pipe("touch /tmp/m3; sleep 60", stdin=None, timeout=1.5),
            lambda: client.exec_interactive("touch /tmp/m4; sleep 60", timeout=1.5),
        ):
            t = time.time()
            try:
                call()
                raise AssertionError("timeout did not fire")
            except TimeoutError:
                pass
            check(time.time() - t < 5, "timeout took too long")
        deadline = time.time() + 10
        while True:
            r = client.exec("ls /tmp/m1 /tmp/m2 /tmp/m3 /tmp/m4 >/dev/null && (ps -o comm | grep -qx sleep && echo running || echo gone)")
            if r.stdout.strip() == "gone":
                break
            check(time.time() < deadline, "cancelled commands still running: " + r.stdout + r.stderr)
            time.sleep(0.3)


def scenario_port_forward():
    with Client(CFG) as client:
        client.create(Sandbox(IMAGE).options())
        result = {}

        def serve():
            try:
                client.exec(
                    "mkdir -p /www && echo served-by-guest > /www/index.html && httpd -f -p 8080 -h /www"
                )
            except RPCError as e:
                result["error"] = e

        runner = threading.Thread(target=serve, daemon=True)
        runner.start()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        bindings = client.port_forward(f"{port}:8080")
        check(len(bindings) == 1 and bindings[0].local_port == port and bindings[0].remote_port == 8080, bindings)
        check(bindings[0].address == "127.0.0.1", bindings)
        import urllib.request

        deadline = time.time() + 30
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=5).read()
                break
            except Exception:
                check(time.time() < deadline, "no HTTP answer through the forward")
                time.sleep(0.3)
        check(body == b"served-by-guest\n", body)
        t = time.time()
        client.close()
        runner.join(5)
        # close cancels the still-running server command instead of waiting for it.
        check(time.time() - t < 5, "close was slow")
        check(result["error"].code == -32003, result)


def scenario_volumes_create_list_remove():
    # Reference §13.1 scenarios 146-147: the SDK shells out to `matchlock volume ... --json`.
    client = Client(CFG)
    info = client.volume_create("sdk-vol", 16)
    check(info.name == "sdk-vol" and info.size == "16.0 MB" and info.path.endswith("/sdk-vol.ext4"), info)
    check(os.path.getsize(info.path) == 16 << 20, info)
    listed = [v for v in client.volume_list() if v.name == "sdk-vol"]
    check(len(listed) == 1 and listed[0].size == "16.0 MB" and listed[0].path == info.path, listed)
    client.volume_remove("sdk-vol")
    check(all(v.name != "sdk-vol" for v in client.volume_list()), "still listed after remove")
    try:
        client.volume_remove("sdk-vol")
        raise AssertionError("removing a missing volume succeeded")
    except subprocess.CalledProcessError as e:
        check("named volume not found" in (e.stderr or ""), e.stderr)


def scenario_create_errors():
    with Client(CFG) as client:
        try:
            # A closed loopback registry port: the pull fails at once, nothing leaves the host.
            client.create(Sandbox("127.0.0.1:1/no-such-image:latest").options())
            raise AssertionError("create of a missing image succeeded")
        except RPCError as e:
            check(e.is_vm_error() and "failed to build rootfs" in e.message, e)
        try:
            client.create(Sandbox(IMAGE).with_network_mtu(100).options())
            raise AssertionError("an MTU of 100 was accepted")
        except RPCError as e:
            check(e.is_vm_error() and "invalid network mtu 100" in e.message, e)


SCENARIOS = [v for k, v in sorted(globals().items()) if k.startswith("scenario_")]

if __name__ == "__main__":
    only = sys.argv[1:]
    failed = 0
    for fn in SCENARIOS:
        if only and fn.__name__ not in only:
            continue
        t = time.time()
        try:
            fn()
            print(f"PASS {fn.__name__} ({time.time() - t:.1f}s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {fn.__name__} ({time.time() - t:.1f}s)", flush=True)
            traceback.print_exc()
    sys.exit(1 if failed else 0)

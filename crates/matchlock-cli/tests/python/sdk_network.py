"""Network scenarios for the published Matchlock Python SDK (matchlock==0.2.17), unchanged.

Run by crates/matchlock-cli/tests/e2e_sdk_network.rs inside the sandbox owner's network
namespace (only a veth to the test host), with the SDK's virtualenv python:
    MATCHLOCK_BIN=<matchlock> MATCHLOCK_TEST_IMAGE=<nettest tag> python sdk_network.py
Prints one JSON line per scenario with what the guest saw; the Rust side checks the test
host's logs for what arrived.
"""

import json
import os
import sys

from matchlock import Client, Config, Sandbox
from matchlock.types import (
    NetworkBodyTransform,
    NetworkHookRequestMutation,
    NetworkHookResponseMutation,
    NetworkHookResult,
    NetworkHookRule,
    NetworkInterceptionConfig,
)

BIN = os.environ["MATCHLOCK_BIN"]
IMAGE = os.environ["MATCHLOCK_TEST_IMAGE"]
CFG = Config(binary_path=BIN)

calls = []


def callback(req):
    calls.append({"phase": req.phase, "host": req.host, "path": req.path})
    if req.phase == "after":
        return NetworkHookResult(
            action="mutate",
            response=NetworkHookResponseMutation(
                body_replacements=[NetworkBodyTransform(find="hooked", replace="HOOKED")]
            ),
        )
    headers = dict(req.request_headers or {})
    headers["X-From-Callback"] = ["yes"]
    return NetworkHookResult(
        action="mutate", request=NetworkHookRequestMutation(headers=headers)
    )


def main():
    rules = NetworkInterceptionConfig(
        rules=[
            NetworkHookRule(
                name="tag", phase="before", hosts=["api.test"], set_headers={"X-Rule": "static"}
            ),
            NetworkHookRule(name="cb-before", phase="before", path="/cb/*", hook=callback, timeout_ms=5000),
            NetworkHookRule(name="cb-after", phase="after", path="/cb/*", hook=callback, timeout_ms=5000),
            NetworkHookRule(name="deny-admin", phase="before", path="/admin/*", action="block"),
            NetworkHookRule(
                name="rewrite-body",
                phase="after",
                path="/plain/*",
                body_replacements=[NetworkBodyTransform(find="GET", replace="TEG")],
            ),
        ]
    )
    sb = (
        Sandbox(IMAGE)
        .allow_host("web.test", "api.test")
        .add_secret("SDK_TOKEN", "sdk-secret-value", "api.test")
        .with_network_interception(rules)
    )
    with Client(CFG) as client:
        client.create(sb.options())

        def run(cmd):
            r = client.exec(cmd)
            return {"code": r.exit_code, "out": r.stdout}

        out = {
            "token": run("printf %s \"$SDK_TOKEN\""),
            "secret": run('curl -sS --max-time 30 -o /dev/null -w "%{http_code}" -H "Authorization: Bearer $SDK_TOKEN" https://api.test/sdk-secret'),
            "leak": run('curl -sS --max-time 30 -w "%{http_code}" -H "X-Leak: $SDK_TOKEN" https://web.test/sdk-leak'),
            "callback": run("curl -sS --max-time 30 https://api.test/cb/one"),
            "blocked": run('curl -sS --max-time 30 -w "%{http_code}" http://web.test/admin/x'),
            "rewritten": run("curl -sS --max-time 30 http://web.test/plain/x"),
        }
        out["calls"] = calls
        print(json.dumps(out))
        client.close()
        client.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())

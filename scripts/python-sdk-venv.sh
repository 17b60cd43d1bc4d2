#!/usr/bin/env bash
# Creates (once) a virtualenv with the published Matchlock Python SDK (matchlock==0.2.17, from
# the Python package index) and prints the path of its python. The RPC compatibility tests
# run their scenarios with it: the SDK must work unchanged against our `matchlock rpc`.
set -euo pipefail
version=0.2.17
venv=${MATCHLOCK_PY_SDK_VENV:-$HOME/.cache/matchlock/py-sdk-$version}
if ! "$venv/bin/python" -c "import matchlock, importlib.metadata as m; assert m.version('matchlock') == '$version'" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "matchlock==$version" >&2
fi
echo "$venv/bin/python"

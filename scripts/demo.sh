#!/bin/sh
# The README's main job on the built-in examples: validate them, say what they enforce,
# then enforce one for real: a command run under the build sandbox (loopback only) reaches
# a loopback listener but not the outside world, and everything is removed afterwards.
set -eu
cd "$(dirname "$0")/.."
CGPOLICY=.venv/bin/cgpolicy

echo "== cgpolicy validate policies/"
$CGPOLICY validate policies/
echo
echo "== what the shipped policies would enforce"
$CGPOLICY describe policies/
echo
echo "== cgpolicy run policies/build-sandbox.yaml -- (connect to loopback, then to 192.0.2.1)"
.venv/bin/python scripts/demo_sandbox.py
echo
echo "== cgpolicy explain: which rule decides"
$CGPOLICY explain policies/web-egress.yaml connect tcp 169.254.169.254:80

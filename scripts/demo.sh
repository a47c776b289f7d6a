#!/bin/sh
# The README's main job on the shipped examples: validate them, say what they enforce.
set -eu
cd "$(dirname "$0")/.."
CGPOLICY=.venv/bin/cgpolicy

echo "== cgpolicy validate policies/"
$CGPOLICY validate policies/
echo
echo "== what the shipped policies would enforce"
$CGPOLICY describe policies/

#!/usr/bin/env bash
# The README's second command: set up (venv, test tools, models) and run the whole test
# suite, the slow end-to-end tests included. Extra arguments go to pytest
# (e.g. `image/test.sh -m "not slow"` for the fast suite only).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
image/setup.sh --test
exec .venv/bin/python -m pytest "$@"

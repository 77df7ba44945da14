#!/usr/bin/env bash
# snug on a GPU, in one command and no network: the plan against real steps, snug against
# transformers Trainer + peft, the GPU-only tests. Writes OUTDIR as it goes, so a time-out
# still leaves what was measured.
#
#   benchmarks/gpu/run.sh OUTDIR                 on a CUDA machine (carried wheels in .whl/)
#   benchmarks/gpu/run.sh --cpu-dry-run OUTDIR   the same scripts on this CPU, tiny shapes
#                                                (snug calibrate --device cpu without its two
#                                                wide steps: calibrate_dry.py)
#
# Budgets (seconds, override by environment): CALIBRATE_S=120 STREAM_S=180 REALITY_S=320
# BASELINE_S=100 PYTEST_S=90 on a GPU, whose lease is short; 0 skips that part. STREAM_ARGS are
# stream_proof.py's options (default "--layers 24 --cap-gib 5.5": Qwen2.5-14B at half depth,
# 6.1 GiB of 4-bit weights under a 5.5 GiB cap; STREAM_ARGS="--cap-gib 8" for the whole model).
# The CPU dry run checks that the kit works, not how fast a (maybe busy) CPU is: its budgets
# default to 900 s each, a guard against a hang only (a 2-core CPU shared with the test suite
# took 121 s to calibrate). On an H100 (2026-11-28, before the stream proof): calibrate 49 s,
# about 29 s a reality configuration (10 in 320 s), baseline 76 s, pytest 80 s: about 9 minutes.
# The stream proof alone, after calibrating (its step time is planned with the card's measured
# H2D rate): REALITY_S=0 BASELINE_S=0 PYTEST_S=0 STREAM_S=420 STREAM_ARGS="--cap-gib 8" run.sh OUTDIR
set -uo pipefail
DRY=""
if [ "${1:-}" = "--cpu-dry-run" ]; then
  DRY="--cpu-dry-run"; shift
  : "${CALIBRATE_S:=900}" "${STREAM_S:=900}" "${REALITY_S:=900}" "${BASELINE_S:=900}"
  : "${STREAM_ARGS=}"  # stream_proof.py's own tiny shapes
fi
OUT=${1:?usage: benchmarks/gpu/run.sh [--cpu-dry-run] OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi  # make's venv
if [ -z "$DRY" ] && [ -d .whl ]; then
  # wheels the GPU image lacks (benchmarks/gpu/prepare.sh) and bitsandbytes, unpacked slim
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/snug-site .whl/*.whl >"$OUT/install.txt" 2>&1 || echo "install failed" >>"$OUT/install.txt"
  export PYTHONPATH="/tmp/snug-site:$PWD/.whl/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# snug's own methods and stages come in through its entry point (snug/core/registry.py): where
# snug runs from this folder without being installed, write its metadata where Python looks.
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(not any(e.dist.name == 'snug' for e in m.entry_points(group='snug.plugins')))"; then
  "$PY" benchmarks/gpu/metadata.py /tmp/snug-metadata && export PYTHONPATH="/tmp/snug-metadata:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# Every measured run is a fresh interpreter. Where PYTHONDONTWRITEBYTECODE is set (as on this
# project's CPU machines) each one compiled the carried packages again (installed --no-compile):
# let the first import write their bytecode where it can, and the later ones reuse it.
bytecode="PYTHONDONTWRITEBYTECODE was '${PYTHONDONTWRITEBYTECODE:-}', unset for the kit"
unset PYTHONDONTWRITEBYTECODE
started=$(date +%s)
{
  date -u
  echo "$bytecode"
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  # On a GPU each package is imported (a wheel that fails to load shows here); the dry run
  # reads the installed versions only, and leaves the imports to the steps that need them.
  KIT_DRY="$DRY" "$PY" - <<'PYEOF'
import importlib, importlib.metadata, importlib.util, os, platform
print("python", platform.python_version())
dry = bool(os.environ["KIT_DRY"])
for name in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate", "safetensors"):
    try:
        if dry:
            spec = importlib.util.find_spec(name)
            print(name, importlib.metadata.version(name), spec.origin, "(not imported: dry run)")
        else:
            m = importlib.import_module(name)
            print(name, getattr(m, "__version__", "?"), m.__file__)
    except Exception as e:
        print(name, "IMPORT FAILED:", type(e).__name__, e)
if not dry:
    import torch
    if torch.cuda.is_available():
        print("device", torch.cuda.get_device_name(), "cuda", torch.version.cuda)
    import pathlib
    cache = pathlib.Path(torch.__file__).parent / "__pycache__"
    print("torch's bytecode:", len(list(cache.glob("*.pyc"))) if cache.is_dir() else 0, "files in", cache)
PYEOF
} >"$OUT/env.txt" 2>&1
echo "env: $(( $(date +%s) - started )) s"

# snug calibrate first, into OUTDIR: reality.py then shows the plan's step time before (typical
# values) and after it, on configurations the calibration series did not run.
export SNUG_CALIBRATION="$OUT/calibration.json"
if [ "${CALIBRATE_S:-120}" != 0 ]; then  # 0 skips it
  # the dry run: `snug calibrate --device cpu` without its two wide steps (calibrate_dry.py)
  calibrate=(-m snug.cli calibrate --device cuda)
  [ -n "$DRY" ] && calibrate=(benchmarks/gpu/calibrate_dry.py)
  timeout "${CALIBRATE_S:-120}" "$PY" "${calibrate[@]}" >"$OUT/calibrate.txt" 2>&1
  echo "calibrate: rc $? at $(( $(date +%s) - started )) s"
fi

# memory.offload_weights proven (issue 36): QLoRA streamed under a cap below its 4-bit weights,
# against its plan, and resident beside it
if [ "${STREAM_S:-180}" != 0 ]; then  # 0 skips it
  # shellcheck disable=SC2086  # STREAM_ARGS is a list of options
  timeout "${STREAM_S:-180}" "$PY" benchmarks/gpu/stream_proof.py "$OUT" $DRY \
    --budget $(( ${STREAM_S:-180} - 10 )) ${STREAM_ARGS---layers 24 --cap-gib 5.5} \
    >"$OUT/stream.log" 2>&1
  echo "stream: rc $? at $(( $(date +%s) - started )) s"
fi

if [ "${REALITY_S:-320}" != 0 ]; then  # 0 skips it
  timeout "${REALITY_S:-320}" "$PY" benchmarks/gpu/reality.py "$OUT" $DRY \
    --budget $(( ${REALITY_S:-320} - 15 )) >"$OUT/reality.log" 2>&1
  echo "reality: rc $? at $(( $(date +%s) - started )) s"
fi

if [ "${BASELINE_S:-100}" != 0 ]; then  # 0 skips it
  timeout "${BASELINE_S:-100}" "$PY" benchmarks/gpu/baseline.py "$OUT" $DRY >"$OUT/baseline.log" 2>&1
  echo "baseline: rc $? at $(( $(date +%s) - started )) s"
fi

if [ -z "$DRY" ] && [ "${PYTEST_S:-90}" != 0 ]; then  # 0 skips it
  timeout "${PYTEST_S:-90}" "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
    >"$OUT/pytest-gpu.txt" 2>&1
  echo "pytest -m gpu: rc $? at $(( $(date +%s) - started )) s"
fi

{
  echo "# snug on $( (grep '^device' "$OUT/env.txt" || echo 'device: CPU dry run') | head -1)"
  echo
  echo "Command: \`benchmarks/gpu/run.sh $DRY OUTDIR\`, $(date -u +%F), $(( $(date +%s) - started )) s."
  echo
  echo '```'; cat "$OUT/env.txt"; echo '```'
  echo
  if [ -f "$OUT/calibrate.txt" ]; then
    echo "## snug calibrate"; echo; echo '```'; cat "$OUT/calibrate.txt"; echo '```'; echo
  fi
  if [ -f "$OUT/stream.log" ]; then
    cat "$OUT/stream.md" 2>/dev/null || { echo "stream_proof.py wrote no report:"; tail -5 "$OUT/stream.log"; }
    echo
  fi
  if [ -f "$OUT/reality.log" ]; then
    cat "$OUT/reality.md" 2>/dev/null || { echo "reality.py wrote no report:"; tail -5 "$OUT/reality.log"; }
  fi
  echo
  cat "$OUT/baseline.md" 2>/dev/null || { echo "baseline.py wrote no report:"; tail -5 "$OUT/baseline.log"; }
  if [ -f "$OUT/pytest-gpu.txt" ]; then
    echo; echo "## pytest -m gpu"; echo; echo '```'; tail -15 "$OUT/pytest-gpu.txt"; echo '```'
  fi
} >"$OUT/report.md"
echo "report: $OUT/report.md"

#!/usr/bin/env bash
# On the lent GPU machine, from the repo root: bash scripts/gpu_run.sh [--install-only] [gpu_suite.py args...]
#   e.g. bash scripts/gpu_run.sh --only correctness,training
# That machine has torch and triton but reaches no package index, so this installs the wheels that
# `make gpu-bundle` collected here (.gpu/wheels, carried with the working tree) into a throwaway site dir,
# checks that everything imports, and runs scripts/gpu_suite.py. --install-only stops after the checks.
# Environment: GPU_RUN_PYTHON (default python3), GPU_RUN_WHEELS (default .gpu/wheels),
# GPU_RUN_SITE (default: a fresh temporary dir; left behind, the machine is thrown away anyway).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${GPU_RUN_PYTHON:-python3}
WHEELS=${GPU_RUN_WHEELS:-.gpu/wheels}
SITE=${GPU_RUN_SITE:-$(mktemp -d "${TMPDIR:-/tmp}/actmem-gpu-site.XXXXXX")}
FIX="On the development machine run \`make gpu-bundle\` (it writes .gpu/wheels from requirements-gpu.txt)
and carry \`.gpu\` along with the working tree; torch and triton are not bundled, they must already be here."

# --no-index --no-deps: nothing is fetched and the preinstalled torch is never touched (no torch pin anywhere);
# PIP_CONFIG_FILE=/dev/null keeps this machine's pip config from adding an index or constraints;
# --upgrade replaces what an earlier run left in a reused GPU_RUN_SITE.
start=${EPOCHREALTIME//[.,]/}  # microseconds
if ! PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade \
        --find-links "$WHEELS" --target "$SITE" -r requirements-gpu.txt; then
    echo "gpu_run.sh: could not install requirements-gpu.txt offline from $WHEELS with $PY -m pip. $FIX" >&2
    exit 1
fi
echo "installed requirements-gpu.txt from $WHEELS into $SITE in $(( (${EPOCHREALTIME//[.,]/} - start) / 1000 )) ms"
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"

FIX="$FIX" "$PY" - <<'EOF'
import importlib
import os
import sys

missing = []


def check(name, describe):
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # an ImportError, or a broken install failing some other way
        missing.append(name)
        print(f"{name:35} MISSING ({type(e).__name__}: {e})")
        return
    print(f"{name:35} {describe(mod)}")


check("torch", lambda m: f"{m.__version__}, " + (m.cuda.get_device_name(0) if m.cuda.is_available() else "no CUDA"))
check("triton", lambda m: m.__version__)
check("hydra", lambda m: f"{m.__version__} from {m.__file__}")
check("omegaconf", lambda m: f"{m.__version__} from {m.__file__}")
check("hydra_plugins.hydra_joblib_launcher", lambda m: f"from {m.__file__}")  # hydra/launcher=parallel
check("actmem.train", lambda m: f"from {m.__file__}")
if missing:
    sys.exit(f"gpu_run.sh: cannot import {', '.join(missing)} with PYTHONPATH={os.environ['PYTHONPATH']}. "
             + os.environ["FIX"].replace("\n", " "))
EOF

if [ "${1:-}" = --install-only ]; then
    exit 0
fi
if [ ! -f scripts/gpu_suite.py ]; then
    echo "gpu_run.sh: scripts/gpu_suite.py does not exist in this working tree, so there is no suite to run." >&2
    exit 1
fi
exec "$PY" scripts/gpu_suite.py "$@"

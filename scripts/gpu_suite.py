"""Every GPU figure in one command, for the rare GPU window (at most 8 minutes on one H100).

    python scripts/gpu_suite.py                  # all sections -> results/gpu-<section>.md
    python scripts/gpu_suite.py --only correctness,training
    python scripts/gpu_suite.py --dry-run        # CPU, Triton interpreter, toy sizes: checks the suite runs

The logic lives in actmem.experiments.gpu_suite (see actmem/experiments/gpu_suite/runner.py)."""
import sys

from actmem.experiments.gpu_suite.runner import main

if __name__ == "__main__":
    sys.exit(main())

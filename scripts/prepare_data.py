"""`make data`: unpack the shared tarballs into data/ and build the CIFAR-10 pixel cache.

    python scripts/prepare_data.py --shared ../shared/data --dest data

Idempotent: a dataset whose folder already holds the expected number of images is left alone. Without
the CIFAR-10 tarball (a clone outside this workplace: no ../shared/data) torchvision fetches CIFAR-10 into
data/cifar10 where there is network; where there is none the script exits 1 with one paragraph saying what
to do, since `make run` and `make test` need CIFAR-10. Any other missing tarball is not an error (exit 0):
the script says how to get that dataset instead (actmem.data.prepare).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from actmem.data.prepare import prepare_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"), help="folder with the tarballs")
    parser.add_argument("--dest", type=Path, default=Path("data"), help="where the datasets go (git-ignored)")
    args = parser.parse_args()
    prepare_all(args.shared, args.dest)


if __name__ == "__main__":
    main()

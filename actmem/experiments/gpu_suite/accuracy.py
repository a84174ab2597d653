"""The parity protocol (actmem.experiments.parity) on the GPU: experiment=airbench94 (CIFAR-10, about 94 % in 9.9
epochs) with every strategy, seed-major, for as many seeds as the section's time allows: each run starts
only if its strategy's previous run would fit in what is left, so n is the time's choice (at most
MAX_SEEDS) and every strategy has n or n - 1 runs. The table's n column says which.

CIFAR-10 does not come with the working tree: `make gpu-bundle` copies the shared tarball into .gpu/data,
which travels with it, and this section unpacks it into data/ (actmem.data.prepare) when data/cifar10 is
missing. The dry run trains the same preset on the CPU at toy sizes (8 training and 4 test images, batch
4, 2 steps, 2 seeds), with the torch reference of the compression kernels."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from actmem.core.errors import DataNotFoundError, paragraph
from actmem.data.prepare import TARBALLS, build_cifar10_cache, prepare
from actmem.experiments.gpu_suite.base import Context, register
from actmem.experiments.gpu_suite.record import REPO
from actmem.experiments.parity import PROTOCOL, ProtocolRun, run_protocol, runs_table, summarize, table

MAX_SEEDS = 10  # on the GPU the time decides n; this only bounds it
DRY_SEEDS = 2
BASE = ("experiment=airbench94", "logger=none", "trainer.progress=false")
GPU = (*BASE, "trainer.device=cuda")
DRY = (*BASE, "trainer.device=cpu", "dataset.train_subset=8", "dataset.test_subset=4", "trainer.batch_size=4",
       "trainer.max_steps=2")
CIFAR10 = next(tb for tb in TARBALLS if tb.folder == "cifar10")


def prepare_cifar10(bundle: Path = REPO / ".gpu" / "data", dest: Path = REPO / "data") -> str:
    """data/cifar10 in place, unpacked from the bundle's tarball where it is missing, and its pixel
    cache built (so that no run's time holds the decoding); a line saying which. DataNotFoundError
    where there is neither."""
    folder = dest / CIFAR10.folder
    existed = folder.exists()
    t0 = time.monotonic()
    if not prepare(CIFAR10, bundle, dest):
        raise DataNotFoundError(
            f"No CIFAR-10 for the parity section: {folder} does not exist and there is no {bundle / CIFAR10.file} "
            "to unpack it from (the GPU machine gets the working tree, not ../shared). On the development "
            "machine run `make gpu-bundle`, which copies ../shared/data/cifar10-jpg.tar.gz into .gpu/data, and "
            f"carry `.gpu` with the working tree; or put CIFAR-10 into {folder} (train/<class>/*, test/<class>/*).")
    if existed:
        return f"CIFAR-10: {folder}, already there."
    build_cifar10_cache(folder)
    return (f"CIFAR-10: unpacked from {bundle / CIFAR10.file} into {folder} and decoded in "
            f"{time.monotonic() - t0:.0f} s (before the protocol's time).")


def markdown(head: str, protocol: ProtocolRun, seeds: int) -> str:
    fewest, most = protocol.seeds()
    n = f"{fewest}" if fewest == most else f"{fewest} to {most}"
    why = protocol.stopped or f"all {seeds} seed(s) asked for ran"
    rows = summarize(protocol.results, [v.label for v in PROTOCOL])
    return "\n".join([head, "", f"n = {n} seed(s) per strategy ({why}).", "", str(table(rows)), "",
                      "Every run, in the order run:", "", str(runs_table(protocol.results))])


@register("parity", limit=240)
def parity(ctx: Context) -> str:
    if ctx.dry_run:  # toy tensors: the Triton interpreter would spend minutes; a second thread only waits
        os.environ["ACTMEM_BACKEND"] = "reference"
        torch.set_num_threads(1)
    try:
        data = prepare_cifar10()
    except DataNotFoundError as e:
        ctx.progress(paragraph(f"**not run**: {e}"))
        raise SystemExit(paragraph(str(e))) from None
    overrides, seeds = (DRY, DRY_SEEDS) if ctx.dry_run else (GPU, MAX_SEEDS)
    where = "CPU (toy sizes)" if ctx.dry_run else torch.cuda.get_device_name()
    head = (f"`{' '.join(overrides)}` on {where}, every strategy of the protocol; seeds 0, 1, ... in seed-major "
            f"order, a run started only if its strategy's previous run fit in the section's time left. "
            f"test acc: each run's final test_acc (with trainer.tta > 0, the test-time-augmented evaluation); "
            f"activation bytes measured on seed 0. {data}")
    with tempfile.TemporaryDirectory(prefix="actmem-parity-") as out:
        protocol = run_protocol(PROTOCOL, seeds, overrides, Path(out), deadline=time.time() + ctx.left(),
                                on_result=lambda run: ctx.progress(markdown(head, run, seeds)))
    return markdown(head, protocol, seeds)

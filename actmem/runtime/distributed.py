"""Data-parallel training under torchrun: the process group, the reductions the runner needs, and how a
rank tells the others why it stopped.

`torchrun --nproc_per_node=N -m actmem.train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; `World.setup` joins
the process group (NCCL on CUDA, gloo on the CPU). Without torchrun (WORLD_SIZE unset or 1) every
method is a no-op and training is the single-process one, bit for bit.

When one rank dies, torchrun's agent sends SIGTERM to the others -- the same signal a scheduler sends at
a time limit. To tell the two apart, a rank that stops records why in the job's key-value store (the
one torchrun's agent hosts, which outlives the workers): "signal" when it was stopped, or its error.
Rank 0, which alone writes the run directory, reads the others' records (`peers_status`): a rank that
left none died without a word (SIGKILL, out of memory), and the run is recorded as failed.
"""
from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import cache

import torch
import torch.distributed as dist

STATUS_KEY = "actmem:stopped:{rank}"
START_KEY = "actmem:start_time"


@cache
def start_time() -> dt.datetime:
    """When this run started: now, or under torchrun the time the first rank to ask put in the job's
    store, so that every rank's Hydra composes the same `outputs/<date>/<time>_...` directory (the
    `actmem_now` resolver of configs/config.yaml)."""
    now = dt.datetime.now()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or "MASTER_ADDR" not in os.environ:
        return now
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=60))
    return dt.datetime.fromtimestamp(float(store.compare_set(START_KEY, "", str(now.timestamp())).decode()))


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes the run directory, metrics, summary and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def setup(cls, device: torch.device) -> World:
        """The world torchrun started this process in (a single process without torchrun); joins its
        process group, on `device`'s backend. On CUDA each rank takes GPU LOCAL_RANK."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        world = cls(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(world.local_rank)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
        return world

    def device(self, device: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.distributed else device

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, dist.ReduceOp.SUM)
        return t

    def total(self, value: float) -> float:
        """The sum of the ranks' values (a global img/s from each rank's)."""
        if not self.distributed:
            return value
        t = torch.tensor(float(value), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, dist.ReduceOp.SUM)
        return t.item()

    def max(self, value: float | None) -> float | None:
        """The largest of the ranks' values (None where every rank has None)."""
        if not self.distributed:
            return value
        t = torch.tensor(-1.0 if value is None else float(value), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, dist.ReduceOp.MAX)
        return None if t.item() < 0 else t.item()

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank: one decision every rank takes alike."""
        if not self.distributed:
            return flag
        t = torch.tensor(int(flag), device=self._comm_device())
        dist.all_reduce(t, dist.ReduceOp.MIN)
        return bool(t.item())

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def _comm_device(self) -> torch.device:
        nccl = dist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    # ---------------------------------------------------------------- why a rank stopped

    def record_stop(self, why: str) -> None:
        """Leave `why` ("signal", or the error) in the job's store, for rank 0; best effort."""
        if self.distributed and dist.is_initialized():
            try:
                dist.distributed_c10d._get_default_store().set(STATUS_KEY.format(rank=self.rank), why)
            except Exception:  # the store went with the job: nothing left to tell
                pass

    def peers_status(self, wait_s: float = 5.0) -> dict[int, str | None]:
        """On rank 0 after it was stopped: each other rank's record (None: it left none within `wait_s`,
        so it died without a word)."""
        if not (self.distributed and dist.is_initialized()):
            return {}
        store = dist.distributed_c10d._get_default_store()
        keys = {r: STATUS_KEY.format(rank=r) for r in range(1, self.size)}
        deadline, found = time.monotonic() + wait_s, {}
        while True:
            for r, key in keys.items():
                if r not in found:
                    try:
                        if store.check([key]):
                            found[r] = store.get(key).decode()
                    except Exception:
                        return {r: found.get(r) for r in keys}
            if len(found) == len(keys) or time.monotonic() > deadline:
                return {r: found.get(r) for r in keys}
            time.sleep(0.1)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


SINGLE = World()  # one process, no torchrun

"""`python -m actmem.train` with a probe on every optimizer step, for tests that run it under torchrun:
each rank appends "step sha256-of-its-parameters" to $PROBE_TRACE.<rank>, and the rank $PROBE_DIE_RANK
(default 0) SIGKILLs itself after step $PROBE_DIE_AT_STEP -- a rank dying mid-epoch, at a known step --
after step $PROBE_STOP_JOB_AT_STEP rank 0 sends SIGTERM to torchrun's agent, as a scheduler stops a job,
and after step $PROBE_FAIL_AT_STEP every rank raises a RuntimeError: a failure no check foresaw.

    torchrun --standalone --nproc_per_node=2 tests/train_probe.py [hydra overrides]
"""
import hashlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's actmem, run as a script

import actmem.runtime.session as session  # noqa: E402
import actmem.train as train  # noqa: E402

RANK = os.environ.get("RANK", "0")
plain_train_epoch = session.train_epoch
last_step = None  # the step the probe saw last in this process


def digest(model) -> str:
    return hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()


def probed_train_epoch(learner, *args, on_step=None, **kwargs):
    def probe(step, sums):
        global last_step
        assert last_step is None or step == last_step + 1, f"step {step} after step {last_step}"
        last_step = step
        if on_step is not None:
            on_step(step, sums)
        if "PROBE_TRACE" in os.environ:
            with open(f"{os.environ['PROBE_TRACE']}.{RANK}", "a") as f:
                f.write(f"{step} {digest(learner.model)}\n")
        if str(step) == os.environ.get("PROBE_DIE_AT_STEP") and RANK == os.environ.get("PROBE_DIE_RANK", "0"):
            os.kill(os.getpid(), signal.SIGKILL)
        if str(step) == os.environ.get("PROBE_STOP_JOB_AT_STEP") and RANK == "0":
            os.kill(os.getppid(), signal.SIGTERM)
        if str(step) == os.environ.get("PROBE_FAIL_AT_STEP"):
            raise RuntimeError(f"injected by the probe after step {step}")

    return plain_train_epoch(learner, *args, on_step=probe, **kwargs)


session.train_epoch = probed_train_epoch

if __name__ == "__main__":
    train.main()

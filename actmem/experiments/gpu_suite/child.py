"""One section in its own process: `python -m actmem.experiments.gpu_suite.child MODULE FUNCTION CONTEXT_JSON`.

The runner starts it and kills it (its whole process group) at the section's deadline; whatever the
section saved with ctx.progress survives that. The section's markdown goes to ctx.progress_path; a
crash leaves its traceback in the log the runner keeps."""
from __future__ import annotations

import importlib
import sys

from actmem.experiments.gpu_suite.base import Context


def main() -> None:
    module, function, context = sys.argv[1:]
    ctx = Context.from_json(context)
    fn = getattr(importlib.import_module(module), function)
    ctx.progress(fn(ctx))


if __name__ == "__main__":
    main()

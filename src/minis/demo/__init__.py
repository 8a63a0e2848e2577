"""`minis demo`: train one small model twice, with and without minis, and compare loss, memory and speed.

What it does, on CPU and with nothing downloaded:

1. Trains a byte-level BPE tokenizer on the corpus minis ships (`minis.tokenizer`) and cuts the tokenized corpus
   (repeated when it is shorter than needed) into `steps * batch_size` blocks of `seq_len` tokens.
2. Builds a small model of `--model-type` from a config (random weights, fp32) and trains it with
   `transformers.Trainer` for `--steps` steps, twice, each in its own Python process: once as installed (minis
   patches the model through its import hook) and once with `MINIS=0` in the child's environment, which leaves
   transformers exactly as upstream ships it. Same seed, same data, same order.
3. Each child writes its per-step losses, peak tensor memory and tokens/s to a JSON file; the parent prints them
   side by side and fails (exit 1) if the losses differ by more than 1e-4 relative, which would be a minis bug.

Separate processes are the honest comparison: the baseline never imports a patched class, and each run's memory
peak is its own.

The modules, in the order a run goes through them:

- `cli`: the argument parser, the argument checks, the data, and launching the two children (`build_parser`,
  `run`, `main`);
- `child`: one training run in its own interpreter, which writes its result JSON (`run_child`);
- `report`: the comparison of the two results and the text the demo prints (`compare_runs`, `format_report`).

Importing this package imports neither torch nor transformers, so a command line can build its parser cheaply;
`run_child` (which needs transformers) is imported from `child` on first use.
"""

from __future__ import annotations

from typing import Any

from .cli import build_parser, main, make_blocks, run
from .report import LOSS_RTOL, compare_runs, format_report

__all__ = ["LOSS_RTOL", "build_parser", "compare_runs", "format_report", "main", "make_blocks", "run", "run_child"]


def __getattr__(name: str) -> Any:
    if name == "run_child":
        from .child import run_child

        return run_child
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

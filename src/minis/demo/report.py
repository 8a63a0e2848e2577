"""The demo's verdict: `compare_runs` turns the two children's results into one, `format_report` prints it.

Standard library only: the parent process never needs torch for this part.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["LOSS_RTOL", "compare_runs", "format_report"]

LOSS_RTOL = 1e-4  # fp32 chunking changes only summation order: a larger difference is a bug
MIB = 1 << 20


def compare_runs(setup: dict[str, Any], with_minis: dict[str, Any], without: dict[str, Any]) -> dict[str, Any]:
    """The demo's result: both runs, the largest relative loss difference, and the memory and speed ratios."""
    losses_a, losses_b = with_minis["losses"], without["losses"]
    steps_match = len(losses_a) == len(losses_b) == setup["steps"]
    max_rel = max(
        (abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses_a, losses_b)),
        default=math.inf,
    )
    norms_a, norms_b = with_minis["grad_norms"], without["grad_norms"]
    max_rel_grad = max(
        (abs(a - b) / max(abs(b), 1e-12) for a, b in zip(norms_a, norms_b) if a is not None and b is not None),
        default=None,
    )
    peak_a, peak_b = with_minis["peak_bytes"], without["peak_bytes"]
    return {
        "setup": setup,
        "with_minis": with_minis,
        "without_minis": without,
        "max_rel_loss_diff": max_rel,
        "max_rel_grad_norm_diff": max_rel_grad,
        "loss_rtol": LOSS_RTOL,
        "losses_match": steps_match and max_rel <= LOSS_RTOL,
        "peak_ratio": peak_a / peak_b if peak_b else None,
        "memory_saved_fraction": 1.0 - peak_a / peak_b if peak_b else None,
        "speed_ratio": (
            with_minis["tokens_per_s"] / without["tokens_per_s"]
            if with_minis["tokens_per_s"] and without["tokens_per_s"]
            else None
        ),
        "ok": steps_match and max_rel <= LOSS_RTOL,
    }


def format_report(result: dict[str, Any]) -> str:
    """The side-by-side table and summary lines the demo prints."""
    a, b = result["with_minis"], result["without_minis"]
    lines = [
        "",
        f"minis.is_active(model): {a['is_active']} with minis, {b['is_active']} without",
        "",
        f"{'step':>4}  {'loss with minis':>16}  {'loss without':>16}  {'abs diff':>9}",
    ]
    for step, (x, y) in enumerate(zip(a["losses"], b["losses"]), start=1):
        lines.append(f"{step:>4}  {x:>16.8f}  {y:>16.8f}  {abs(x - y):>9.2e}")
    verdict = "OK: the same training" if result["losses_match"] else "FAIL: the runs differ (a minis bug)"
    lines += [
        "",
        (
            f"max relative loss difference: {result['max_rel_loss_diff']:.2e} (limit {result['loss_rtol']:.0e}) "
            f"-> {verdict}"
        ),
    ]
    if result["max_rel_grad_norm_diff"] is not None:
        lines.append(f"max relative grad-norm difference: {result['max_rel_grad_norm_diff']:.2e}")
    saved = result["memory_saved_fraction"]
    steps = len(a["step_seconds"])
    # The first step is left out of the speed (it warms up kernels and the allocator) when there are others.
    timed_steps = "all steps" if steps < 2 else "step 2" if steps == 2 else f"steps 2-{steps}"
    lines += [
        f"peak memory (CPU tensors, allocator events): with minis {a['peak_bytes'] / MIB:.1f} MiB, "
        f"without {b['peak_bytes'] / MIB:.1f} MiB"
        + (f" -> minis saves {saved:.1%} ({1 / result['peak_ratio']:.2f}x less)" if saved is not None else ""),
        (
            f"  of which weights + AdamW state: {a['state_bytes'] / MIB:.1f} MiB in both; the rest (activations, "
            f"gradients, temporaries): {(a['peak_bytes'] - a['state_bytes']) / MIB:.1f} vs "
            f"{(b['peak_bytes'] - b['state_bytes']) / MIB:.1f} MiB"
        ),
        f"tokens/s ({timed_steps}): with minis {a['tokens_per_s']:.0f}, without {b['tokens_per_s']:.0f}",
        (
            f"train time: with minis {a['train_seconds']:.1f} s, without {b['train_seconds']:.1f} s; whole demo "
            f"{result.get('demo_seconds', 0.0):.0f} s"
        ),
    ]
    loads = (a.get("load_average_1min"), b.get("load_average_1min"))
    if None not in loads:
        cores = result["setup"].get("cpu_cores") or 1
        # The run itself keeps about min(threads, cores) cores busy; a higher load is other processes.
        busy = max(loads) > min(result["setup"]["torch_threads"], cores) + 0.5
        lines.append(
            f"machine load (1-min average at the end of each run): {loads[0]:.1f} and {loads[1]:.1f} on {cores} "
            "cores" + (": other processes were running too, so the speed numbers are rough" if busy else "")
        )
    return "\n".join(lines)

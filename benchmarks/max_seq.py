"""The longest trainable sequence of each preset on an 80 GB GPU, upstream vs minis, predicted by `minis plan`.

Writes benchmarks/results/max_seq.json, docs/benchmarks.md (tables, plots, method) and docs/images/*.png.
Runs on a CPU (the planner simulates on fake tensors); the page says how long the last full run took.

    python benchmarks/max_seq.py                 # the whole grid, 2 worker processes
    python benchmarks/max_seq.py --quick         # llama-3-8b only, for a smoke test (docs are not rewritten)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "max_seq.json")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
IMAGES = os.path.join(ROOT, "docs", "images")

GPU_MEM_TEXT = "78GiB"  # an 80 GB GPU holds 80 GiB; 2 GiB are left for the CUDA context, workspaces, fragmentation
GRANULARITY = 256
CURVE_LENGTHS = (4096, 16384, 32768, 65536, 131072, 262144)
# Activation checkpointing of every decoder layer: off, on, and on with the checkpoints offloaded to host memory
# (minis' offload for minis, `save_on_cpu` for upstream; see docs/offload.md).
CHECKPOINTING = {"no": (False, False), "yes": (True, False), "yes + offload": (True, True)}


def setups():
    from minis.planner import TrainingSetup

    # bf16 weights/grads/activations (pure bf16), AdamW with fp32 moments, batch 1, flash-attention 2 (the attention
    # long-context recipes use; gemma-2 cannot use SDPA and mistral-7b's sliding window makes SDPA build a seq x seq
    # mask).
    base = TrainingSetup(attn="flash", batch_size=1, dtype="bf16", optimizer="adamw")
    return {
        "full, 1 GPU": replace(base, method="full"),
        "full, FSDP x8": replace(base, method="full", fsdp=True, world_size=8),
        "LoRA r=16, 1 GPU": replace(base, method="lora", lora_rank=16),
    }


def _checkpointing(setup) -> str:
    return next(label for label, (ckpt, offload) in CHECKPOINTING.items()
                if (ckpt, offload) == (setup.grad_ckpt, setup.offload_activations))


def _max_seq_task(args):
    preset, setup_name, setup, mini_sequence, gpu_mem = args
    from minis.planner import find_max_seq

    started = time.perf_counter()
    length, estimate = find_max_seq(preset, gpu_mem, setup, mini_sequence=mini_sequence, granularity=GRANULARITY)
    return {
        "preset": preset, "setup": setup_name, "grad_ckpt": setup.grad_ckpt, "checkpointing": _checkpointing(setup),
        "minis": mini_sequence, "max_seq": length, "peak": None if estimate is None else estimate.total,
        "host_bytes": None if estimate is None else estimate.host_bytes,
        "phase": None if estimate is None else estimate.phase, "seconds": time.perf_counter() - started,
    }


def _curve_task(args):
    preset, setup_name, setup, mini_sequence = args
    from minis.planner import predict_peak

    points = []
    for length in CURVE_LENGTHS:
        estimate = predict_peak(preset, length, setup, mini_sequence=mini_sequence)
        points.append({"seq": length, "peak": estimate.total, "components": estimate.components})
    return {"preset": preset, "setup": setup_name, "grad_ckpt": setup.grad_ckpt,
            "checkpointing": _checkpointing(setup), "minis": mini_sequence, "points": points}


def run(presets, jobs: int):
    from minis.planner import parse_memory_size

    gpu_mem = parse_memory_size(GPU_MEM_TEXT)
    grid = []
    curves = []
    for preset in presets:
        for name, setup in setups().items():
            for label, (ckpt, offload) in CHECKPOINTING.items():
                if offload and name == "full, 1 GPU":
                    continue  # weights, gradients and optimizer state alone exceed the GPU; offload cannot help
                configured = replace(setup, grad_ckpt=ckpt, offload_activations=offload)
                for mini_sequence in (False, True):
                    grid.append((preset, name, configured, mini_sequence, gpu_mem))
                    if name != "full, 1 GPU":
                        curves.append((preset, name, configured, mini_sequence))
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        found = list(pool.map(_max_seq_task, grid))
        points = list(pool.map(_curve_task, curves))
    return {
        "gpu_mem": GPU_MEM_TEXT,
        "granularity": GRANULARITY,
        "setups": {name: asdict(setup) for name, setup in setups().items()},
        "max_seq": found,
        "curves": points,
        "seconds": time.perf_counter() - started,
        "jobs": jobs,
    }


def _label(result) -> str:
    """The checkpointing label of a result (results written before offload existed carry only `grad_ckpt`)."""
    return result.get("checkpointing", "yes" if result["grad_ckpt"] else "no")


def _tokens(n):
    return "does not fit" if not n else f"{n:,}"


def table(results) -> str:
    rows = ["| model | setup | grad. ckpt | upstream | minis | minis / upstream | minis' host RAM |",
            "|---|---|---|---:|---:|---:|---:|"]
    index = {(r["preset"], r["setup"], _label(r), r["minis"]): r for r in results["max_seq"]}
    presets = list(dict.fromkeys(r["preset"] for r in results["max_seq"]))
    for preset in presets:
        for name in results["setups"]:
            for label in CHECKPOINTING:
                up = index.get((preset, name, label, False))
                ms = index.get((preset, name, label, True))
                if up is None or ms is None:
                    continue
                factor = f"{ms['max_seq'] / up['max_seq']:.2f}x" if up["max_seq"] else "-"
                host = ms.get("host_bytes") if label == "yes + offload" else None
                host_text = f"{host / (1 << 30):.0f} GiB" if host else "-"
                rows.append(f"| {preset} | {name} | {label} | {_tokens(up['max_seq'])} | "
                            f"{_tokens(ms['max_seq'])} | {factor} | {host_text} |")
    return "\n".join(rows)


def checkpointed_gains_text(results) -> str:
    """Per preset, the range of minis' gain (longest sequence, minis / upstream) over its checkpointed setups."""
    index = {(r["preset"], r["setup"], _label(r), r["minis"]): r["max_seq"] for r in results["max_seq"]}
    parts = []
    for preset in dict.fromkeys(r["preset"] for r in results["max_seq"]):
        gains = [index[(preset, name, "yes", True)] / index[(preset, name, "yes", False)]
                 for name in results["setups"]
                 if index.get((preset, name, "yes", False)) and index.get((preset, name, "yes", True))]
        if gains:
            low, high = min(gains), max(gains)
            parts.append(f"{preset} {low:.1f}x" if f"{low:.1f}" == f"{high:.1f}" else f"{preset} {low:.1f}-{high:.1f}x")
    return ", ".join(parts)


def plots(results) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    os.makedirs(IMAGES, exist_ok=True)
    written = []
    presets = list(dict.fromkeys(c["preset"] for c in results["curves"]))
    names = list(dict.fromkeys(c["setup"] for c in results["curves"]))
    budget = float(results["gpu_mem"].rstrip("GiB"))
    for preset in presets:
        figure, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
        for axis, name in zip(axes[0], names):
            for curve in results["curves"]:
                if curve["preset"] != preset or curve["setup"] != name:
                    continue
                xs = [p["seq"] / 1024 for p in curve["points"]]
                ys = [p["peak"] / (1 << 30) for p in curve["points"]]
                checkpointing = _label(curve)
                label = ("minis" if curve["minis"] else "upstream") + {
                    "no": "", "yes": ", grad. ckpt", "yes + offload": ", grad. ckpt + offload"}[checkpointing]
                axis.plot(xs, ys, marker="o", color="tab:green" if curve["minis"] else "tab:red",
                          linestyle={"no": "-", "yes": "--", "yes + offload": ":"}[checkpointing], label=label)
            axis.axhline(budget, color="gray", linewidth=1)
            axis.text(xs[0], budget * 1.03, f"{results['gpu_mem']} budget", color="gray", fontsize=8)
            axis.set_xscale("log", base=2)
            axis.set_yscale("log", base=2)
            axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.set_xticks(xs, [f"{int(x)}K" for x in xs])
            axis.set_xlabel("sequence length (tokens)")
            axis.set_ylabel("predicted peak per GPU (GiB)")
            axis.set_title(f"{preset}: {name}")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        figure.tight_layout()
        path = os.path.join(IMAGES, f"peak_vs_seq_{preset}.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def full_fine_tuning_state_text(presets) -> str:
    """What weights + gradients + AdamW moments (12 bytes per parameter in pure bf16) take for each preset."""
    import torch
    from transformers import AutoModelForCausalLM

    from minis.planner import load_model_config

    parts = []
    for preset in presets:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(load_model_config(preset))
        parameters = sum(p.numel() for p in model.parameters())
        parts.append(f"{preset} {12 * parameters / 2**30:.0f} GiB")
    return ", ".join(parts)


def write_doc(results, images) -> None:
    with open(os.path.join(HERE, "benchmarks_template.md"), encoding="utf-8") as handle:
        template = handle.read()
    pictures = "\n\n".join(f"![{os.path.basename(p)}](images/{os.path.basename(p)})" for p in images)
    minutes = results["seconds"] / 60
    text = (template.replace("{{TABLE}}", table(results))
            .replace("{{PLOTS}}", pictures)
            .replace("{{GPU_MEM}}", results["gpu_mem"])
            .replace("{{GRANULARITY}}", str(results["granularity"]))
            .replace("{{CHECKPOINTED_GAINS}}", checkpointed_gains_text(results))
            .replace("{{FULL_FT_STATE}}", full_fine_tuning_state_text(
                dict.fromkeys(r["preset"] for r in results["max_seq"])))
            .replace("{{RUNTIME}}", f"{minutes:.0f} minutes with {results['jobs']} worker processes"))
    text = text.rstrip("\n") + "\n" + _step_cost_section()
    with open(DOC, "w", encoding="utf-8") as handle:
        handle.write(text)


def _step_cost_section() -> str:
    """The section `benchmarks/cost.py --write-doc` keeps in the same page, carried over unchanged (or nothing)."""
    from cost import read_section  # benchmarks/ is the script directory, so on sys.path

    section = read_section(DOC)
    return "" if section is None else "\n" + section + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="llama-3-8b only; prints the table, writes nothing")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--from-results", action="store_true",
                        help="rewrite docs and plots from benchmarks/results/max_seq.json without recomputing")
    args = parser.parse_args(argv)
    from minis.presets import PRESET_NAMES

    if args.from_results:
        with open(RESULTS, encoding="utf-8") as handle:
            results = json.load(handle)
    else:
        results = run(["llama-3-8b"] if args.quick else list(PRESET_NAMES), args.jobs)
    print(table(results))
    print(f"({results['seconds'] / 60:.1f} minutes)")
    if args.quick:
        return 0
    if not args.from_results:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    write_doc(results, plots(results))
    print(f"wrote {RESULTS}, {DOC} and the plots in {IMAGES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from transformers import TrainerCallback

from .families import FAMILIES, FAMILY_NAMES

__all__ = ["build_parser", "main", "make_blocks", "run", "run_child"]

LOSS_RTOL = 1e-4  # fp32 chunking changes only summation order: a larger difference is a bug
MIB = 1 << 20


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones of flags and optional paths."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minis demo",
        description="Train a small model (built from a config, random weights, fp32, CPU) with HF Trainer twice, "
        "with minis and with MINIS=0, on the same data, and compare per-step losses, peak memory and tokens/s.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--model-type", choices=FAMILY_NAMES, default="llama", help="model family")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step")
    parser.add_argument("--hidden-size", type=int, default=256, help="model width")
    parser.add_argument("--intermediate-size", type=int, default=1024, help="MLP width")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (must divide --hidden-size)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="size of the BPE vocabulary trained here")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant)")
    parser.add_argument("--seed", type=int, default=0, help="weights, data order (the same in both runs)")
    parser.add_argument("--grad-ckpt", action="store_true", help="turn on gradient checkpointing in both runs")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="keep the data, tokenizer and results (demo_result.json) in this folder (default: a temporary "
        "folder, removed at the end)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout (progress on stderr)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("seq_len", "steps", "batch_size", "hidden_size", "intermediate_size", "layers", "heads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seq_len < 2:
        parser.error("--seq-len must be at least 2 (a causal LM predicts the next token)")
    if args.hidden_size % args.heads:
        parser.error(f"--heads {args.heads} does not divide --hidden-size {args.hidden_size}")
    if args.lr <= 0:
        parser.error("--lr must be positive")


def make_blocks(ids: list[int], seq_len: int, num_blocks: int, bos_id: int, eos_id: int):
    """`num_blocks` rows of `seq_len` tokens, cut one after another from bos + ids + eos, repeated as needed.

    Returns:
        A (num_blocks, seq_len) int64 tensor.
    """
    if not ids:
        raise ValueError("the tokenized text is empty")
    document = [bos_id, *ids, eos_id]
    needed = seq_len * num_blocks
    repeats = math.ceil(needed / len(document))
    stream = torch.tensor(document, dtype=torch.int64).repeat(repeats)[:needed]
    return stream.view(num_blocks, seq_len).clone()


def _model_config_overrides(args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    """Fields given to `minis.testing.tiny_config` (which holds each family's other small settings)."""
    head_dim = args.hidden_size // args.heads
    overrides: dict[str, Any] = {
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": args.seq_len,
        "use_cache": False,  # training: a KV cache only costs memory
    }
    sized = {"head_dim": head_dim, "half_seq": max(1, args.seq_len // 2)}
    for name, source in FAMILIES[args.model_type].scaled_fields.items():
        overrides[name] = sized[source]
    return overrides


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _log(message: str, to_stderr: bool) -> None:
    print(message, file=sys.stderr if to_stderr else sys.stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns 0 when both runs train the same model, 1 otherwise (2 for bad arguments)."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_request:  # argparse exits; the CLI wants a return code
        return int(exit_request.code or 0)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Runs the demo on parsed options (`build_parser()`'s); the exit code as `main`'s."""
    try:
        _check_args(build_parser(), args)
    except SystemExit as exit_request:  # parser.error: the message is printed, the code is 2
        return int(exit_request.code or 0)

    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        print("minis demo: HF Trainer needs accelerate, which is not installed; run "
              "`pip install 'minis[demo]'` (or `pip install 'accelerate>=1.1'`)", file=sys.stderr)
        return 2

    started = time.perf_counter()
    quiet = args.json  # progress goes to stderr so that stdout holds only the JSON
    keep_output = args.output_dir is not None
    output_dir = os.path.abspath(args.output_dir) if keep_output else tempfile.mkdtemp(prefix="minis-demo-")
    os.makedirs(output_dir, exist_ok=True)
    try:
        result = _run_demo(args, output_dir, quiet)
    finally:
        if not keep_output:
            shutil.rmtree(output_dir, ignore_errors=True)
    if result is None:
        return 1
    result["demo_seconds"] = time.perf_counter() - started
    if keep_output:
        with open(os.path.join(output_dir, "demo_result.json"), "w", encoding="utf-8") as file:
            json.dump(result, file, indent=2)
    if args.json:
        print(json.dumps(result, indent=2), flush=True)
    else:
        print(format_report(result), flush=True)
    return 0 if result["ok"] else 1


def _run_demo(args: argparse.Namespace, output_dir: str, quiet: bool) -> dict[str, Any] | None:
    from .tokenizer import load_corpus_text, train_tokenizer

    text = load_corpus_text()
    tokenizer = train_tokenizer(args.vocab_size)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    num_blocks = args.steps * args.batch_size
    blocks = make_blocks(ids, args.seq_len, num_blocks, tokenizer.bos_token_id, tokenizer.eos_token_id)
    vocab_size = len(tokenizer)
    tokenizer.save_pretrained(os.path.join(output_dir, "tokenizer"))
    data_path = os.path.join(output_dir, "blocks.pt")
    torch.save(blocks, data_path)

    overrides = _model_config_overrides(args, vocab_size)
    setup = {
        "model_type": args.model_type,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "layers": args.layers,
        "heads": args.heads,
        "vocab_size": vocab_size,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
        "grad_ckpt": args.grad_ckpt,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "corpus_bytes": len(text.encode("utf-8")),
        "corpus_tokens": len(ids),
        "corpus_repeats": round(num_blocks * args.seq_len / (len(ids) + 2), 2),
    }
    used = num_blocks * args.seq_len
    share = (
        f"the corpus {setup['corpus_repeats']:g} times over"
        if used > len(ids) + 2
        else f"{used / (len(ids) + 2):.0%} of the corpus"
    )
    _log(
        f"minis demo: {args.model_type}, hidden {args.hidden_size}, intermediate {args.intermediate_size}, "
        f"{_plural(args.layers, 'layer')}, {_plural(args.heads, 'head')}, vocab {vocab_size}; "
        f"seq {args.seq_len} x batch {args.batch_size}, {args.steps} steps, fp32 on CPU "
        f"({setup['torch_threads']} threads)" + (", gradient checkpointing" if args.grad_ckpt else ""),
        quiet,
    )
    _log(
        f"data: BPE tokenizer trained on the shipped corpus ({setup['corpus_bytes'] / 1000:.1f} KB -> "
        f"{len(ids)} tokens), cut into {num_blocks} blocks of {args.seq_len} tokens ({used} tokens: {share})",
        quiet,
    )

    runs = {}
    for index, (label, minis_on) in enumerate((("with_minis", True), ("without_minis", False)), start=1):
        title = "with minis (MINIS=1)" if minis_on else "without minis (MINIS=0, upstream transformers)"
        _log(f"[{index}/2] training {title}", quiet)
        spec = {
            "label": label,
            "minis": minis_on,
            "model_type": args.model_type,
            "config": overrides,
            "data_path": data_path,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "grad_ckpt": args.grad_ckpt,
            "run_dir": os.path.join(output_dir, label),
            "result_path": os.path.join(output_dir, f"{label}.json"),
        }
        run = _launch_child(spec, quiet)
        if run is None:
            _log(f"minis demo: the run {title} failed (its output is above)", True)
            return None
        if run["is_active"] != minis_on:
            _log(
                f"minis demo: minis.is_active(model) is {run['is_active']} in the run {title}, expected {minis_on}. "
                + (
                    "Is minis installed in this Python (`pip install -e .` puts its start-up hook minis.pth in "
                    "site-packages)?"
                    if minis_on
                    else "MINIS=0 did not turn minis off."
                ),
                True,
            )
            return None
        runs[label] = run
    return compare_runs(setup, runs["with_minis"], runs["without_minis"])


def _launch_child(spec: dict[str, Any], quiet: bool) -> dict[str, Any] | None:
    """Runs `run_child` in a fresh interpreter with MINIS set for this run; returns its result, None on failure."""
    os.makedirs(spec["run_dir"], exist_ok=True)
    spec_path = os.path.join(spec["run_dir"], "spec.json")
    with open(spec_path, "w", encoding="utf-8") as file:
        json.dump(spec, file, indent=2)
    env = dict(os.environ)
    env["MINIS"] = "1" if spec["minis"] else "0"  # whatever the user's shell says
    # Kineto prints a line at every profiler start and stop at its default level; 6 keeps it quiet.
    env.setdefault("KINETO_LOG_LEVEL", "6")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The Trainer imports DeepSpeed when it is installed, which warns that it found no GPU; this demo is CPU-only.
    env.setdefault("DS_ACCELERATOR", "cpu")
    code = "import sys; from minis.demo import run_child; sys.exit(run_child(sys.argv[1]))"
    # In JSON mode the child's prints join the progress on stderr (fd 2) so that stdout holds only the JSON.
    command = [sys.executable, "-c", code, spec_path]
    completed = subprocess.run(command, env=env, stdout=2 if quiet else None, check=False)
    if completed.returncode != 0 or not os.path.exists(spec["result_path"]):
        return None
    with open(spec["result_path"], encoding="utf-8") as file:
        return json.load(file)


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


# ---------------------------------------------------------------------------------------------------------------
# The child: one training run, in its own interpreter.


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _quiet_known_warnings() -> None:
    import warnings

    # Harmless here: no hub, no checkpoint, CPU on purpose.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    warnings.filterwarnings("ignore", message=".*Memory block of unknown size.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def run_child(spec_path: str) -> int:
    """One training run (called in a child process by the demo): trains and writes the result JSON.

    Returns the process exit code.
    """
    with open(spec_path, encoding="utf-8") as file:
        spec = json.load(file)
    _quiet_known_warnings()
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    import minis
    from minis.memory import profile_peak_bytes
    from minis.testing import tiny_config

    blocks = torch.load(spec["data_path"], weights_only=True)
    recorder = _Recorder(tokens_per_step=spec["batch_size"] * blocks.shape[1])
    title = "with minis" if spec["minis"] else "without minis"
    # The whole run is profiled, model construction included, so the memory peak covers everything the run
    # allocates. The profiler costs the same per op in both runs and is small next to these ops.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(spec["seed"])
        config = tiny_config(spec["model_type"], **spec["config"])
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        active = minis.is_active(model)
        print(f"  minis.is_active(model) = {active}", flush=True)
        args = TrainingArguments(
            output_dir=spec["run_dir"],
            per_device_train_batch_size=spec["batch_size"],
            max_steps=spec["steps"],
            learning_rate=spec["lr"],
            lr_scheduler_type="constant",
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=spec["seed"],
            data_seed=spec["seed"],
            dataloader_num_workers=0,
            gradient_checkpointing=spec["grad_ckpt"],
            disable_tqdm=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=_BlockDataset(blocks), callbacks=[recorder])
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_StepProgress(title))
        trainer.train()
        state_tensors = list(model.parameters()) + [
            value for state in trainer.optimizer.state.values() for value in state.values() if torch.is_tensor(value)
        ]
        state_bytes = _tensor_bytes(tensor for tensor in state_tensors if tensor.numel() > 1)
    timed = recorder.step_seconds[1:] or recorder.step_seconds  # the first step warms up kernels and allocators
    result = {
        "label": spec["label"],
        "minis_env": os.environ.get("MINIS"),
        "is_active": active,
        "losses": recorder.losses,
        "grad_norms": recorder.grad_norms,
        "step_seconds": recorder.step_seconds,
        "train_seconds": sum(recorder.step_seconds),
        "tokens_per_s": recorder.tokens_per_step * len(timed) / sum(timed) if sum(timed) > 0 else None,
        "peak_bytes": profile_peak_bytes(prof),
        "state_bytes": state_bytes,
        "parameters": sum(param.numel() for param in model.parameters()),
        # Other processes on the machine slow the steps down; the report shows this so tokens/s can be judged.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    with open(spec["result_path"], "w", encoding="utf-8") as file:
        json.dump(result, file, indent=2)
    return 0


class _BlockDataset(torch.utils.data.Dataset):
    """Rows of a (blocks, seq_len) tensor as causal-LM examples (the model shifts the labels itself)."""

    def __init__(self, blocks) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


class _Recorder(TrainerCallback):
    """Collects each step's loss and grad norm (from the Trainer's logs, unrounded) and wall time."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.losses: list[float] = []
        self.grad_norms: list[float | None] = []
        self.step_seconds: list[float] = []
        self._step_start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._step_start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            norm = logs.get("grad_norm")
            self.grad_norms.append(None if norm is None else float(norm))


class _StepProgress(TrainerCallback):
    """A tqdm bar over the steps with the last loss, instead of the Trainer's bar that prints every log dict."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, desc=f"  {self.title}", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


if __name__ == "__main__":
    sys.exit(main())

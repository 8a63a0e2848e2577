"""`minis demo`'s command line: the parser, the argument checks, the data, and the two training children.

`build_parser` and `run` are separate so that a command line with subcommands can take this parser as a parent
and call `run(args)` on what it parsed; `main(argv)` does both. torch is imported only when a run starts.
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
from typing import TYPE_CHECKING, Any

from ..families import FAMILIES, FAMILY_NAMES
from .report import compare_runs, format_report

if TYPE_CHECKING:
    import torch

__all__ = ["argument_problem", "build_parser", "main", "make_blocks", "run"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones of flags and optional paths."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser(*, add_help: bool = True) -> argparse.ArgumentParser:
    """The demo's argument parser.

    Args:
        add_help: False for a parser used as a parent (`argparse.ArgumentParser(parents=[...])`), whose child
            parser adds its own `-h/--help`.
    """
    parser = argparse.ArgumentParser(
        prog="minis demo",
        add_help=add_help,
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
    parser.add_argument("--grad-ckpt", action="store_true", help="turn on activation checkpointing in both runs")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="keep the data, tokenizer and results (demo_result.json) in this folder (default: a temporary "
        "folder, removed at the end)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout (progress on stderr)")
    return parser


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with parsed demo arguments (naming the flag and the value), or None when they are usable."""
    for name in ("seq_len", "steps", "batch_size", "hidden_size", "intermediate_size", "layers", "heads"):
        value = getattr(args, name)
        if value < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {value}"
    if args.seq_len < 2:
        return f"--seq-len must be at least 2 (a causal LM predicts the next token), got {args.seq_len}"
    if args.hidden_size % args.heads:
        return f"--heads {args.heads} does not divide --hidden-size {args.hidden_size}"
    if args.lr <= 0:
        return f"--lr must be positive, got {args.lr}"
    return None


def make_blocks(ids: list[int], seq_len: int, num_blocks: int, bos_id: int, eos_id: int) -> torch.Tensor:
    """`num_blocks` rows of `seq_len` tokens, cut one after another from bos + ids + eos, repeated as needed.

    Returns:
        A (num_blocks, seq_len) int64 tensor.
    """
    import torch

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
    """Parses `argv` (default: the process's arguments) and runs the demo; returns the exit code (see `run`)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_request:  # argparse exits; the CLI wants a return code
        return int(exit_request.code or 0)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Runs the demo with parsed arguments (from `build_parser`, or a parser that has it as a parent).

    Returns:
        0 when both runs train the same model, 1 when they differ or a run fails, 2 for bad arguments or a
        missing dependency (the message goes to stderr).
    """
    problem = argument_problem(args)
    if problem is not None:
        print(f"minis demo: error: {problem}", file=sys.stderr)
        return 2

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
    import torch

    from ..tokenizer import load_corpus_text, train_tokenizer

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
        f"({setup['torch_threads']} threads)" + (", activation checkpointing" if args.grad_ckpt else ""),
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
    code = "import sys; from minis.demo.child import run_child; sys.exit(run_child(sys.argv[1]))"
    # In JSON mode the child's prints join the progress on stderr (fd 2) so that stdout holds only the JSON.
    command = [sys.executable, "-c", code, spec_path]
    completed = subprocess.run(command, env=env, stdout=2 if quiet else None, check=False)
    if completed.returncode != 0 or not os.path.exists(spec["result_path"]):
        return None
    with open(spec["result_path"], encoding="utf-8") as file:
        return json.load(file)


if __name__ == "__main__":
    sys.exit(main())

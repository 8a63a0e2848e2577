"""Stage 7, command line: `minis plan` (`build_parser`, `run`, `main`).

`minis.cli` mounts `build_parser()` as the `plan` subcommand and calls `run(args)`; `main(argv)` runs it alone. Bad
input exits with code 2 by one of two routes that print the same `minis plan: error: ...` line: argparse's own
error (an unknown option, a value that is not an integer), or a `PlanError` from the planner's validation.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
import re
import sys

from ..presets import PRESET_NAMES
from .inputs import PlanError, TrainingSetup, parse_memory_size
from .report import format_report, plan
from .suggest import format_suggestion, suggest

__all__ = ["build_parser", "main", "normalize_argv", "run"]

PROG = "minis plan"


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def build_parser() -> argparse.ArgumentParser:
    """The `minis plan` options (also the parent of `minis.cli`'s `plan` subcommand)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Predict the peak GPU memory of one training step with "
                                     "and without minis, or the longest sequence that fits.")
    parser.add_argument("--model", required=True,
                        help=f"a preset ({', '.join(PRESET_NAMES)}) or a path to a config.json")
    parser.add_argument("--seq", type=_integer, help="tokens per sequence to predict the peak for")
    parser.add_argument("--max-seq", action="store_true", help="find the longest sequence that fits in --gpu-mem")
    parser.add_argument("--suggest", action="store_true",
                        help="with --seq and --gpu-mem: the cheapest checkpointing/offload setting that fits, with "
                             "the Trainer arguments and config attributes that give it")
    parser.add_argument("--gpu-mem", help="memory of one GPU, e.g. 80GiB (GiB/GB/G/MiB...)")
    parser.add_argument("--host-mem", help="host RAM per rank for offloaded tensors, e.g. 512GiB: the report says "
                        "whether the offloaded checkpoints and optimizer state fit")
    parser.add_argument("--granularity", type=_integer, default=256,
                        help="--max-seq searches multiples of this many tokens (default 256)")
    parser.add_argument("--method", default="full", help="full or lora")
    parser.add_argument("--lora-rank", type=_integer, default=None, help="LoRA rank (default 16)")
    parser.add_argument("--lora-alpha", type=_integer, default=None)
    parser.add_argument("--lora-targets", default=None,
                        help="comma-separated module names, or all-linear (default)")
    parser.add_argument("--dtype", default="bf16", help="bf16 (pure bf16 training) or fp32")
    parser.add_argument("--optimizer", default="adamw", help="adamw (fp32 states), adamw-bf16 or none")
    parser.add_argument("--optimizer-in-backward", action="store_true",
                        help="update each parameter as its gradient lands and free the gradient")
    parser.add_argument("--grad-ckpt", dest="grad_ckpt", action="store_true", default=False,
                        help="gradient (activation) checkpointing of every decoder layer")
    parser.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    parser.add_argument("--every-n-layers", type=_integer, default=1,
                        help="with --grad-ckpt, checkpoint only every N-th decoder layer (default 1: all)")
    parser.add_argument("--offload-activations", action="store_true",
                        help="with --grad-ckpt, keep the checkpointed hidden states in CPU memory "
                             "(activation_checkpointing_enable(offload=True))")
    parser.add_argument("--attn", default="sdpa", help="sdpa, eager or flash (flash-attention 2)")
    parser.add_argument("--batch-size", type=_integer, default=1)
    parser.add_argument("--zero-stage", type=_integer, default=0, help="DeepSpeed ZeRO 0..3")
    parser.add_argument("--fsdp", action="store_true", help="FSDP full sharding (modeled like ZeRO-3)")
    parser.add_argument("--world-size", type=_integer, default=1, help="number of GPUs")
    parser.add_argument("--offload-optimizer", action="store_true", help="optimizer state in CPU memory")
    parser.add_argument("--sp-size", type=_integer, default=1,
                        help="Ulysses sequence parallelism (DeepSpeed ALST): split each sequence over N GPUs of "
                             "--world-size")
    parser.add_argument("--cp-size", type=_integer, default=1,
                        help="context parallelism (accelerate cp_size, with --fsdp): split each sequence over N GPUs "
                             "of --world-size")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs `minis plan` on parsed options; returns the exit code (2 for bad input, with a message naming it)."""
    try:
        if args.suggest:
            return _run_suggest(args)
        report = plan(args.model, seq=args.seq, max_seq=args.max_seq, gpu_mem=_size(args.gpu_mem, "--gpu-mem"),
                      setup=_setup(args), granularity=args.granularity, host_mem=args.host_mem)
    except PlanError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _run_suggest(args: argparse.Namespace) -> int:
    if args.seq is None or args.gpu_mem is None:
        raise PlanError("--suggest needs --seq N and --gpu-mem SIZE (the length to train and the memory of one GPU)")
    if args.max_seq:
        raise PlanError("--suggest and --max-seq answer different questions; give one of them")
    result = suggest(args.model, args.seq, _size(args.gpu_mem, "--gpu-mem"), _setup(args),
                     host_mem=_size(args.host_mem, "--host-mem"))
    if args.json:
        peak = result["peak"]
        print(json.dumps({"fits": result["fits"], "name": result["name"], "setup": asdict(result["setup"]),
                          "peak": peak.to_dict(), "tried": result["tried"], "chunks": result["chunks"]}, indent=2))
    else:
        print(format_suggestion(result))
    return 0 if result["fits"] else 1


def main(argv: list[str] | None = None) -> int:
    """`minis plan ARGS` on its own; returns the exit code (0 for --help, 2 for bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(normalize_argv(list(sys.argv[1:] if argv is None else argv)))
    except SystemExit as exit_request:  # argparse's --help (0) or error (2, message printed)
        return int(exit_request.code or 0)
    return run(args)


_VALUE_OPTIONS = ("--seq", "--gpu-mem", "--host-mem", "--granularity", "--lora-rank", "--lora-alpha", "--batch-size",
                  "--zero-stage", "--world-size", "--every-n-layers", "--sp-size", "--cp-size")


def normalize_argv(argv: list[str]) -> list[str]:
    """`--gpu-mem -3GB` -> `--gpu-mem=-3GB`: argparse would take -3GB for an option and hide the real mistake."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in _VALUE_OPTIONS and index + 1 < len(argv) and re.match(r"-[\d.]", argv[index + 1]):
            joined.append(f"{arg}={argv[index + 1]}")
            index += 2
            continue
        joined.append(arg)
        index += 1
    return joined


def _size(text: str | None, option: str) -> int | None:
    return None if text is None else parse_memory_size(text, option)


def _setup(args: argparse.Namespace) -> TrainingSetup:
    if args.method != "lora" and (args.lora_rank is not None or args.lora_targets is not None
                                  or args.lora_alpha is not None):
        raise PlanError(f"--lora-rank/--lora-alpha/--lora-targets apply to --method lora, not --method {args.method}")
    return TrainingSetup(
        method=args.method,
        lora_rank=16 if args.lora_rank is None else args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=_parse_targets(args.lora_targets),
        dtype=args.dtype,
        optimizer=args.optimizer,
        optimizer_in_backward=args.optimizer_in_backward,
        grad_ckpt=args.grad_ckpt,
        attn=args.attn,
        batch_size=args.batch_size,
        zero_stage=args.zero_stage,
        fsdp=args.fsdp,
        world_size=args.world_size,
        offload_optimizer=args.offload_optimizer,
        offload_activations=args.offload_activations,
        every_n_layers=args.every_n_layers,
        sp_size=args.sp_size,
        cp_size=args.cp_size,
    )


def _parse_targets(text: str | None) -> str | tuple[str, ...]:
    if text is None or text.strip() == "all-linear":
        return "all-linear"
    return tuple(part.strip() for part in text.split(","))

"""Training throughput (tokens/s, MFU) and peak memory of minis vs upstream on a CUDA GPU.

The model is Llama-3-8B-shaped (hidden 4096, intermediate 14336, 32 query / 8 KV heads, vocab 128256) with fewer
decoder layers (4 by default) so that upstream fits at 16K tokens; randomly initialized, pure bf16, SDPA, batch 1,
fused AdamW. For each sequence length and each variant it times `--steps` training steps after `--warmup` steps and
reports tokens/s, MFU, the allocator's peak (`torch.cuda.max_memory_allocated`) and what `minis plan` predicted for
the same step (a GPU check of the planner).

    python benchmarks/throughput.py                       # 8K and 16K, 4 layers
    python benchmarks/throughput.py --layers 8 --seq 8192 16384 32768 --peak-tflops 989

MFU counts model FLOPs only: 6 x (non-embedding parameters + LM head) per token plus causal attention
(6 x layers x seq x hidden per token, i.e. half of the 12 x L x s x h of full attention). minis recomputes the MLP and
the LM head chunk by chunk in its backward; that work is not model FLOPs, so it lowers minis' MFU, which is the honest
way to show its cost. Nothing here has been run by the authors of this file (no GPU was available); see
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "B200": 2250.0}  # dense bf16 tensor-core peaks (SXM parts)


def llama3_shaped_config(layers: int, use_mini_sequence: bool):
    from minis.planner import load_model_config

    config = load_model_config("llama-3-8b")
    config.num_hidden_layers = layers
    config.use_mini_sequence = use_mini_sequence
    return config


def model_flops_per_token(config, seq_len: int) -> float:
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    attn_params = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    mlp_params = 3 * hidden * inter
    matmul_params = layers * (attn_params + mlp_params) + hidden * config.vocab_size  # + LM head
    return 6 * matmul_params + 6 * layers * seq_len * hidden


def run_one(
    seq_len: int, layers: int, use_mini_sequence: bool, steps: int, warmup: int, grad_ckpt: bool, offload: bool
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.cuda.empty_cache()
    config = llama3_shaped_config(layers, use_mini_sequence)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    model.train()
    if grad_ckpt:
        enable_checkpointing(model, offload)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device="cuda")
    batch = {"input_ids": ids, "labels": ids, "use_cache": False}

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        for _ in range(warmup):  # also allocates the optimizer state: later steps are steady state
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / steps
        peak = torch.cuda.max_memory_allocated()
    except torch.cuda.OutOfMemoryError:
        return {"seq": seq_len, "minis": use_mini_sequence, "oom": True}
    finally:
        model = optimizer = batch = None  # free this variant's memory before the next one
        torch.cuda.empty_cache()
    return {"seq": seq_len, "minis": use_mini_sequence, "oom": False, "step_seconds": seconds,
            "tokens_per_s": seq_len / seconds, "flops_per_token": model_flops_per_token(config, seq_len),
            "peak_bytes": peak}


def enable_checkpointing(model, offload: bool) -> None:
    """Non-reentrant checkpointing of every layer; with `offload`, minis' asynchronous offload for the minis
    variant and upstream's `save_on_cpu` for the upstream one (transformers >= 5.23, which has the switch)."""
    from minis.checkpoint_offload import enable_activation_checkpointing, has_activation_checkpointing_names

    if has_activation_checkpointing_names():
        enable_activation_checkpointing(model, {"use_reentrant": False}, offload=offload)
        return
    # Older transformers (the GPU image has 5.17): no offload switch upstream; minis reads its config attribute.
    enable_activation_checkpointing(model, {"use_reentrant": False})
    model.config.mini_sequence_offload = offload


def predicted_peak(seq_len: int, layers: int, use_mini_sequence: bool, grad_ckpt: bool, offload: bool) -> int:
    from minis.planner import TrainingSetup, predict_peak

    config = llama3_shaped_config(layers, use_mini_sequence)
    setup = TrainingSetup(  # torch AdamW: states in the parameters' dtype
        method="full", dtype="bf16", optimizer="adamw-bf16", attn="sdpa", grad_ckpt=grad_ckpt,
        offload_activations=offload,
    )
    return predict_peak(config, seq_len, setup, mini_sequence=use_mini_sequence).total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak (default: looked up from the device name)")
    parser.add_argument("--grad-ckpt", action="store_true",
                        help="activation checkpointing of every layer (non-reentrant), for both variants")
    parser.add_argument("--offload", action="store_true",
                        help="with --grad-ckpt: activation_checkpointing_enable(offload=True) for both variants")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.offload and not args.grad_ckpt:
        parser.error("--offload moves the checkpointed hidden states: add --grad-ckpt")

    import torch

    import minis

    minis.enable()  # also when minis runs from a source tree (PYTHONPATH=src), where no start-up hook is installed
    if not torch.cuda.is_available():
        print("benchmarks/throughput.py needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name()
    peak_tflops = args.peak_tflops
    if peak_tflops is None:
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak_tflops is None:
            print(f"unknown GPU {name!r}: pass --peak-tflops (its dense bf16 peak)", file=sys.stderr)
            return 2
    results = []
    checkpointing = "activation checkpointing" if args.grad_ckpt else "no checkpointing"
    checkpointing += " with offload" if args.offload else ""
    print(f"{name}, Llama-3-8B shape with {args.layers} layers, bf16, SDPA, fused AdamW, batch 1, {checkpointing}")
    print(f"{'seq':>7} {'variant':>9} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'planned GiB':>12}")
    from minis.checkpoint_offload import has_activation_checkpointing_names

    variants = (False, True)
    if args.offload and not has_activation_checkpointing_names():
        print("(upstream skipped: this transformers has no offload switch; it came in 5.23)")
        variants = (True,)
    for seq_len in args.seq:
        for use_mini_sequence in variants:
            result = run_one(
                seq_len, args.layers, use_mini_sequence, args.steps, args.warmup, args.grad_ckpt, args.offload
            )
            result["predicted_peak_bytes"] = predicted_peak(
                seq_len, args.layers, use_mini_sequence, args.grad_ckpt, args.offload
            )
            variant = "minis" if use_mini_sequence else "upstream"
            if result["oom"]:
                print(f"{seq_len:>7} {variant:>9} {'OOM':>10}")
            else:
                mfu = result["tokens_per_s"] * result["flops_per_token"] / (peak_tflops * 1e12)
                result["mfu"] = mfu
                print(f"{seq_len:>7} {variant:>9} {result['tokens_per_s']:>10.0f} {mfu:>7.1%} "
                      f"{result['peak_bytes'] / 2**30:>9.2f} {result['predicted_peak_bytes'] / 2**30:>12.2f}")
            results.append(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": name, "peak_tflops": peak_tflops, "layers": args.layers,
                       "grad_ckpt": args.grad_ckpt, "offload": args.offload, "results": results},
                      handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

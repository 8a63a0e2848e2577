"""Sequence parallelism of size 1 through the real code paths, against no sequence parallelism: loss and peak memory.

    torchrun --nproc_per_node 1 examples/sp/size1_check.py --seq 16384 --layers 4 --json sp_size1.json

One GPU cannot split a sequence, but it can run the code that does with a group of one rank, and so check that
minis composes with it: the same loss as without it, and what it costs in memory. Three modes, each a fresh model
(Llama-3-8B's shapes, `--layers` decoder layers, bf16, activation checkpointing) and one forward/backward
(the backward inside the mode, so the checkpointed layers recompute through it too):

- `none`: the model as is (minis on; `--minis-off` adds the same with minis off);
- `ulysses`: DeepSpeed's `UlyssesSPAttentionHF` (its all-to-alls and position-id gathering, over a one-rank
  group) in place of the attention function, DeepSpeed's `UlyssesSPDataLoaderAdapter` making `shift_labels`, and
  transformers' `deepspeed_sp_compute_loss` combining the loss;
- `cp`: torch's `context_parallel` on a one-rank mesh (buffer sharding and ring attention, CUDA only), FSDP2 on
  each decoder layer, accelerate's attention-mask hooks, and `num_items_in_batch` as HF Trainer passes it.

Prints one line per mode and writes them to `--json`. `--device cpu` runs `none` and `ulysses` on a tiny model
(a smoke test of this script; torch has no CPU ring attention).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import types

import torch


def build_model(args, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.device == "cpu":
        from minis.testing import tiny_config

        config = tiny_config("llama", attn_implementation=args.attn, use_mini_sequence=not args.minis_off)
    else:
        from minis.presets import load_preset

        values = {**load_preset("llama-3-8b"), "num_hidden_layers": args.layers, "max_position_embeddings": args.seq}
        values.pop("torch_dtype", None)
        config = AutoConfig.for_model(**values, attn_implementation=args.attn, use_mini_sequence=not args.minis_off)
    torch.manual_seed(0)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    model.activation_checkpointing_enable()
    model.train()
    return model


def make_batch(args, vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab_size, (1, args.seq), generator=generator)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100  # an SFT-style prompt: the counted tokens are not the whole sequence
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(args.seq).unsqueeze(0)}


def run_none(args, model, batch, group, device):
    batch = {key: value.to(device) for key, value in batch.items()}
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


def run_ulysses(args, model, batch, group, device):
    from accelerate.parallelism_config import ParallelismConfig
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF, UlyssesSPDataLoaderAdapter
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.integrations.deepspeed import deepspeed_sp_compute_loss
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config
    core = ALL_ATTENTION_FUNCTIONS[args.attn]
    ulysses = UlyssesSPAttentionHF(
        attn=core,
        batch_size=1,
        attn_head_count=config.num_attention_heads,
        attn_head_size=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        kv_head_count=config.num_key_value_heads,
        num_hidden_layers=config.num_hidden_layers,
        process_group=group,
        seq_length_is_variable=True,
    )
    ulysses.core_attn_implementation = args.attn

    def sequence_parallel_attention(module, query, key, value, attention_mask, *rest, **kwargs):
        # As DeepSpeed's `register_with_transformers` wrapper: the mask is dropped, causality comes from the kernel.
        CALLS["sequence-parallel attention"] += 1
        return ulysses(module, query, key, value, None, *rest, **kwargs)

    ALL_ATTENTION_FUNCTIONS[args.attn] = sequence_parallel_attention
    try:
        loader = torch.utils.data.DataLoader([batch], batch_size=None)
        adapter = UlyssesSPDataLoaderAdapter(loader, sp_rank=0, sp_group=group, sp_world_size=1, device=device)
        inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in next(adapter).items()}
        # sp_size 1: transformers takes the SP group from the accelerator's mesh (its `sp` dimension).
        mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("sp",))
        accelerator = types.SimpleNamespace(torch_device_mesh={"sp": mesh["sp"]})
        loss = deepspeed_sp_compute_loss(accelerator, model, inputs, False, ParallelismConfig())
        loss.backward()  # inside: the checkpointed layers recompute their attention through Ulysses too
        return loss.detach()
    finally:
        ALL_ATTENTION_FUNCTIONS[args.attn] = core


def run_cp(args, model, batch, group, device):
    from accelerate.big_modeling import _attach_context_parallel_hooks
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("cp",))
    _attach_context_parallel_hooks(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    inputs = {key: value.to(device) for key, value in batch.items()}
    num_items_in_batch = (inputs["labels"][..., 1:] != -100).sum()  # counted before sharding, as Trainer does
    labels = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)
    inputs["shift_labels"] = labels[:, 1:].contiguous()
    buffers = [inputs["input_ids"], inputs["labels"], inputs["shift_labels"], inputs["position_ids"]]
    context = context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1] * 4, no_restore_buffers=set(buffers))
    with context:
        loss = model(**inputs, num_items_in_batch=num_items_in_batch).loss
        loss.backward()
    return loss.detach()


CALLS = {"sequence-parallel attention": 0}
MODES = {"none": run_none, "ulysses": run_ulysses, "cp": run_cp}


def measure(args, mode: str, group, device) -> dict:
    import minis

    model = build_model(args, device)
    batch = make_batch(args, model.config.vocab_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    CALLS["sequence-parallel attention"] = 0
    loss = MODES[mode](args, model, batch, group, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    row = {
        "mode": mode,
        "minis": minis.is_active(model),
        "checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "seq": args.seq,
        "loss": float(loss),
        "ulysses_attention_calls": CALLS["sequence-parallel attention"],
        "seconds": round(time.perf_counter() - start, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None,
    }
    print(json.dumps(row), flush=True)
    del model, loss
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--modes", nargs="+", default=["none", "ulysses", "cp"], choices=list(MODES))
    parser.add_argument("--minis-off", action="store_true", help="run every mode with minis off")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.seq < 2 or args.seq % 2:
        parser.error(f"--seq {args.seq}: must be an even number of tokens (context parallelism splits it in two)")
    if args.device == "cpu" and "cp" in args.modes:
        parser.error("--device cpu: torch's ring attention has no CPU kernel; drop `cp` from --modes")
    import torch.distributed as dist

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    import deepspeed

    if device.type == "cpu":
        # DeepSpeed's CPU backend would JIT-build its shared-memory op (minutes), which only tensor-parallel
        # inference uses; marking it incompatible takes the fallback DeepSpeed itself takes off Linux.
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().get_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    group = dist.new_group([0])
    rows = [measure(args, mode, group, device) for mode in args.modes]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

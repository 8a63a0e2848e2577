"""One rank of a multi-process test (`tests/test_distributed.py` starts two of them over gloo on the CPU).

    python tests/distributed_worker.py SCENARIO OUT_DIR [FAMILY]

The launcher sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Each rank trains a tiny model on its share of a
global batch that every rank (and the test's single-process reference, `reference_run`) derives from the same
seed, and saves what the test compares to OUT_DIR/rank{RANK}.pt. The process group has a short timeout, so a
rank waiting on a collective its peer never makes fails instead of hanging.

Scenarios:
    ddp       DistributedDataParallel; counts every parameter's gradient hooks per backward.
    fsdp2     `fully_shard` on each decoder layer and the root; counts each FSDP group's unshards per step, minis
              on and off.
    uneven    ranks with different sequence lengths and an explicit `mini_sequence_chunk_size`: plain parameters keep
              local chunk counts; ZeRO-3-marked ones with a collective per call (as ZeRO-3's gathering) agree.
    zero3     DeepSpeed ZeRO-3 (CPU accelerator), different sequence lengths, tied or untied LM head. No C++ op is
              built: see `skip_deepspeed_shm_comm_op`.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch

WORLD_BATCH = 4
SEQ_LEN = 48
STEPS = 3
LR = 0.5
# Sequence length of each rank in the scenarios whose ranks differ (chosen so their local chunk counts differ).
UNEVEN_LENGTHS = (48, 29)
UNEVEN_CHUNK_SIZE = 8


def global_batch(vocab_size: int, seed: int = 1234) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (WORLD_BATCH, SEQ_LEN), generator=generator)


def rank_batch(ids: torch.Tensor, rank: int, world_size: int, lengths: tuple[int, ...] | None = None) -> torch.Tensor:
    """Rank `rank`'s rows of the global batch, cut to its sequence length when `lengths` is given."""
    rows = ids.shape[0] // world_size
    part = ids[rank * rows : (rank + 1) * rows]
    return part if lengths is None else part[:, : lengths[rank]]


def make_model(family: str, **overrides):
    from minis.testing import tiny_model

    return tiny_model(family, seed=0, **overrides)


def reference_run(family: str, world_size: int, lengths: tuple[int, ...] | None = None, **overrides) -> dict:
    """The single-process, unchunked run the distributed ranks must reproduce.

    Data-parallel training averages the ranks' gradients, so the reference's loss is the mean of the ranks' losses
    on their shares, computed in one process with minis off.
    """
    model = make_model(family, use_mini_sequence=False, **overrides)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ids = global_batch(model.config.vocab_size)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        batches = [rank_batch(ids, rank, world_size, lengths) for rank in range(world_size)]
        loss = sum(model(input_ids=b, labels=b).loss for b in batches) / world_size
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _mean_over_ranks(value: torch.Tensor) -> float:
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def _count_grad_hooks(model) -> dict[str, list[int]]:
    """Counts each parameter's tensor-hook and post-accumulate-grad-hook calls (one of each per backward)."""
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        counts[name] = [0, 0]

        def on_grad(grad, name=name):
            counts[name][0] += 1

        def on_accumulated(param, name=name):
            counts[name][1] += 1

        param.register_hook(on_grad)
        param.register_post_accumulate_grad_hook(on_accumulated)
    return counts


def run_ddp(rank: int, world_size: int, family: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    import minis

    model = make_model(family)
    assert minis.is_active(model)
    counts = _count_grad_hooks(model)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    ids = rank_batch(global_batch(model.config.vocab_size), rank, world_size)
    losses, per_backward = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        per_backward.append({name: tuple(c) for name, c in counts.items()})
        for c in counts.values():
            c[0] = c[1] = 0
        optimizer.step()
        losses.append(_mean_over_ranks(loss))
    return {"losses": losses, "hook_counts": per_backward, "state": model.state_dict()}


def run_fsdp2(rank: int, world_size: int, family: str) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    import minis

    unshards: dict[str, int] = {}
    original_unshard = FSDPParamGroup.unshard

    def counting_unshard(self, *args, **kwargs):
        # Per FSDP group (a decoder layer, or the root's embedding, norm and LM head).
        name = self._module_fqn or "<root>"
        unshards[name] = unshards.get(name, 0) + 1
        return original_unshard(self, *args, **kwargs)

    FSDPParamGroup.unshard = counting_unshard
    result = {}
    for label, use_mini_sequence in (("on", True), ("off", False)):
        model = make_model(family, use_mini_sequence=use_mini_sequence)
        assert minis.is_active(model) == use_mini_sequence
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        ids = rank_batch(global_batch(model.config.vocab_size), rank, world_size)
        losses, unshards_per_step = [], []
        for _ in range(STEPS):
            unshards.clear()
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            unshards_per_step.append(dict(unshards))
            losses.append(_mean_over_ranks(loss))
        state = {name: value.full_tensor() for name, value in model.state_dict().items()}
        result[label] = {"losses": losses, "unshards": unshards_per_step, "state": state}
    FSDPParamGroup.unshard = original_unshard
    return result


def run_uneven(rank: int, world_size: int, family: str) -> dict:
    """Three runs on ranks with different lengths and an explicit chunk size.

    "local": plain parameters. Nothing inside a chunk communicates, so each rank keeps its own chunk count and minis
    runs no collective of its own. "on" / "off": the MLP projections' parameters carry DeepSpeed's `ds_id` mark (as
    ZeRO-3 partitions them) and a forward pre-hook makes an all-reduce on every call (as ZeRO-3's gathering does):
    minis must make the ranks agree on the chunk count, or the per-call collectives would not pair up.
    """
    import torch.distributed as dist

    from framework_helpers import agreement_spy

    from minis.ops import mlp

    calls = [0]
    seen_bounds: list[int] = []
    original_chunk_bounds = mlp.chunk_bounds

    def collective_per_call(module, args):
        dist.all_reduce(torch.ones(1))
        calls[0] += 1

    def recording_chunk_bounds(seq_len, **kwargs):
        bounds = original_chunk_bounds(seq_len, **kwargs)
        seen_bounds.append(len(bounds))
        return bounds

    result = {}
    for label, use_mini_sequence, zero3_like in (("local", True, False), ("on", True, True), ("off", False, True)):
        model = make_model(family, use_mini_sequence=use_mini_sequence, mini_sequence_chunk_size=UNEVEN_CHUNK_SIZE)
        if zero3_like:
            for index, layer in enumerate(model.model.layers):
                layer.mlp.gate_proj.register_forward_pre_hook(collective_per_call)
                for number, param in enumerate(layer.mlp.parameters()):
                    param.ds_id = 1000 * index + number  # DeepSpeed's mark of a ZeRO-3 parameter (no ds_status)
        calls[0] = 0
        seen_bounds.clear()
        mlp.chunk_bounds = recording_chunk_bounds
        try:
            with agreement_spy() as agreements:
                ids = rank_batch(global_batch(model.config.vocab_size), rank, world_size, UNEVEN_LENGTHS)
                model.train()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
        finally:
            mlp.chunk_bounds = original_chunk_bounds
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        result[label] = {
            "loss": loss.item(),
            "chunk_counts": list(seen_bounds),
            "collectives": calls[0],
            "agreements": len(agreements),
            "grads": grads,
        }
    return result


def run_zero3(rank: int, world_size: int, family: str) -> dict:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    import minis

    assert get_accelerator().device_name() == "cpu", get_accelerator().device_name()
    model = make_model(family, mini_sequence_chunk_size=UNEVEN_CHUNK_SIZE, mini_sequence_loss_chunk_size=16)
    assert minis.is_active(model)
    ids = rank_batch(global_batch(model.config.vocab_size), rank, world_size, UNEVEN_LENGTHS)
    config = {
        "train_micro_batch_size_per_gpu": ids.shape[0],
        "gradient_accumulation_steps": 1,
        # Threshold 0: every parameter, the small LM head and embedding included, is partitioned and gathered.
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "SGD", "params": {"lr": LR}},
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    losses = []
    for _ in range(STEPS):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(_mean_over_ranks(loss))
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return {"losses": losses, "state": state}


SCENARIOS = {"ddp": run_ddp, "fsdp2": run_fsdp2, "uneven": run_uneven, "zero3": run_zero3}


def main() -> None:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    family = sys.argv[3] if len(sys.argv) > 3 else "llama"
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)  # two ranks share the CI machine's two cores
    timeout = datetime.timedelta(seconds=int(os.environ.get("MINIS_TEST_PG_TIMEOUT", "60")))
    if scenario == "zero3":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("LOCAL_RANK", str(rank))
        import deepspeed

        if os.environ.get("MINIS_TEST_DEEPSPEED_SHM", "0") != "1":  # "1": build and use the op, to compare
            from framework_helpers import skip_deepspeed_shm_comm_op

            skip_deepspeed_shm_comm_op()
        deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    import minis

    minis.enable()
    result = SCENARIOS[scenario](rank, world_size, family)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""One rank of a sequence-parallel test (`tests/test_sequence_parallel.py` starts two of them over gloo on the CPU).

    python tests/sequence_parallel_worker.py SCENARIO OUT_DIR MINIS(on|off|broken) [ZERO_STAGE [SLIDING_WINDOW]]

Both scenarios train a tiny Llama for `STEPS` steps on the batches of `sp_batches()`, the sequence split over the
two ranks, and save each step's loss and the final weights to OUT_DIR/rank{RANK}.pt; the test compares them with
`reference_run`, one process on the whole sequences. MINIS chooses minis on, off, or on with a deliberately wrong
loss weighting (`break_loss_weighting`, which shows the test can fail). SLIDING_WINDOW (tokens, 0 for none) makes
the model a Mistral with that `sliding_window`, to show what Ulysses with SDPA does to it.

Scenarios:
    ulysses   DeepSpeed ALST/Ulysses as HF Trainer with `ParallelismConfig(sp_backend="deepspeed", sp_size=2)` runs
              it: `UlyssesSPAttentionHF.register_with_transformers` (sdpa, the real all-to-all over gloo),
              `UlyssesSPDataLoaderAdapter` (shift_labels, sharding), a DeepSpeed engine with the SP `mpu` (ZeRO
              stage ZERO_STAGE, default 0), and transformers' own `deepspeed_sp_compute_loss` for the loss.
    cp        accelerate's context parallelism (`cp_size=2`) as HF Trainer runs it: the batch counted before
              sharding, torch's `context_parallel` sharding the buffers in place (head-tail load balancing),
              FSDP2 over the CP mesh, `num_items_in_batch` and the loss scaled by the number of processes. torch's
              ring attention has no CPU kernel, so attention is the one part replaced: it gathers q/k/v over the
              CP group with a differentiable all-gather and runs causal SDPA on the whole sequence (see
              `gathered_causal_attention`).
    ulysses_memory  the live bytes one attention layer's forward and backward add under DeepSpeed's Ulysses
              attention, against the same layer on the shard alone, for a few head shapes.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch

BATCH = 2
SEQ_LEN = 32  # divisible by 2 * world size: head-tail load balancing under context parallelism
STEPS = 2
LR = 0.5
MLP_CHUNK_SIZE = 4  # several chunks per shard
LOSS_CHUNK_SIZE = 8


def sp_batches(vocab_size: int) -> list[dict[str, torch.Tensor]]:
    """`STEPS` batches whose counted tokens are spread unevenly over the sequence halves.

    Batch 0 ends in padding (label -100), so the second half counts fewer tokens than the first. Batch 1 is an SFT
    example whose prompt (label -100) covers more than the first half: the first half counts no token at all, and
    a per-rank mean loss there is 0/0.
    """
    generator = torch.Generator().manual_seed(4321)
    batches = []
    for step in range(STEPS):
        ids = torch.randint(3, vocab_size, (BATCH, SEQ_LEN), generator=generator)
        labels = ids.clone()
        if step == 0:
            labels[0, -11:] = -100
            labels[1, -3:] = -100
        else:
            labels[:, : SEQ_LEN // 2 + 1] = -100
        position_ids = torch.arange(SEQ_LEN).expand(BATCH, -1).clone()
        batches.append({"input_ids": ids, "labels": labels, "position_ids": position_ids})
    return batches


def make_model(use_mini_sequence: bool, sliding_window: int = 0):
    """The tiny Llama, or with `sliding_window` a tiny Mistral with that window (Mistral is Llama plus the window)."""
    from minis.testing import tiny_model

    family = {"model_type": "mistral", "sliding_window": sliding_window} if sliding_window else {"model_type": "llama"}
    return tiny_model(
        **family,
        seed=0,
        attn_implementation="sdpa",
        use_mini_sequence=use_mini_sequence,
        mini_sequence_chunk_size=MLP_CHUNK_SIZE,
        mini_sequence_loss_chunk_size=LOSS_CHUNK_SIZE,
    )


def reference_run(sliding_window: int = 0) -> dict:
    """One process, minis off, whole sequences: one SGD step per batch on its token-weighted mean loss."""
    model = make_model(use_mini_sequence=False, sliding_window=sliding_window)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for batch in sp_batches(model.config.vocab_size):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def break_loss_weighting() -> None:
    """Makes minis' chunked loss weight every token of the rank's shard, ignored ones included: the sum of the
    chunks' losses is scaled by counted / all tokens, so the loss divides by the shard's token count instead of its
    counted tokens (or `num_items_in_batch`). A test comparing with the whole-sequence run must catch this."""
    from minis.ops import lm_loss

    original = lm_loss.mini_sequence_apply

    def weighted_by_all_tokens(function, tokens, **kwargs):
        loss_sum = original(function, tokens, **kwargs)
        (targets,) = kwargs["extras"]
        return loss_sum * (targets != -100).sum() / targets.numel()

    lm_loss.mini_sequence_apply = weighted_by_all_tokens


def _state(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def run_ulysses(rank: int, world_size: int, zero_stage: int, use_mini_sequence: bool, sliding_window: int) -> dict:
    import deepspeed
    from accelerate.parallelism_config import ParallelismConfig
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF, UlyssesSPDataLoaderAdapter
    from transformers.integrations.deepspeed import deepspeed_sp_compute_loss

    import minis

    model = make_model(use_mini_sequence, sliding_window)
    assert minis.is_active(model) == use_mini_sequence
    # What accelerate's `_prepare_deepspeed` does for `sp_size > 1` (accelerate 1.12+).
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation="sdpa",
        sequence_parallel_size=world_size,
        micro_batch_size=BATCH,
        seq_length_is_variable=True,
        disable_in_eval=True,
    )
    config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default (1.0) would rescale these gradients
        "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "SGD", "params": {"lr": LR}},
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters(), mpu=mpu)
    # Each rank's loader yields its own batch; the adapter gathers them and every rank then runs a shard of each.
    loader = torch.utils.data.DataLoader([sp_batches(model.config.vocab_size)[rank]], batch_size=None)
    adapter = UlyssesSPDataLoaderAdapter(
        loader,
        sp_rank=mpu.get_sequence_parallel_rank(),
        sp_group=mpu.get_sequence_parallel_group(),
        sp_world_size=mpu.get_sequence_parallel_world_size(),
        device=torch.device("cpu"),
    )
    parallelism = ParallelismConfig(sp_backend="deepspeed", sp_size=world_size)
    losses, shards = [], []
    for inputs in adapter:
        # The adapter keeps each shard as a CPU slice of the gathered batch; the Trainer's `_prepare_inputs` copies
        # it to the GPU, which makes it contiguous (upstream's loss `view`s the labels). On the CPU, copy here.
        inputs = {key: value.contiguous() if torch.is_tensor(value) else value for key, value in inputs.items()}
        shards.append({"tokens": inputs["input_ids"].shape[1], "counted": int((inputs["shift_labels"] != -100).sum())})
        # HF Trainer.compute_loss under SP: the model's per-shard loss, combined across the SP group token-weighted.
        loss = deepspeed_sp_compute_loss(None, engine, inputs, False, parallelism)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = _state(model)
    else:
        state = _state(model)
    return {"losses": losses, "state": state, "shards": shards}


def gathered_causal_attention(group, restore_indices: torch.Tensor, sdpa):
    """A transformers attention function for the context-parallel scenario, where torch's ring attention has no
    CPU kernel: gathers the ranks' load-balanced q/k/v shards with a differentiable all-gather, puts the tokens in
    sequence order (`restore_indices`: gathered position of each sequence position, torch's own load balancer's),
    runs causal `sdpa` (the unpatched function) on the whole sequence and returns this rank's rows. It computes what
    ring attention computes, without its memory saving; the mask is ignored, as accelerate's CP hooks drop it."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    rank = dist.get_rank(group)
    sharded_order = torch.argsort(restore_indices)  # sequence position of each gathered position

    def gather(x: torch.Tensor) -> torch.Tensor:  # (batch, heads, local, dim) -> (batch, heads, seq, dim)
        return torch.cat(dist_fn.all_gather(x.contiguous(), group=group), dim=2)[:, :, restore_indices]

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        local = query.shape[2]
        repeats = query.shape[1] // key.shape[1]  # grouped-query attention: expand the kv heads
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        out = sdpa(gather(query), gather(key), gather(value), is_causal=True, scale=scaling)
        mine = sharded_order[rank * local : (rank + 1) * local]
        return out[:, :, mine].transpose(1, 2).contiguous(), None

    return attention


class _TrainerUnderCP:
    """The parts of HF `Trainer` that compute the loss of a training step under context parallelism, run as
    transformers wrote them (`_get_num_items_in_batch`, `_prepare_context_parallel_inputs`, `compute_loss` are
    `Trainer`'s own functions), on the state they read: `TrainingArguments` defaults, a Llama that accepts loss
    kwargs, and an accelerator whose `maybe_context_parallel` is accelerate's, with the `context_parallel` partial
    that accelerate's `_prepare_cp` makes."""

    def __init__(self, mesh, world_size: int) -> None:
        import functools
        import types

        from accelerate import Accelerator
        from accelerate.parallelism_config import ParallelismConfig
        from torch.distributed.tensor.experimental import context_parallel
        from transformers import Trainer

        cls = type(self)
        cls._get_num_items_in_batch = Trainer._get_num_items_in_batch
        cls._prepare_context_parallel_inputs = Trainer._prepare_context_parallel_inputs
        cls.compute_loss = Trainer.compute_loss
        cls.get_cp_size = Trainer.get_cp_size
        cls.get_sp_size = Trainer.get_sp_size

        accelerator = types.SimpleNamespace(
            parallelism_config=ParallelismConfig(cp_size=world_size),
            _cp_context=functools.partial(context_parallel, mesh=mesh),
            num_processes=world_size,
            gather=self._gather,
        )
        accelerator.maybe_context_parallel = functools.partial(Accelerator.maybe_context_parallel, accelerator)
        self.accelerator = accelerator
        self.args = types.SimpleNamespace(average_tokens_across_devices=True, world_size=world_size, n_gpu=0)
        self.model_accepts_loss_kwargs = True
        self.compute_loss_func = None
        self.label_smoother = None
        self._loss_shifts_labels = True

    @staticmethod
    def _gather(tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    def get_tp_size(self) -> int:
        return 1

    def training_step_loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What `Trainer` does from a batch to `accelerator.backward(loss)` (one micro-batch, no accumulation)."""
        num_items_in_batch = self._get_num_items_in_batch([batch], torch.device("cpu"))
        cp_context, inputs = self._prepare_context_parallel_inputs(model, batch)
        with cp_context():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            loss.backward()
        return loss


def run_cp(rank: int, world_size: int, zero_stage: int, use_mini_sequence: bool, sliding_window: int) -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F
    from accelerate.big_modeling import _attach_context_parallel_hooks
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import _create_default_load_balancer
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import minis

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    load_balancer = _create_default_load_balancer(SEQ_LEN, world_size, "cpu")
    assert load_balancer is not None, "SEQ_LEN must be divisible by 2 * world size for head-tail load balancing"
    restore_indices = load_balancer._generate_indices(restore=True)[0]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = gathered_causal_attention(
        mesh.get_group(), restore_indices, F.scaled_dot_product_attention
    )
    model = make_model(use_mini_sequence, sliding_window)
    assert minis.is_active(model) == use_mini_sequence
    _attach_context_parallel_hooks(model)  # what accelerate's `_prepare_cp` does (it refuses sliding windows)
    # FSDP2 over the CP ranks, as accelerate shards over its `dp_shard_cp` mesh (here the CP mesh alone).
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    trainer = _TrainerUnderCP(mesh, world_size)
    model.train()
    losses, shards = [], []
    for batch in sp_batches(model.config.vocab_size):  # every CP rank of a group gets the same batch
        batch = {key: value.clone() for key, value in batch.items()}
        optimizer.zero_grad()
        loss = trainer.training_step_loss(model, batch)
        shards.append({"tokens": batch["input_ids"].shape[1], "counted": int((batch["shift_labels"] != -100).sum())})
        optimizer.step()
        # Trainer logs the mean of the ranks' losses, each scaled by the number of processes.
        logged = loss.detach().clone()
        dist.all_reduce(logged)
        losses.append(logged.item() / world_size)
    state = {name: value.full_tensor() for name, value in model.state_dict().items()}
    return {"losses": losses, "state": state, "shards": shards}


# (heads, kv heads) of the attention shapes whose Ulysses exchange memory is measured; 8 heads over 1 kv head makes
# DeepSpeed repeat the kv head for the second rank.
MEMORY_SHAPES = ((4, 2), (4, 4), (8, 1))
MEMORY_SEQ_LEN, MEMORY_HEAD_DIM = 256, 16


def run_ulysses_memory(rank: int, world_size: int, zero_stage: int, use_mini_sequence: bool, sliding_window: int):
    """Bytes that one attention layer's forward and backward hold at their peak, with DeepSpeed's Ulysses attention
    on this rank's shard, minus the same layer run on the shard alone (the single-GPU step at the shard's length),
    per shape of `MEMORY_SHAPES` (fp32): what `minis.sequence_parallel.ulysses_exchange_bytes` models."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as sp_state
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from minis.memory import LiveStorageTracker
    from minis.testing import tiny_model

    sp_state.initialize_sequence_parallel(sequence_parallel_size=world_size)
    group = sp_state.get_sequence_parallel_group()
    local = MEMORY_SEQ_LEN // world_size
    core = ALL_ATTENTION_FUNCTIONS["sdpa"]
    rows = []
    for heads, kv_heads in MEMORY_SHAPES:
        hidden_size = heads * MEMORY_HEAD_DIM
        model = tiny_model("llama", attn_implementation="sdpa", num_attention_heads=heads, num_key_value_heads=kv_heads,
                           head_dim=MEMORY_HEAD_DIM, hidden_size=hidden_size, num_hidden_layers=1)  # fmt: skip
        ulysses = UlyssesSPAttentionHF(attn=core, batch_size=1, attn_head_count=heads, attn_head_size=MEMORY_HEAD_DIM,
                                       kv_head_count=kv_heads, num_hidden_layers=1, process_group=group,
                                       seq_length_is_variable=True)  # fmt: skip
        attention = model.model.layers[0].self_attn

        def peak(positions: torch.Tensor) -> int:
            hidden = torch.randn(1, local, hidden_size, requires_grad=True)
            position_embeddings = model.model.rotary_emb(hidden, positions)
            tracker = LiveStorageTracker()
            with tracker:
                out, _ = attention(hidden, position_embeddings=position_embeddings, attention_mask=None,
                                   position_ids=positions)  # fmt: skip
                out.sum().backward()
            return tracker.peak_bytes

        # As DeepSpeed's registered wrapper: the mask is dropped, the kernel is causal over the gathered sequence.
        ALL_ATTENTION_FUNCTIONS["sdpa"] = lambda module, q, k, v, mask, *args, **kwargs: ulysses(
            module, q, k, v, None, *args, **kwargs
        )
        try:
            sharded = peak(torch.arange(rank * local, (rank + 1) * local).unsqueeze(0))
        finally:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = core
        alone = peak(torch.arange(local).unsqueeze(0))
        rows.append({"heads": heads, "kv_heads": kv_heads, "extra_bytes": sharded - alone})
    return {"memory": rows}


SCENARIOS = {"ulysses": run_ulysses, "cp": run_cp, "ulysses_memory": run_ulysses_memory}


def main() -> None:
    scenario, out_dir, minis_mode = sys.argv[1], sys.argv[2], sys.argv[3]
    zero_stage = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    sliding_window = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=int(os.environ.get("MINIS_TEST_PG_TIMEOUT", "60")))
    if scenario.startswith("ulysses"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        from framework_helpers import skip_deepspeed_shm_comm_op

        skip_deepspeed_shm_comm_op()
        deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    import minis

    minis.enable()
    if minis_mode == "broken":
        break_loss_weighting()
    from framework_helpers import agreement_spy, chunking_spy

    with chunking_spy() as chunked_calls, agreement_spy() as agreements:
        result = SCENARIOS[scenario](rank, world_size, zero_stage, minis_mode != "off", sliding_window)
    result["chunked_calls"] = dict(chunked_calls)
    result["agreements"] = len(agreements)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

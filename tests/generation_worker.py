"""One rank of the multi-process tests of `tests/test_distributed_generation.py` (two ranks over gloo on the CPU).

    python tests/generation_worker.py SCENARIO OUT_DIR

What outside testing found hanging or failing, run as users run it. The process group has a short timeout, so a
rank waiting on a collective its peer never makes fails instead of hanging.

Scenarios:
    rank0_generate   explicit chunk sizes; a training step on both ranks, then only rank 0 generates (the
                     `if is_main_process:` sample pattern) while rank 1 waits at a barrier.
    uneven_generate  explicit chunk sizes; both ranks generate, different numbers of tokens from different prompts.
    short_dropout    automatic chunk counts, a 2-token input (fewer tokens than chunks), LoRA dropout 0.1, DDP.
    zero3_eval       DeepSpeed ZeRO-3, explicit chunk sizes, ranks with different lengths: an eval forward and a
                     no-grad training-mode forward run unchunked, with ZeRO's collectives only.
Each rank saves what the test compares, and counts the all-reduces minis makes (`framework_helpers.agreement_spy`).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
from framework_helpers import agreement_spy, chunking_spy

PROMPT_LEN = 12


def make_model(**overrides):
    from minis.testing import tiny_model

    return tiny_model("llama", seed=0, **overrides)


def prompt(rank: int, length: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(3, 257, (1, length), generator=torch.Generator().manual_seed(100 + rank))


def generated_tokens(model, ids: torch.Tensor, new_tokens: int, minis_on: bool) -> torch.Tensor:
    model.config.use_mini_sequence = minis_on
    model.eval()
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)


def run_rank0_generate(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    with agreement_spy() as agreements:
        model = make_model(mini_sequence_chunk_size=4, mini_sequence_loss_chunk_size=5)
        model.train()
        ids = prompt(rank, 20)
        model(input_ids=ids, labels=ids).loss.backward()
        result = {"agreements_in_training": len(agreements)}
        if rank == 0:
            result["tokens"] = generated_tokens(model, prompt(0), 9, True)
            result["upstream_tokens"] = generated_tokens(model, prompt(0), 9, False)
        dist.barrier()
        result["agreements"] = len(agreements)
    return result


def run_uneven_generate(rank: int, world_size: int) -> dict:
    with agreement_spy() as agreements:
        model = make_model(mini_sequence_chunk_size=3, mini_sequence_loss_chunk_size=5)
        ids = prompt(rank, PROMPT_LEN + 5 * rank)
        new_tokens = 6 + 7 * rank
        return {
            "tokens": generated_tokens(model, ids, new_tokens, True),
            "upstream_tokens": generated_tokens(model, ids, new_tokens, False),
            "agreements": len(agreements),
        }


def run_short_dropout(rank: int, world_size: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    result = {}
    for label, minis_on in (("on", True), ("off", False)):
        model = make_model(use_mini_sequence=minis_on)
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False,
                            target_modules=["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"])
        wrapped = get_peft_model(model, config)
        wrapped.train()
        ddp = DistributedDataParallel(wrapped)
        ids = prompt(rank, 2)
        torch.manual_seed(1234 + rank)
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        result[label] = {
            "loss": loss.item(),
            "grads": {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None},
        }
    return result


def run_zero3_eval(rank: int, world_size: int) -> dict:
    import deepspeed

    model = make_model(mini_sequence_chunk_size=4, mini_sequence_loss_chunk_size=5)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    ids = prompt(rank, 20 + 9 * rank)
    with agreement_spy() as agreements, chunking_spy() as chunked_calls:
        engine.eval()
        with torch.no_grad():
            eval_loss = engine(input_ids=ids, labels=ids).loss.item()
        engine.train()
        with torch.no_grad():
            no_grad_loss = engine(input_ids=ids, labels=ids).loss.item()
        quiet = {"agreements": len(agreements), "chunked_calls": chunked_calls["mlp"]}
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
    return {
        "eval_loss": eval_loss,
        "no_grad_loss": no_grad_loss,
        "quiet": quiet,
        "training_agreements": len(agreements),
        "training_chunked_calls": chunked_calls["mlp"],
    }


SCENARIOS = {
    "rank0_generate": run_rank0_generate,
    "uneven_generate": run_uneven_generate,
    "short_dropout": run_short_dropout,
    "zero3_eval": run_zero3_eval,
}


def main() -> None:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)  # two ranks share two cores
    timeout = datetime.timedelta(seconds=int(os.environ.get("MINIS_TEST_PG_TIMEOUT", "60")))
    if scenario.startswith("zero3"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("LOCAL_RANK", str(rank))
        import deepspeed
        from framework_helpers import skip_deepspeed_shm_comm_op

        skip_deepspeed_shm_comm_op()  # nothing may be compiled during the tests
        deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    import minis

    minis.enable()
    result = SCENARIOS[scenario](rank, world_size)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

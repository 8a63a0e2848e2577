"""One rank of `tests/test_zero_offload.py`: HF Trainer with DeepSpeed ZeRO-Offload, minis on and then off.

    python tests/zero_offload_worker.py CONFIG_JSON OUT_DIR

The launcher sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. The rank passes one of the shipped
`examples/offload/*.json` configs to `TrainingArguments(deepspeed=...)` as a user's `--deepspeed` would, with one
change: `"torch_adam": true` in the optimizer's parameters. DeepSpeed then runs torch's AdamW on the offloaded
(CPU) optimizer state instead of `DeepSpeedCPUAdam`, whose C++ op would have to be compiled, which no test may do;
the update is the same AdamW. Each rank saves its per-step losses, the trained weights (gathered under ZeRO-3), what
DeepSpeed reports about offloading, and how many chunked calls minis made, to OUT_DIR/rank{RANK}.pt.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch

STEPS = 2
# AdamW's step is g / (sqrt(v) + eps): where |g| is near eps, a relative change of 1e-3 in g (the fp32 summation
# order of a gradient that cancels to ~1e-8) moves the update by about 1e-3 of the learning rate. 1e-8 (the default)
# made one down_proj element differ by 8e-7 after two steps; with 1e-6 the update is smooth in g at this tiny
# model's gradient scale, and the comparison measures minis, not Adam's conditioning.
ADAM_EPSILON = 1e-6


def load_config(path: str) -> dict:
    with open(path) as handle:
        config = json.load(handle)
    config["optimizer"]["params"]["torch_adam"] = True
    return config


def build_model(minis_on: bool):
    from framework_helpers import model

    return model("llama", use_mini_sequence=minis_on, mini_sequence_chunk_size=8, mini_sequence_loss_chunk_size=16)


def train(net, config: dict, out_dir: str, minis_on: bool) -> dict:
    import deepspeed
    from framework_helpers import chunking_spy, comparison_args, token_dataset
    from transformers import Trainer, TrainingArguments

    dataset = token_dataset(8, 40, 40, seed=3)
    args = TrainingArguments(**comparison_args(
        os.path.join(out_dir, "on" if minis_on else "off"), max_steps=STEPS, gradient_accumulation_steps=1,
        optim="adamw_torch", learning_rate=1e-3, adam_epsilon=ADAM_EPSILON, deepspeed=config))
    trainer = Trainer(model=net, args=args, train_dataset=dataset)
    with chunking_spy() as chunked:
        trainer.train()
    optimizer = trainer.deepspeed.optimizer
    offload = {
        # ZeRO-1/2 keep one flag; ZeRO-3 one for the optimizer state and one for the parameters.
        "optimizer": bool(getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False)),
        "params": bool(getattr(optimizer, "offload_param", False)),
        "optimizer_class": type(optimizer.optimizer).__name__,
    }
    with deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None):
        state = {name: value.detach().clone() for name, value in net.state_dict().items()}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "state": state, "offload": offload, "chunked": dict(chunked)}


def main() -> None:
    config_path, out_dir = sys.argv[1], sys.argv[2]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)  # two ranks share the CI machine's two cores
    import deepspeed
    from framework_helpers import skip_deepspeed_shm_comm_op

    skip_deepspeed_shm_comm_op()
    timeout = datetime.timedelta(seconds=int(os.environ.get("MINIS_TEST_PG_TIMEOUT", "60")))
    deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
    import minis

    minis.enable()
    config = load_config(config_path)
    # Both models are built before the first TrainingArguments: a ZeRO-3 config makes transformers build every later
    # model under `deepspeed.zero.Init`, which initialises the weights differently.
    models = {True: build_model(True), False: build_model(False)}
    result = {"on": train(models[True], config, out_dir, True), "off": train(models[False], config, out_dir, False)}
    rank = int(os.environ["RANK"])
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

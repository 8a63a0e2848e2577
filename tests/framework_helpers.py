"""What the framework tests (Trainer, TRL, PEFT, LongLoRA script, distributed) share beyond `helpers`: a small
tokenizer and token data, `TrainingArguments` for minis-on/off comparisons, spies on minis' chunked calls and
collectives, and the launcher of multi-process ranks. The numeric comparisons every test uses live in `helpers`
(re-exported here for the framework tests that import them from this module)."""

from __future__ import annotations

import contextlib
import functools
import os
import socket

import pytest
import torch

from helpers import REPO_ROOT

TOKENIZER_VOCAB = 320  # byte-level BPE: 256 bytes, 3 special tokens and a few merges


@functools.cache
def tokenizer():
    """A small byte-level BPE tokenizer trained on the shipped corpus (no hub access)."""
    from minis.tokenizer import train_tokenizer

    return train_tokenizer(TOKENIZER_VOCAB)


def corpus_paragraphs(count: int, min_chars: int = 40) -> list[str]:
    """The first `count` paragraphs of the shipped corpus that have at least `min_chars` characters."""
    from minis.tokenizer import load_corpus_text

    paragraphs = [p.strip() for p in load_corpus_text().split("\n\n") if len(p.strip()) >= min_chars]
    return paragraphs[:count]


def model(family: str = "llama", **overrides):
    """A tiny model whose vocabulary fits `tokenizer()` (same weights for the same arguments)."""
    from minis.testing import tiny_model

    return tiny_model(family, seed=0, vocab_size=TOKENIZER_VOCAB, **overrides)


def token_dataset(count: int, min_len: int, max_len: int, vocab_size: int = TOKENIZER_VOCAB, seed: int = 0):
    """`count` examples of random tokens with lengths in [min_len, max_len] (labels = input_ids)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": list(ids)})
    return examples


def pad_collator(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pads a batch: pad id 2, attention mask 0 and label -100 on the padding."""
    length = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), length), 2, dtype=torch.long)
    labels = torch.full((len(features), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(features), length), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"])
        labels[row, :n] = torch.tensor(feature["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@contextlib.contextmanager
def chunking_spy():
    """Counts the chunked calls minis makes: {"mlp": MLP calls (dense or experts), "loss": LM-head loss calls}.

    Every chunked call goes through `minis.ops.mini_sequence_apply`. Its callers import it by name, so the spy
    replaces it in every loaded minis module that holds it, and tells the kinds apart by the reduction: a loss sums
    its chunks (`reduce="sum"`), an MLP concatenates them. The MLP and the loss return early, unchunked, when minis
    does not apply, so only chunking calls are counted. (A caller that bound the function in a closure, not a
    module attribute, is not seen.)
    """
    import sys

    from minis.ops import mini_sequence

    original = mini_sequence.mini_sequence_apply
    counts = {"mlp": 0, "loss": 0}

    def counting(*args, **kwargs):
        counts["loss" if kwargs.get("reduce") == "sum" else "mlp"] += 1
        return original(*args, **kwargs)

    holders = [
        module
        for name, module in list(sys.modules.items())
        if (name == "minis" or name.startswith("minis.")) and getattr(module, "mini_sequence_apply", None) is original
    ]
    for module in holders:
        module.mini_sequence_apply = counting
    try:
        yield counts
    finally:
        for module in holders:
            module.mini_sequence_apply = original


@contextlib.contextmanager
def agreement_spy():
    """Records the local chunk count of every all-reduce minis makes to agree on chunk counts across ranks
    (`minis.config._agree_on_chunk_count`); yields the list they are appended to."""
    from minis import config

    counts: list[int] = []
    original = config._agree_on_chunk_count

    def recording(local_count, device):
        counts.append(local_count)
        return original(local_count, device)

    config._agree_on_chunk_count = recording
    try:
        yield counts
    finally:
        config._agree_on_chunk_count = original


def comparison_args(output_dir, **overrides) -> dict:
    """`TrainingArguments` (or `SFTConfig`) fields of the minis-on/off comparisons: CPU, seeded, plain SGD with a
    constant learning rate (its update is linear in the gradient), no saving, no logging integrations."""
    return {
        "output_dir": str(output_dir),
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "optim": "sgd",
        "learning_rate": 0.1,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        **overrides,
    }




def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Stands in for the C++ compiler in the ranks: a test that starts a JIT build (of a DeepSpeed op, say) fails at once
# with this name in its log, instead of compiling for minutes inside a timed test.
NO_COMPILER = "no-c++-compiler-during-minis-tests"


def kill_process_groups(processes) -> None:
    """Kills each process with everything it started (each was started as the leader of its own session)."""
    import signal

    for process in processes:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()


def launch_ranks(command: list[str], out_dir, world_size: int = 2, timeout: int = 120, env=None) -> list[dict]:
    """Runs `command` (e.g. `[python, worker.py, scenario, out_dir]`) as `world_size` local ranks over loopback,
    one thread each; returns each rank's saved `out_dir/rank{rank}.pt`, or fails the test with the ranks' output.

    The ranks log to files (a full pipe cannot block them), get an empty torch extensions directory of their own and
    no C++ compiler, so no stale build lock from an earlier, killed run can make them wait and any JIT build fails
    fast. On `timeout` every rank and what it started is killed and the test fails with the ranks' output so far.
    """
    import subprocess
    import time

    port = free_port()
    extensions_dir = os.path.join(out_dir, "torch_extensions")
    processes, logs = [], []
    for rank in range(world_size):
        rank_env = {
            **os.environ,
            **(env or {}),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": extensions_dir,
            "CXX": NO_COMPILER,
        }
        logs.append(open(os.path.join(out_dir, f"rank{rank}.log"), "w+"))
        processes.append(
            subprocess.Popen(
                command,
                env=rank_env,
                cwd=REPO_ROOT,
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_process_groups(processes)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    name = " ".join(os.path.basename(part) for part in command[1:3])
    if timed_out:
        tails = "\n".join(f"--- rank {rank}:\n{output[-2000:]}" for rank, output in enumerate(outputs))
        pytest.fail(f"{name}: the ranks did not finish within {timeout} s (deadlock?), killed:\n{tails}")
    failed = [f"--- rank {rank} failed:\n{output[-4000:]}" for rank, (process, output) in
              enumerate(zip(processes, outputs)) if process.returncode != 0]  # fmt: skip
    assert not failed, f"{name}:\n" + "\n".join(failed)
    built = os.listdir(extensions_dir) if os.path.isdir(extensions_dir) else []
    assert not built, f"{name}: the ranks built C++ extensions {built} during the test"
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False) for rank in range(world_size)]


def skip_deepspeed_shm_comm_op() -> None:
    """Makes DeepSpeed's CPU backend skip its shared-memory communication op, so a test run compiles nothing.

    On the CPU accelerator, DeepSpeed's `TorchBackend` JIT-compiles the C++ op `deepspeed_shm_comm` (about 4
    minutes on 2 cores, under a lock in the torch extensions cache) whenever `deepspeed.ops.__compatible_ops__`
    marks it compatible. The op serves only `inference_all_reduce` (tensor-parallel inference; checked in
    DeepSpeed 0.19's deepspeed/comm/torch.py); ZeRO-3's all-gathers, reduce-scatters and all-reduces go through
    torch.distributed (gloo here) with or without it, so what the zero3 scenario computes and saves is the same
    (bit for bit: checked by running it with MINIS_TEST_DEEPSPEED_SHM=1, which keeps the op). Marking the op incompatible takes the fallback
    DeepSpeed itself takes off Linux: the backend keeps no shm op, and nothing is built or loaded.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().get_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False

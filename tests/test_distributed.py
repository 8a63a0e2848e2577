"""minis under data parallelism: DDP, FSDP2 and DeepSpeed ZeRO-3, two processes over gloo on the CPU.

Each test starts two ranks of `tests/distributed_worker.py` (see its docstring for the scenarios) and compares what
they saved with a single-process, unchunked reference run on the same global batch (`reference_run`). What they
prove:

- DDP and FSDP2 reach the reference's weights (SGD, so the weights agree to fp32 summation order, ~1e-7).
- Every parameter's `register_hook` and `register_post_accumulate_grad_hook` run once per backward under DDP; a
  hook firing per chunk would also make DDP's reducer fail ("marked ready twice").
- FSDP2 unshards (all-gathers) each group as often per step with minis as without: the chunks run inside a
  decoder layer's forward and backward, where FSDP keeps the layer unsharded, and never reshard it in between.
- Ranks whose sequence lengths differ, with an explicit `mini_sequence_chunk_size`, keep their local chunk counts
  with plain parameters (minis runs no collective), and run the same number of chunks when the parameters are
  ZeRO-3's (minis all-reduces the count), so a collective per chunk (ZeRO-3's gathering) cannot deadlock. The
  process group has a 60 s timeout and each rank a bounded wait, so a deadlock fails the test.
- ZeRO-3 (every parameter partitioned, the LM head and tied embedding included) reaches the reference's weights.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from framework_helpers import free_port, kill_process_groups, launch_ranks
from helpers import REPO_ROOT, max_relative_difference

WORKER = os.path.join(REPO_ROOT, "tests", "distributed_worker.py")
WEIGHT_RTOL = 1e-5

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def worker_module():
    sys.path.insert(0, os.path.dirname(WORKER))
    import distributed_worker

    return distributed_worker


def run_or_kill(command: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)`, but on `timeout` it kills the command together with
    the processes it started (torchrun's ranks) and fails the test with the output so far."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_groups([process])
        output, _ = process.communicate()
        pytest.fail(f"{command[:4]}... did not finish within {timeout} s, killed:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def launch(scenario: str, out_dir, family: str = "llama", world_size: int = 2, timeout: int = 120) -> list[dict]:
    """Runs `scenario` of the worker on `world_size` local ranks (see `framework_helpers.launch_ranks`)."""
    return launch_ranks([sys.executable, WORKER, scenario, str(out_dir), family], out_dir, world_size, timeout)


def test_ddp_matches_one_process_and_hooks_fire_once(tmp_path, worker_module):
    ranks = launch("ddp", tmp_path)
    reference = worker_module.reference_run("llama", world_size=2)
    for result in ranks:
        assert max_relative_difference(result["state"], reference["state"]) < WEIGHT_RTOL
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
        for step in result["hook_counts"]:
            assert step and all(counts == (1, 1) for counts in step.values()), step


def test_fsdp2_matches_one_process_without_extra_unshards(tmp_path, worker_module):
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)")
    ranks = launch("fsdp2", tmp_path)
    reference = worker_module.reference_run("llama", world_size=2)
    for result in ranks:
        for label in ("on", "off"):
            assert max_relative_difference(result[label]["state"], reference["state"]) < WEIGHT_RTOL, label
        on, off = result["on"]["unshards"], result["off"]["unshards"]
        assert on == off, (on, off)
        groups = result["on"]["unshards"][0]
        assert {"model.layers.0", "model.layers.1"} <= set(groups), groups
        assert all(count > 0 for count in groups.values()), groups


def test_uneven_lengths_agree_on_chunk_counts_only_under_zero3(tmp_path, worker_module):
    rank0, rank1 = launch("uneven", tmp_path)
    lengths, size = worker_module.UNEVEN_LENGTHS, worker_module.UNEVEN_CHUNK_SIZE
    local_counts = [-(-length // size) for length in lengths]
    assert local_counts[0] != local_counts[1], "the scenario must give the ranks different local chunk counts"
    # Plain parameters: local counts, no collective of minis' own.
    for rank, result in enumerate((rank0, rank1)):
        assert result["local"]["chunk_counts"] == [local_counts[rank]] * 2
        assert result["local"]["agreements"] == 0
    # ZeRO-3-marked parameters with a collective per call: every rank runs the largest count, so they pair up.
    assert rank0["on"]["chunk_counts"] == rank1["on"]["chunk_counts"] == [max(local_counts)] * 2
    assert rank0["on"]["agreements"] == rank1["on"]["agreements"] > 0
    assert rank0["on"]["collectives"] == rank1["on"]["collectives"] > rank0["off"]["collectives"]
    for result in (rank0, rank1):
        for label in ("local", "on"):
            assert max_relative_difference(result[label]["grads"], result["off"]["grads"]) < WEIGHT_RTOL
            assert result[label]["loss"] == pytest.approx(result["off"]["loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"], ids=["untied", "tied", "moe"])
def test_deepspeed_zero3_matches_one_process(tmp_path, worker_module, family):
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        pytest.skip(f"DeepSpeed is not installed ({error}); `DS_BUILD_OPS=0 pip install deepspeed` runs this on CPU")
    ranks = launch("zero3", tmp_path, family=family, timeout=180)
    reference = worker_module.reference_run(family, world_size=2, lengths=worker_module.UNEVEN_LENGTHS)
    for result in ranks:
        assert max_relative_difference(result["state"], reference["state"]) < WEIGHT_RTOL
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_sft_example_under_ddp(tmp_path):
    """examples/sft/train.py, unchanged, as two DDP processes (torchrun, gloo on the CPU)."""
    from framework_helpers import model, tokenizer

    from minis.tokenizer import corpus_path

    checkpoint = tmp_path / "tiny-llama"
    model("llama").save_pretrained(checkpoint)
    tokenizer().save_pretrained(checkpoint)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        os.path.join(REPO_ROOT, "examples", "sft", "train.py"),
        "--model_name_or_path", str(checkpoint), "--data_path", corpus_path(), "--output_dir", str(tmp_path / "out"),
        "--use_peft_lora", "True", "--max_length", "64", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--bf16", "False", "--use_cpu", "True", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = run_or_kill(command, timeout=300, env=env, cwd=REPO_ROOT)
    log = result.stdout
    assert result.returncode == 0, log[-5000:]
    assert log.count("minis active: True") == 2
    assert "MULTI_CPU over 2 process(es)" in log and "DistributedDataParallel" in log
    assert os.path.isfile(tmp_path / "out" / "adapter_model.safetensors")

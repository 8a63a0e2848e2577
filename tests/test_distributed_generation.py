"""minis never runs a collective outside a ZeRO-3 training forward: no hang in rank-0-only or uneven generation.

Two ranks of `tests/generation_worker.py` over gloo on the CPU (see its docstring for the scenarios). Before this
rule, minis all-reduced its chunk count in every forward once a process group existed: rank 0 generating alone
hung in that all-reduce, and ranks generating different numbers of tokens timed out.
"""

from __future__ import annotations

import os

import pytest
import torch
import sys

from framework_helpers import launch_ranks
from helpers import REPO_ROOT

WORKER = os.path.join(REPO_ROOT, "tests", "generation_worker.py")

pytestmark = pytest.mark.multiprocess


def test_only_rank_zero_generates(tmp_path):
    ranks = launch_ranks([sys.executable, WORKER, "rank0_generate", str(tmp_path)], tmp_path, timeout=150)
    assert torch.equal(ranks[0]["tokens"], ranks[0]["upstream_tokens"])
    assert ranks[0]["tokens"].shape[1] == 12 + 9
    for result in ranks:
        assert result["agreements"] == result["agreements_in_training"] == 0, "no ZeRO-3, so no all-reduce"


def test_ranks_generate_different_numbers_of_tokens(tmp_path):
    ranks = launch_ranks([sys.executable, WORKER, "uneven_generate", str(tmp_path)], tmp_path, timeout=150)
    for rank, result in enumerate(ranks):
        assert torch.equal(result["tokens"], result["upstream_tokens"])
        assert result["tokens"].shape[1] == 12 + 5 * rank + 6 + 7 * rank
        assert result["agreements"] == 0


def test_two_tokens_with_lora_dropout_under_ddp(tmp_path):
    """Automatic chunk counts and a 2-token input: fewer tokens than chunks, LoRA dropout, two ranks."""
    pytest.importorskip("peft")
    ranks = launch_ranks([sys.executable, WORKER, "short_dropout", str(tmp_path)], tmp_path, timeout=150)
    for result in ranks:
        assert abs(result["on"]["loss"] - result["off"]["loss"]) <= 1e-6 * abs(result["off"]["loss"])
        assert result["on"]["grads"].keys() == result["off"]["grads"].keys()
        for name, expected in result["off"]["grads"].items():
            # Relative to the gradient's largest entry; some LoRA gradients are zero in exact arithmetic (the one
            # scored token attends to itself alone), so the scale has a floor.
            scale = max(expected.abs().max().item(), 1e-3)
            assert (result["on"]["grads"][name] - expected).abs().max().item() / scale < 1e-5, name


def test_zero3_eval_and_no_grad_forwards_run_no_minis_collective(tmp_path):
    pytest.importorskip("deepspeed")
    ranks = launch_ranks([sys.executable, WORKER, "zero3_eval", str(tmp_path)], tmp_path, timeout=240)
    for result in ranks:
        assert result["quiet"] == {"agreements": 0, "chunked_calls": 0}, "eval/no-grad ZeRO-3 runs unchunked"
        assert result["training_agreements"] > 0, "a ZeRO-3 training forward agrees on the chunk count"
        assert result["training_chunked_calls"] > 0

"""The ZeRO-Offload recipes of `examples/offload/`, run as users run them: HF Trainer with `--deepspeed <config>`,
two ranks over gloo on DeepSpeed's CPU accelerator (see `tests/zero_offload_worker.py` for the one change the test
makes to a config: torch's AdamW in place of DeepSpeed's compiled CPU Adam).

What they prove, for ZeRO-2 with the optimizer state offloaded and ZeRO-3 with optimizer state and parameters
offloaded: DeepSpeed really takes its offload path (its own flags say so), minis chunks the MLP and the loss under it,
and minis on reaches the same per-step losses and the same trained weights as minis off.
"""

from __future__ import annotations

import os
import sys

import pytest
from framework_helpers import launch_ranks
from helpers import REPO_ROOT, max_relative_difference

WORKER = os.path.join(REPO_ROOT, "tests", "zero_offload_worker.py")
CONFIGS = os.path.join(REPO_ROOT, "examples", "offload")
# The weights after two AdamW steps (see ADAM_EPSILON in the worker for why its eps is 1e-6).
WEIGHT_RTOL = 1e-5

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize(
    "config_name, offloads_params",
    [("zero2_offload_optimizer.json", False), ("zero3_offload_all.json", True)],
)
def test_trainer_deepspeed_offload_recipe_matches_minis_off(tmp_path, config_name, offloads_params):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make install-test installs it)")
    ranks = launch_ranks([sys.executable, WORKER, os.path.join(CONFIGS, config_name), str(tmp_path)], tmp_path,
                         world_size=2, timeout=240)
    for rank, result in enumerate(ranks):
        on, off = result["on"], result["off"]
        for run in (on, off):
            assert run["offload"]["optimizer"], f"rank {rank}: DeepSpeed did not offload the optimizer state: {run}"
            assert run["offload"]["params"] == offloads_params, f"rank {rank}: parameter offload {run['offload']}"
        assert on["chunked"]["mlp"] > 0 and on["chunked"]["loss"] > 0, f"rank {rank}: minis did not chunk: {on}"
        assert off["chunked"] == {"mlp": 0, "loss": 0}, f"rank {rank}: the minis-off run chunked: {off}"
        assert len(on["losses"]) == len(off["losses"]) > 0
        for step, (a, b) in enumerate(zip(on["losses"], off["losses"])):
            assert abs(a - b) <= 1e-5 * abs(b), f"rank {rank} step {step}: loss {a} with minis, {b} without"
        worst = max_relative_difference(on["state"], off["state"])
        assert worst < WEIGHT_RTOL, f"rank {rank}: trained weights differ by {worst:.2e} (relative)"

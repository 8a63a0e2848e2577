"""Helpers shared by the tests: a fresh interpreter, relative errors, a random batch, one minis-on/off training step.

The framework tests' own needs (tokenizer, datasets, spies, launching ranks) are in `framework_helpers`.
"""

import os
import subprocess
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter (so start-up files such as minis.pth apply) and returns the result."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO_ROOT
    )


def relative_error(actual, expected) -> float:
    """max|actual - expected| / max|expected|, in float64."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def max_relative_difference(actual: dict, expected: dict) -> float:
    """The largest `relative_error` over the tensors of two dicts with the same keys (0.0 for equal dicts).

    An all-zero expected tensor (a state dict can hold one) is compared absolutely: max|actual - expected|.
    """
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))
    worst = 0.0
    for key, reference in expected.items():
        # max(0.0, nan) is 0.0 in Python: a non-finite tensor would otherwise pass every comparison.
        assert actual[key].isfinite().all() and reference.isfinite().all(), f"{key} holds NaN or inf"
        if reference.abs().max() == 0:
            error = (actual[key].double() - reference.double()).abs().max().item()
        else:
            error = relative_error(actual[key], reference)
        worst = max(worst, error)
    return worst


def random_token_batch(*, seq: int, batch_size: int = 2, vocab: int = 257, seed: int = 0) -> dict:
    """Seeded random token ids from 3 up (past the special tokens), with labels equal to them."""
    input_ids = torch.randint(3, vocab, (batch_size, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def training_step(model, minis_on: bool, **batch):
    """One forward/backward with minis on or off for this model; returns (outputs, {name: gradient})."""
    model.config.use_mini_sequence = minis_on
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads

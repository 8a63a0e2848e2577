"""How much matmul work the MLPs do in one training step, minis against upstream.

A `TorchDispatchMode` sees every aten matmul that actually runs (a recompute stopped before an op never dispatches
it). A matmul belongs to an MLP when one of its operands has an `intermediate_size`-wide dimension (twice that for
Phi-3's fused `gate_up_proj`); no other matmul of the tiny models has one. Its work is counted in *passes*: its
FLOPs divided by those of one whole-sequence projection (`2 * tokens * hidden * intermediate`), so upstream's
forward is 3 passes per layer, its backward 6, and a checkpointed layer's recompute 2 (it stops before
`down_proj`, whose backward needs its input, not its output).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minis.testing import tiny_model

SEQ = 50
BATCH = 2
CHUNK = 10  # 5 chunks per MLP call

aten = torch.ops.aten


class MlpMatmulCounter(TorchDispatchMode):
    """Adds up the FLOPs of the matmuls that touch an MLP-wide dimension."""

    def __init__(self, mlp_widths: set[int]) -> None:
        super().__init__()
        self.mlp_widths = mlp_widths
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet in (aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.baddbmm_):
            accumulating = packet in (aten.addmm, aten.addmm_, aten.baddbmm, aten.baddbmm_)
            left, right = (args[1], args[2]) if accumulating else (args[0], args[1])
            if self.mlp_widths & {*left.shape, *right.shape}:
                batch = left.shape[0] if left.dim() == 3 else 1
                self.flops += 2 * batch * left.shape[-2] * left.shape[-1] * right.shape[-1]
        return out


def mlp_passes(model, minis_on: bool) -> float:
    """MLP matmul passes per decoder layer in one forward and backward of `model`."""
    config = model.config
    model.config.use_mini_sequence = minis_on
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, config.vocab_size, (BATCH, SEQ), generator=generator)
    counter = MlpMatmulCounter({config.intermediate_size, 2 * config.intermediate_size})
    with counter:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    one_pass = 2 * BATCH * SEQ * config.hidden_size * config.intermediate_size
    return counter.flops / one_pass / config.num_hidden_layers


def make_model(family: str, checkpointing: bool):
    model = tiny_model(family, mini_sequence_chunk_size=CHUNK, attn_implementation="eager").train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_checkpointed_step_runs_no_more_mlp_matmuls_than_upstream(family):
    model = make_model(family, checkpointing=True)
    upstream = mlp_passes(model, minis_on=False)
    assert upstream == pytest.approx(3 + 2 + 6)  # forward, recompute up to down_proj, backward
    assert mlp_passes(model, minis_on=True) == pytest.approx(upstream)


def test_without_checkpointing_the_backward_reruns_gate_and_up_only():
    """Unchecked upstream keeps the MLP's intermediates; minis recomputes each chunk's gate and up projections
    (2 passes), never `down_proj`."""
    model = make_model("llama", checkpointing=False)
    upstream = mlp_passes(model, minis_on=False)
    assert upstream == pytest.approx(3 + 6)
    assert mlp_passes(model, minis_on=True) == pytest.approx(upstream + 2)


def test_lora_on_the_mlp_runs_no_more_mlp_matmuls_than_upstream():
    """Frozen projections with adapters on all three (`down_proj` included): the adapters save what they need and
    get their gradients through the kept chunk graphs; the base matmuls run as often as upstream's."""
    from peft import LoraConfig, get_peft_model

    base = make_model("llama", checkpointing=True)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.enable_input_require_grads()
    upstream = mlp_passes(model, minis_on=False)
    got = mlp_passes(model, minis_on=True)
    assert got <= upstream * (1 + 1e-9), (got, upstream)

"""Chunked linear weight gradients summed inside the matmul (`minis.ops.weight_gradients`).

The fused form (`mm`/`addmm` with `out_dtype=float32`) exists on CUDA only; here it runs on fake tensors (what is
dispatched) and, forced onto real CPU tensors, fails and falls back with one warning (the numbers). The bf16 and
fp32 numbers of the path every CPU run takes are compared with autograd's own chunk gradients; tests/test_gpu.py
checks the fused numbers on CUDA.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from minis.ops import mini_sequence_mlp
from minis.ops import weight_gradients
from minis.ops.mini_sequence import chunk_bounds

aten = torch.ops.aten
HIDDEN, INTERMEDIATE, TOKENS, CHUNKS = 16, 48, 30, 3


class Mlp(nn.Module):
    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=bias)
        self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=bias)
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=bias)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def make_mlp(dtype, bias: bool = False) -> Mlp:
    torch.manual_seed(0)
    return Mlp(bias).to(dtype)


def chunked_gradients(mlp: Mlp, x: torch.Tensor) -> dict[str, torch.Tensor]:
    mlp.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = mini_sequence_mlp(mlp.forward, x, module=mlp, num_chunks=CHUNKS)
    out.backward(torch.ones_like(out))
    return {"x": x.grad, **{name: p.grad for name, p in mlp.named_parameters()}}


def autograd_chunk_sums(mlp: Mlp, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each chunk's gradients from plain autograd, parameter gradients summed in fp32 and rounded once: the numbers
    minis gave before the weights' sums moved into the matmul, and those of the CPU path."""
    sums, x_grads = {}, []
    for start, stop in chunk_bounds(x.shape[1], num_chunks=CHUNKS):
        mlp.zero_grad(set_to_none=True)
        chunk = x[:, start:stop].detach().requires_grad_()
        out = mlp(chunk)
        out.backward(torch.ones_like(out))
        x_grads.append(chunk.grad)
        for name, p in mlp.named_parameters():
            grad = p.grad.float() if p.dtype == torch.bfloat16 else p.grad
            sums[name] = grad if name not in sums else sums[name] + grad
    return {"x": torch.cat(x_grads, dim=1), **{n: g.to(mlp.gate_proj.weight.dtype) for n, g in sums.items()}}


def unchunked_gradients(mlp: Mlp, x: torch.Tensor) -> dict[str, torch.Tensor]:
    mlp.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = mlp(x)
    out.backward(torch.ones_like(out))
    return {"x": x.grad, **{name: p.grad for name, p in mlp.named_parameters()}}


def test_bf16_sums_on_cpu_equal_autograd_chunk_gradients_summed_in_fp32():
    mlp = make_mlp(torch.bfloat16)
    x = torch.randn(1, TOKENS, HIDDEN, dtype=torch.bfloat16)
    got, expected = chunked_gradients(mlp, x), autograd_chunk_sums(mlp, x)
    for name in expected:
        assert got[name].dtype == torch.bfloat16, name
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("bias", [False, True])
def test_fp32_gradients_equal_the_unchunked_module(bias):
    mlp = make_mlp(torch.float32, bias=bias)
    x = torch.randn(2, TOKENS, HIDDEN)
    got, expected = chunked_gradients(mlp, x), unchunked_gradients(mlp, x)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_weight_used_by_its_linear_and_directly_gets_both_gradients():
    mlp = make_mlp(torch.float32)

    def forward(x):  # down_proj's weight also used outside the linear: two sources, summed once
        return mlp(x) + x @ mlp.down_proj.weight @ mlp.down_proj.weight.t()

    x = torch.randn(1, TOKENS, HIDDEN, requires_grad=True)
    out = mini_sequence_mlp(forward, x, module=mlp, num_chunks=CHUNKS)
    out.sum().backward()
    chunked = [x.grad, *(p.grad for p in mlp.parameters())]
    mlp.zero_grad(set_to_none=True)
    x.grad = None
    forward(x).sum().backward()
    for got, expected in zip(chunked, [x.grad, *(p.grad for p in mlp.parameters())]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, [a for a in args if isinstance(a, torch.Tensor)]))
        return out


def test_fused_path_on_fake_tensors_sums_in_the_matmul():
    """What CUDA runs (dispatched on fake tensors): per weight, one `mm` with fp32 output for the first chunk and one
    `addmm` into the fp32 sum per further chunk; no separate add over a weight-sized tensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mlp = make_mlp(torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, weight_gradients.fused_fp32_output_simulated("cpu"):
        fakes = {name: mode.from_tensor(p) for name, p in mlp.named_parameters()}
        for name, fake in fakes.items():
            module_name, attr = name.rsplit(".", 1)
            mlp.get_submodule(module_name)._parameters[attr] = nn.Parameter(fake)
        x = torch.empty(1, TOKENS, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
        recorder = OpRecorder()
        with recorder:
            out = mini_sequence_mlp(mlp.forward, x, module=mlp, num_chunks=CHUNKS)
            out.backward(torch.ones_like(out))
    weight_sized = {(INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)}
    first = [f for f, _ in recorder.calls if f == aten.mm.dtype]
    following = [f for f, _ in recorder.calls if f == aten.addmm.dtype_out]
    assert len(first) == 3 and len(following) == 3 * (CHUNKS - 1)
    separate_adds = [f for f, tensors in recorder.calls if f.overloadpacket in (aten.add_, aten.add)
                     and any(tuple(t.shape) in weight_sized for t in tensors)]
    assert separate_adds == []
    for p in mlp.parameters():
        assert p.grad.dtype == torch.bfloat16 and p.grad.shape == p.shape


def test_a_failing_fused_matmul_falls_back_with_one_warning(monkeypatch):
    """Forced onto real CPU tensors the fused op raises (it is CUDA-only): the sums go the separate-add way, with the
    same numbers, and the warning says so once."""
    monkeypatch.setattr(weight_gradients, "_fused_failed", False)
    from minis import _warn

    monkeypatch.setattr(_warn, "_warned", set())
    mlp = make_mlp(torch.bfloat16)
    x = torch.randn(1, TOKENS, HIDDEN, dtype=torch.bfloat16)
    expected = autograd_chunk_sums(mlp, x)
    with weight_gradients.fused_fp32_output_simulated("cpu"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = chunked_gradients(mlp, x)
        chunked_gradients(mlp, x)
    assert len([w for w in caught if "out_dtype" in str(w.message)]) == 1
    assert weight_gradients._fused_failed
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_flop_counter_counts_every_weight_gradient_matmul():
    """FlopCounterMode has no formula for `addmm_`: under it the sums use `mm` + `add_`, so it counts the chunked
    MLP as upstream's 9 passes plus the 2 of the backward's gate/up recompute, exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    mlp = make_mlp(torch.float32)
    x = torch.randn(1, TOKENS, HIDDEN, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = mini_sequence_mlp(mlp.forward, x, module=mlp, num_chunks=CHUNKS)
        out.sum().backward()
    one_pass = 2 * TOKENS * HIDDEN * INTERMEDIATE
    assert counter.get_total_flops() == 11 * one_pass


def test_autocast_keeps_autograds_weight_gradients(monkeypatch):
    """Under autocast the linears keep autograd's path (autocast casts fp32 weights per call)."""
    applied = []
    original = weight_gradients._CaptureLinearInput.apply
    monkeypatch.setattr(weight_gradients._CaptureLinearInput, "apply",
                        staticmethod(lambda *a: applied.append(1) or original(*a)))
    mlp = make_mlp(torch.float32)
    x = torch.randn(1, TOKENS, HIDDEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_gradients(mlp, x)
    assert applied == []
    chunked_gradients(mlp, x)
    assert applied, "without autocast the trainable linears sum their weight gradients in the matmul"
    assert all(grad.dtype == torch.float32 for grad in got.values())


def test_a_linear_with_an_instance_forward_is_left_alone():
    """accelerate's hooks replace a module's `forward` on the instance; minis does not replace it again."""
    mlp = make_mlp(torch.float32)
    calls = []
    original = mlp.down_proj.forward
    mlp.down_proj.forward = lambda t: calls.append(1) or original(t)
    x = torch.randn(1, TOKENS, HIDDEN)
    got = chunked_gradients(mlp, x)
    assert calls  # the instance forward ran (forward chunks and the recompute)
    del mlp.down_proj.forward
    expected = unchunked_gradients(mlp, x)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_linear_output_modified_in_place_gets_the_right_gradients():
    """The caller may change a linear's output in place (`mul_`); the weight's gradient is the matmul result's."""
    mlp = make_mlp(torch.float32)

    def forward(x):
        hidden = mlp.gate_proj(x)
        hidden.mul_(0.5)
        return mlp.down_proj(nn.functional.silu(hidden) * mlp.up_proj(x))

    x = torch.randn(1, TOKENS, HIDDEN, requires_grad=True)
    mini_sequence_mlp(forward, x, module=mlp, num_chunks=CHUNKS).square().sum().backward()
    chunked = [x.grad, *(p.grad for p in mlp.parameters())]
    mlp.zero_grad(set_to_none=True)
    x.grad = None
    forward(x).square().sum().backward()
    for got, expected in zip(chunked, [x.grad, *(p.grad for p in mlp.parameters())]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

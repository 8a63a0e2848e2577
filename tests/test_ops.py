"""Parity of the pure ops against the unchunked computation: outputs, input gradients, every parameter gradient."""

import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from minis.ops import (
    UnreplayableRandomOpError,
    chunk_bounds,
    chunked_causal_lm_loss,
    mini_sequence_apply,
    mini_sequence_mlp,
)

pytestmark = pytest.mark.core


class GatedMLP(nn.Module):
    def __init__(self, hidden=16, intermediate=48, dropout=0.0, bias=True):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.down_proj(self.dropout(F.silu(self.gate_proj(x)) * self.up_proj(self.dropout(x))))


def run_and_grads(fn, module, x):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {name: p.grad.clone() for name, p in module.named_parameters()}


def assert_same_results(got, ref, input_grad_tolerance=1e-6):
    """`run_and_grads` results agree: output 1e-6, input gradient `input_grad_tolerance`, parameter gradients 1e-5."""
    assert relative_error(got[0], ref[0]) < 1e-6
    assert relative_error(got[1], ref[1]) < input_grad_tolerance
    for name in ref[2]:
        assert relative_error(got[2][name], ref[2][name]) < 1e-5, name


@pytest.mark.parametrize("shape", [(2, 13, 16), (29, 16), (1, 127, 16)])
@pytest.mark.parametrize("chunking", [{"num_chunks": 4}, {"chunk_size": 5}, {"num_chunks": 1}, {"chunk_size": 1000}])
def test_mlp_matches_unchunked(shape, chunking):
    torch.manual_seed(0)
    mlp = GatedMLP()
    x = torch.randn(shape)
    ref = run_and_grads(mlp, mlp, x)
    got = run_and_grads(lambda t: mini_sequence_mlp(mlp.forward, t, module=mlp, **chunking), mlp, x)
    assert_same_results(got, ref)


def test_mlp_dropout_replays_unchunked_masks():
    mlp = GatedMLP(dropout=0.3)
    x = torch.randn(3, 37, 16)
    torch.manual_seed(123)
    ref = run_and_grads(mlp, mlp, x)
    torch.manual_seed(123)
    got = run_and_grads(lambda t: mini_sequence_mlp(mlp.forward, t, module=mlp, num_chunks=5), mlp, x)
    # Different masks would differ by O(1); the same masks differ only by matmul blocking.
    assert_same_results(got, ref)
    # The generator ends in the same state: later random draws of the training step are unaffected.
    torch.manual_seed(123)
    mlp(x)
    after_upstream = torch.rand(4)
    torch.manual_seed(123)
    mini_sequence_mlp(mlp.forward, x, module=mlp, num_chunks=5)
    assert torch.equal(torch.rand(4), after_upstream)


def test_other_random_ops_inside_a_chunk_raise():
    mlp = GatedMLP()

    def noisy(t):
        return mlp(t) + torch.randn_like(t)

    with pytest.raises(UnreplayableRandomOpError, match="randn_like"):
        mini_sequence_mlp(noisy, torch.randn(1, 8, 16), module=mlp, num_chunks=2)


@pytest.mark.parametrize("hook_kind", ["register_hook", "post_accumulate"])
def test_parameter_hooks_fire_once_with_the_full_gradient(hook_kind):
    torch.manual_seed(0)
    mlp = GatedMLP()
    x = torch.randn(2, 21, 16, requires_grad=True)
    seen = {name: [] for name, _ in mlp.named_parameters()}
    for name, param in mlp.named_parameters():
        if hook_kind == "register_hook":
            param.register_hook(lambda grad, name=name: seen[name].append(grad.clone()))
        else:
            param.register_post_accumulate_grad_hook(lambda p, name=name: seen[name].append(p.grad.clone()))
    mini_sequence_mlp(mlp.forward, x, module=mlp, num_chunks=7).square().sum().backward()
    chunked = {name: list(grads) for name, grads in seen.items()}
    for grads in seen.values():
        grads.clear()
    mlp.zero_grad(set_to_none=True)
    mlp(x).square().sum().backward()
    for name, grads in chunked.items():
        assert len(grads) == 1, f"{name}: hook fired {len(grads)} times"
        assert relative_error(grads[0], seen[name][0]) < 1e-5


def test_bf16_parameter_gradients_do_not_drift_with_many_chunks():
    """Per-chunk bf16 gradients are summed in fp32: the error against fp32 stays that of one bf16 rounding."""
    torch.manual_seed(0)
    mlp32 = GatedMLP(hidden=64, intermediate=256)
    x32 = torch.randn(1, 1024, 64)
    _, _, exact = run_and_grads(mlp32, mlp32, x32)
    mlp16 = GatedMLP(hidden=64, intermediate=256).to(torch.bfloat16)
    mlp16.load_state_dict(mlp32.state_dict())
    x16 = x32.to(torch.bfloat16)
    _, _, upstream = run_and_grads(mlp16, mlp16, x16)
    _, _, chunked = run_and_grads(lambda t: mini_sequence_mlp(mlp16.forward, t, module=mlp16, num_chunks=64), mlp16, x16)
    for name in exact:
        upstream_error = relative_error(upstream[name], exact[name])
        chunked_error = relative_error(chunked[name], exact[name])
        assert chunked[name].dtype == torch.bfloat16
        assert chunked_error <= 2 * upstream_error + 4e-3, (name, chunked_error, upstream_error)


def test_frozen_parameters_get_no_gradient_and_input_only_gradient_works():
    mlp = GatedMLP()
    mlp.requires_grad_(False)
    mlp.down_proj.weight.requires_grad_(True)
    x = torch.randn(2, 9, 16, requires_grad=True)
    mini_sequence_mlp(mlp.forward, x, module=mlp, num_chunks=3).sum().backward()
    assert mlp.gate_proj.weight.grad is None
    assert mlp.down_proj.weight.grad is not None
    assert x.grad is not None


def test_no_grad_and_inference_mode_run_without_autograd():
    mlp = GatedMLP()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        out = mini_sequence_mlp(mlp.forward, x, module=mlp, num_chunks=3)
    assert not out.requires_grad
    with torch.inference_mode():
        assert torch.allclose(mini_sequence_mlp(mlp.forward, x, module=mlp, num_chunks=3), mlp(x), atol=1e-6)


def test_autocast_state_is_restored_in_backward():
    torch.manual_seed(0)
    mlp = GatedMLP()
    x = torch.randn(2, 12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = run_and_grads(mlp, mlp, x)
        got = run_and_grads(lambda t: mini_sequence_mlp(mlp.forward, t, module=mlp, num_chunks=3), mlp, x)
    assert got[0].dtype == torch.bfloat16
    for name in ref[2]:
        assert relative_error(got[2][name], ref[2][name]) < 2e-2, name


def test_parameters_are_restored_after_backward():
    mlp = GatedMLP()
    before = {name: p for name, p in mlp.named_parameters()}
    mini_sequence_mlp(mlp.forward, torch.randn(1, 10, 16, requires_grad=True), module=mlp, num_chunks=3).sum().backward()
    after = dict(mlp.named_parameters())
    assert all(after[name] is param for name, param in before.items())
    assert all(isinstance(param, nn.Parameter) for param in after.values())


def test_checkpointed_chunk_graphs_keep_neither_the_input_nor_the_chunk_outputs():
    """The forward keeps each chunk's graph, not its tensors: under non-reentrant checkpointing the MLP's input
    (made inside the checkpointed layer) and every chunk's output are freed before the backward."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    mlp = GatedMLP()
    storages = []
    recording = mlp.down_proj.register_forward_hook(
        lambda module, args, out: storages.append(StorageWeakRef(out.untyped_storage())))

    def layer(t, chunked):
        h = t * 2.0  # the MLP input: checkpointing frees it after the forward unless something holds it
        if chunked:
            storages.append(StorageWeakRef(h.untyped_storage()))
            return t + mini_sequence_mlp(mlp.forward, h, module=mlp, num_chunks=4)
        return t + mlp(h)

    x = torch.randn(2, 13, 16)
    ref = run_and_grads(lambda t: checkpoint(layer, t, False, use_reentrant=False), mlp, x)

    def chunked(t):
        storages.clear()
        out = checkpoint(layer, t, True, use_reentrant=False)
        recording.remove()
        gc.collect()
        assert len(storages) == 5 and all(ref.expired() for ref in storages)
        return out

    assert_same_results(run_and_grads(chunked, mlp, x), ref)


def test_a_second_backward_through_a_retained_graph_recomputes():
    """The first backward uses up the forward's chunk graphs; the second recomputes the chunks whole."""
    torch.manual_seed(0)
    mlp = GatedMLP()
    x = torch.randn(2, 13, 16)

    def twice(fn):
        mlp.zero_grad(set_to_none=True)
        t = x.clone().requires_grad_(True)
        out = fn(t).square().sum()
        out.backward(retain_graph=True)
        out.backward()
        return t.grad, {name: p.grad.clone() for name, p in mlp.named_parameters()}

    expected = twice(mlp)
    got = twice(lambda t: mini_sequence_mlp(mlp.forward, t, module=mlp, num_chunks=3))
    assert relative_error(got[0], expected[0]) < 1e-6
    for name in expected[1]:
        assert relative_error(got[1][name], expected[1][name]) < 1e-5, name


def test_a_recompute_that_saves_other_tensors_than_the_forward_raises():
    mlp = GatedMLP()
    calls = []

    def changing(t):
        calls.append(1)
        h = mlp.up_proj(t)
        # From the second call of the first chunk on (the backward's recompute), one more op saves its input.
        return mlp.down_proj(h.exp() if len(calls) > 3 else h)

    out = mini_sequence_mlp(changing, torch.randn(2, 9, 16, requires_grad=True), module=mlp, num_chunks=3)
    with pytest.raises(RuntimeError, match="saved different tensors than its forward did"):
        out.sum().backward()


class QuantizedLikeParameter(nn.Parameter):
    """A parameter type from outside torch, as quantization libraries define (bitsandbytes' `Params4bit`)."""


@pytest.mark.parametrize("quantized", [False, True])
def test_the_recompute_stops_inside_down_proj_unless_a_parameter_is_a_library_type(quantized):
    """With kept chunk graphs the backward's recompute stops inside `down_proj`: its forward hook fires in the
    forward only. A module with a parameter type from outside torch (whose autograd functions may keep tensors on
    `ctx`, out of the saved-tensor hooks' reach) takes the two-pass path: the backward reruns each chunk whole."""
    torch.manual_seed(0)
    mlp = GatedMLP()
    x = torch.randn(2, 13, 16)
    ref = run_and_grads(mlp, mlp, x)
    if quantized:
        mlp.up_proj.weight = QuantizedLikeParameter(mlp.up_proj.weight.detach())
    calls = []
    mlp.down_proj.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[-2]))
    got = run_and_grads(lambda t: mini_sequence_mlp(mlp.forward, t, module=mlp, num_chunks=4), mlp, x)
    assert_same_results(got, ref)
    assert calls == [3, 3, 3, 4] * (2 if quantized else 1)


@pytest.mark.parametrize(("softcap", "scaling"), [(None, None), (5.0, None), (None, 8.0)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunking", [{"num_chunks": 6}, {"chunk_size": 7}])
def test_loss_matches_for_causal_lm_loss(softcap, scaling, bias, chunking):
    torch.manual_seed(0)
    vocab, hidden = 61, 16
    head = nn.Linear(hidden, vocab, bias=bias)
    states = torch.randn(3, 17, hidden)
    labels = torch.randint(0, vocab, (3, 17))
    labels[0, :] = -100  # a whole row (hence whole chunks) uncounted
    labels[1, 3:9] = -100

    def upstream(h):
        logits = head(h)
        if scaling is not None:  # Granite
            logits = logits / scaling
        if softcap is not None:  # Gemma-2/3
            logits = torch.tanh(logits / softcap) * softcap
        return ForCausalLMLoss(logits, labels, vocab)

    def chunked(h):
        return chunked_causal_lm_loss(
            h, head, labels, final_logit_softcapping=softcap, logits_scaling=scaling, **chunking
        )

    ref = run_and_grads(upstream, head, states)
    got = run_and_grads(chunked, head, states)
    assert_same_results(got, ref, input_grad_tolerance=1e-5)


def test_loss_num_items_in_batch_and_shift_labels():
    torch.manual_seed(0)
    head = nn.Linear(8, 23, bias=False)
    states = torch.randn(2, 11, 8)
    labels = torch.randint(0, 23, (2, 11))
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    for kwargs in ({"num_items_in_batch": torch.tensor(37)}, {"num_items_in_batch": 37}, {"shift_labels": shifted}):
        expected = ForCausalLMLoss(head(states), labels, 23, **kwargs)
        got = chunked_causal_lm_loss(states, head, labels, num_chunks=4, **kwargs)
        assert relative_error(got, expected) < 1e-6, kwargs


def test_loss_with_every_label_ignored_is_nan_like_upstream():
    head = nn.Linear(8, 23)
    labels = torch.full((1, 5), -100)
    expected = ForCausalLMLoss(head(torch.ones(1, 5, 8)), labels, 23)
    got = chunked_causal_lm_loss(torch.ones(1, 5, 8), head, labels, num_chunks=2)
    assert torch.isnan(expected) and torch.isnan(got)


def test_chunk_bounds():
    assert chunk_bounds(10, num_chunks=4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert chunk_bounds(2, num_chunks=4) == [(0, 0), (0, 1), (1, 1), (1, 2)]
    assert chunk_bounds(10, chunk_size=4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(3, chunk_size=4) == [(0, 3)]


@pytest.mark.parametrize("bad", [0, -3, 2.5, "4", True, None])
def test_chunk_bounds_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="positive int"):
        chunk_bounds(10, chunk_size=bad) if bad is not None else chunk_bounds(10, num_chunks=0)


def test_apply_rejects_bounds_that_do_not_cover_the_input():
    mlp = GatedMLP()
    with pytest.raises(ValueError, match="do not cover"):
        mini_sequence_apply(mlp.forward, torch.randn(1, 10, 16), module=mlp, bounds=[(0, 5)], seq_dim=1)
    with pytest.raises(ValueError, match="reduce"):
        mini_sequence_apply(mlp.forward, torch.randn(1, 10, 16), module=mlp, bounds=[(0, 10)], seq_dim=1, reduce="mean")


@pytest.mark.parametrize("bounds", [[(0, 0), (0, 2)], [(0, 0), (0, 0), (0, 1), (1, 2)]])
def test_empty_leading_chunks_with_dropout_match_unchunked(bounds):
    """Ranks that agreed on more chunks than they have tokens run empty chunks, the first one included."""
    mlp = GatedMLP(dropout=0.1)
    x = torch.randn(1, 2, 16)
    torch.manual_seed(7)
    ref = run_and_grads(mlp, mlp, x)
    after_upstream = torch.rand(3)
    torch.manual_seed(7)
    got = run_and_grads(lambda t: mini_sequence_apply(mlp.forward, t, module=mlp, bounds=bounds, seq_dim=1), mlp, x)
    assert torch.equal(torch.rand(3), after_upstream), "the generator must end where upstream's does"
    assert_same_results(got, ref)


def test_dropout_with_p_one_zeroes_like_upstream():
    mlp = GatedMLP(dropout=1.0)
    x = torch.randn(2, 9, 16)
    torch.manual_seed(3)
    ref = run_and_grads(mlp, mlp, x)
    torch.manual_seed(3)
    got = run_and_grads(lambda t: mini_sequence_mlp(mlp.forward, t, module=mlp, num_chunks=3), mlp, x)
    assert torch.equal(got[0], ref[0])
    for name in ref[2]:
        assert relative_error(got[2][name], ref[2][name]) < 1e-6, name


def test_an_unreplayable_random_op_puts_the_generators_back():
    """The error comes with the generator where it was before the call, so a caller can rerun it unchunked."""
    mlp = GatedMLP(dropout=0.2)

    def noisy(t):
        return mlp(t) + torch.rand(1)

    x = torch.randn(1, 12, 16, requires_grad=True)
    torch.manual_seed(11)
    expected = torch.rand(5)
    torch.manual_seed(11)
    with pytest.raises(UnreplayableRandomOpError, match="rand"):
        mini_sequence_mlp(noisy, x, module=mlp, num_chunks=3)
    assert torch.equal(torch.rand(5), expected)


def test_a_single_chunk_is_the_plain_call():
    """One chunk: no recompute, no replay, so even random ops other than dropout run as upstream's."""
    mlp = GatedMLP()
    x = torch.randn(1, 12, 16, requires_grad=True)

    def noisy(t):
        return mlp(t) + torch.rand(1)

    torch.manual_seed(5)
    expected = noisy(x)
    torch.manual_seed(5)
    got = mini_sequence_mlp(noisy, x, module=mlp, num_chunks=1)
    assert torch.equal(got, expected)
    assert type(got.grad_fn) is type(expected.grad_fn)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_double_backward_through_the_chunked_function(dtype, tolerance):
    torch.manual_seed(0)
    mlp = GatedMLP(dropout=0.25).to(dtype)
    x = torch.randn(2, 13, 16, dtype=dtype, requires_grad=True)
    weights = torch.linspace(-1, 1, 2 * 13 * 16, dtype=dtype).view(2, 13, 16)

    def penalty_grads(fn):
        torch.manual_seed(1)
        out = fn(x)
        params = list(mlp.parameters())
        first = torch.autograd.grad((out * weights).sum(), [x, *params], create_graph=True)
        penalty = sum(g.pow(2).sum() for g in first if g.requires_grad)
        second = torch.autograd.grad(penalty, [x, *params], allow_unused=True)
        return first, second

    ref = penalty_grads(mlp)
    got = penalty_grads(lambda t: mini_sequence_mlp(mlp.forward, t, module=mlp, num_chunks=4))
    for expected, actual in zip(ref[0], got[0]):
        assert actual.requires_grad == expected.requires_grad
        assert relative_error(actual, expected) < tolerance
    for expected, actual in zip(ref[1], got[1]):
        assert (actual is None) == (expected is None)
        if expected is not None:
            assert relative_error(actual, expected) < tolerance


def test_torch_func_grad_through_the_chunked_function():
    from torch.func import functional_call, grad

    mlp = GatedMLP()
    x = torch.randn(2, 11, 16)

    class Chunked(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return mini_sequence_mlp(self.inner.forward, t, module=self.inner, num_chunks=3)

    chunked = Chunked(mlp)
    params = {name: p.detach() for name, p in mlp.named_parameters()}
    expected = grad(lambda p: functional_call(mlp, p, (x,)).pow(2).sum())(params)
    got = grad(lambda p: functional_call(chunked, {f"inner.{k}": v for k, v in p.items()}, (x,)).pow(2).sum())(params)
    for name in expected:
        assert relative_error(got[name], expected[name]) < 1e-5, name


def test_the_loss_runs_the_lm_head_once_per_chunk_and_scales_in_the_backward():
    """Gradients are taken in the forward: the head runs once per chunk, and `grad_output` (here a scale and a
    second, retained backward) still reaches every gradient exactly."""
    torch.manual_seed(0)
    vocab, hidden = 61, 16
    head = nn.Linear(hidden, vocab)
    states = torch.randn(2, 19, hidden)
    labels = torch.randint(0, vocab, (2, 19))
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))

    def grads_of(loss_fn, backward_passes):
        head.zero_grad(set_to_none=True)
        x = states.clone().requires_grad_(True)
        loss = loss_fn(x) * 3.5
        for _ in range(backward_passes):
            loss.backward(retain_graph=True)
        return x.grad, {name: p.grad.clone() for name, p in head.named_parameters()}

    expected = grads_of(lambda h: ForCausalLMLoss(head(h), labels, vocab), 2)
    calls.clear()
    got = grads_of(lambda h: chunked_causal_lm_loss(h, head, labels, num_chunks=4), 1)
    assert len(calls) == 4, f"one head call per chunk in forward and backward together, got {calls}"
    # A second backward through the retained graph recomputes (the forward's gradients were used up).
    got = grads_of(lambda h: chunked_causal_lm_loss(h, head, labels, num_chunks=4), 2)
    assert relative_error(got[0], expected[0]) < 1e-5
    for name in expected[1]:
        assert relative_error(got[1][name], expected[1][name]) < 1e-5, name

"""benchmarks/cost.py: the counters on hand-checkable ops, MLP matmul counts of a step, and the layer extrapolation."""

import importlib.util
import json
import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.modules import module as module_hooks

from minis.planner import PlanError, TrainingSetup
from minis.testing import tiny_config

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "cost.py")
_spec = importlib.util.spec_from_file_location("minis_benchmark_cost", _PATH)
cost = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cost
_spec.loader.exec_module(cost)


# --- single ops -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_a_linear_layer_is_one_matmul_launch_of_2mnk_flops(fake):
    with FakeTensorMode() if fake else torch.no_grad():
        x = torch.randn(4, 8)
        weight, bias = torch.randn(16, 8), torch.randn(16)
        counter = cost.CostCounter()
        with counter:
            torch.nn.functional.linear(x, weight, bias)  # t(weight) is a view; addmm the one kernel
    total = counter.cost.total()
    assert total.flops == 2 * 4 * 8 * 16
    assert total.launches == 1
    assert counter.cost.total(matmul=True).launches == 1
    # addmm reads x, the weight and the bias and writes the output, all fp32.
    assert total.bytes == 4 * (4 * 8 + 16 * 8 + 16 + 4 * 16)


def test_matmuls_accumulating_in_place_or_into_an_out_tensor_are_matmuls():
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    accumulator = torch.zeros(4, 16)
    counter = cost.CostCounter()
    with counter:
        accumulator.addmm_(a, b)
        torch.mm(a, b, out=accumulator)
        accumulator[None].baddbmm_(a[None], b[None])
    matmuls = counter.cost.total(matmul=True)
    assert (matmuls.launches, matmuls.flops) == (3, 3 * 2 * 4 * 8 * 16)
    assert counter.cost.total(matmul=False).launches == 0


def test_a_linear_layer_backward_is_two_matmuls_and_a_bias_reduction():
    x = torch.randn(4, 8, requires_grad=True)
    layer = torch.nn.Linear(8, 16)
    out = layer(x)
    grad = torch.ones_like(out)
    counter = cost.CostCounter()
    with counter, counter.label("backward"):
        out.backward(grad)
    matmuls = counter.cost.total(phase="backward", matmul=True)
    assert matmuls.launches == 2  # grad input (4x16 @ 16x8) and grad weight (16x4 @ 4x8)
    assert matmuls.flops == 2 * (2 * 4 * 16 * 8)
    assert counter.cost.total(phase="backward", matmul=False).launches >= 1  # the bias gradient's sum


def test_non_matmul_bytes_are_inputs_plus_outputs_and_views_are_free():
    a, b = torch.randn(1000), torch.randn(1000)
    one = torch.randn(1)
    empty = torch.randn(0)
    table, ids = torch.randn(100, 8), torch.tensor([1, 5, 7, 7, 99])
    log_probs, targets = torch.randn(4, 10).log_softmax(-1), torch.tensor([0, 3, 9, 2])
    cases = {
        "add": (lambda: a + b, 3 * 4000, 1),
        "broadcast add": (lambda: a + one.expand(1000), 4000 + 4 + 4000, 1),
        "in-place mul": (lambda: a.clone().mul_(2.0), (4000 + 4000) + (4000 + 4000), 2),  # clone, then mul_
        "copy_ writes only": (lambda: torch.empty(1000).copy_(b), 4000 + 4000, 1),
        "views": (lambda: a.view(10, 100).t().unsqueeze(0)[:, 1:], 0, 0),
        "empty tensors": (lambda: empty + empty, 0, 0),
        "upcast": (lambda: a.to(torch.float16).float(), (4000 + 2000) + (2000 + 4000), 2),
        # Gathers read what they index: 5 int64 ids, their 5 rows of 8 floats, and the 5 x 8 output.
        "embedding": (lambda: torch.nn.functional.embedding(ids, table), 5 * 8 + 5 * 8 * 4 + 5 * 8 * 4, 1),
        # 4 targets (int64), one log-probability each, and two scalar outputs (loss, total weight).
        "nll loss": (lambda: torch.nn.functional.nll_loss(log_probs, targets, reduction="sum"), 4 * 8 + 4 * 4 + 2 * 4,
                     1),
    }
    for name, (fn, nbytes, launches) in cases.items():
        counter = cost.CostCounter()
        with counter:
            fn()
        total = counter.cost.total()
        assert (total.bytes, total.launches, total.flops) == (nbytes, launches, 0), name


def test_roofline_time_is_the_larger_of_compute_and_memory_time_per_op():
    roofline = cost.Roofline(peak_flops=1e12, peak_bandwidth=1e9)
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    counter = cost.CostCounter(roofline=roofline)
    with counter:
        a @ b  # 2*64^3 FLOPs = 0.52 us; 3 * 16 KiB = 49 us: memory-bound here
        a + b
    nbytes = 3 * 64 * 64 * 4
    assert counter.cost.total().seconds == pytest.approx(2 * nbytes / 1e9)
    step = cost.StepCost(counter.cost.tallies, tokens=64)
    assert step.seconds(launch_seconds=1e-6) == pytest.approx(2 * nbytes / 1e9 + 2e-6)


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_runs_as_the_flash_kernel_and_causal_counts_half(is_causal):
    batch, heads, kv_heads, seq, dim = 1, 8, 2, 64, 16
    with FakeTensorMode():
        q = torch.randn(batch, heads, seq, dim, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(batch, kv_heads, seq, dim, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(batch, kv_heads, seq, dim, dtype=torch.bfloat16, requires_grad=True)
        counter = cost.CostCounter(cost.OpGroups())
        with counter:
            with counter.label("activations"):
                out = cost._sdpa_as_cuda_kernel(q, k, v, is_causal=is_causal, enable_gqa=True)
            with counter.label("backward"):
                out.sum().backward()
    full_forward = 4 * batch * heads * seq * seq * dim  # QK^T and PV
    factor = 0.5 if is_causal else 1.0
    forward = counter.cost.total(phase="forward", group="attention")
    backward = counter.cost.total(phase="backward", group="attention")
    assert (forward.launches, backward.launches) == (1, 1)
    assert forward.flops == full_forward * factor
    assert backward.flops == 2.5 * full_forward * factor  # recompute QK^T, then dV, dP, dQ, dK
    assert k.grad.shape == k.shape


def test_a_masked_batch_runs_the_memory_efficient_kernel():
    batch, heads, seq, dim = 2, 4, 32, 16
    with FakeTensorMode():
        q, k, v = (torch.randn(batch, heads, seq, dim, requires_grad=True) for _ in range(3))
        mask = torch.ones(batch, 1, seq, seq, dtype=torch.bool)
        counter = cost.CostCounter(cost.OpGroups())
        with counter:
            with counter.label("activations"):
                out = cost._sdpa_as_cuda_kernel(q, k, v, attn_mask=mask)
            with counter.label("backward"):
                out.sum().backward()
    forward = counter.cost.total(phase="forward", group="attention")
    assert forward.launches == 1 and forward.flops == 4 * batch * heads * seq * seq * dim  # a mask: no skipping
    assert counter.cost.total(phase="backward", group="attention").launches == 1
    assert q.grad.shape == q.shape


# --- a training step --------------------------------------------------------------------------------------------
def small_config(layers: int, **overrides):
    # hidden 32, intermediate 88, vocab 257: distinct widths; 4 query and 2 key/value heads of 8.
    return tiny_config("llama", num_hidden_layers=layers, **overrides)


def mlp_linear_calls(config, seq_len, setup, mini_sequence):
    """Counts the step, and independently, the calls of the MLP's Linear layers by phase (module hooks).

    Every call of gate/up/down_proj that completes during the backward is a recompute, whatever runs it (a
    forward hook does not fire when the checkpoint stops its recompute inside the module).
    """
    counter = cost.CostCounter(cost.OpGroups.for_model(config, setup))
    calls = {"forward": 0, "backward": 0}
    widths = {config.intermediate_size}

    def count_call(module, args, output):
        if isinstance(module, torch.nn.Linear) and widths & {module.in_features, module.out_features}:
            phase = {"activations": "forward", "backward": "backward"}.get(counter.current_label)
            if phase is not None:
                calls[phase] += 1

    handle = module_hooks.register_module_forward_hook(count_call)
    try:
        step = cost.count_step(config, seq_len, setup, mini_sequence=mini_sequence, num_layers=1, counter=counter)
    finally:
        handle.remove()
    counted = {phase: step.total(phase=phase, group="mlp", matmul=True).launches
               for phase in ("forward", "recompute", "backward")}
    return counted, calls


@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["no-gc", "gc"])
def test_mlp_matmuls_of_a_step_upstream_and_minis(grad_ckpt):
    seq_len, chunk = 48, 16  # 3 MLP chunks for minis
    config = small_config(1, mini_sequence_chunk_size=chunk)
    setup = TrainingSetup(grad_ckpt=grad_ckpt, optimizer="none")

    upstream, upstream_calls = mlp_linear_calls(config, seq_len, setup, mini_sequence=False)
    # Upstream: gate, up, down in the forward; two matmuls per Linear in the backward (input and weight gradients);
    # the checkpoint's recompute stops once the last tensor the layer saved is back, before down_proj runs.
    assert upstream == {"forward": 3, "recompute": 2 if grad_ckpt else 0, "backward": 6}
    assert upstream_calls == {"forward": 3, "backward": upstream["recompute"]}

    minis, minis_calls = mlp_linear_calls(config, seq_len, setup, mini_sequence=True)
    chunks = seq_len // chunk
    assert minis["forward"] == 3 * chunks == minis_calls["forward"]
    # After the forward, the backward-time matmuls are the Linear calls the backward reruns (recomputes) plus two
    # gradient matmuls per forward Linear call. How minis splits its gradient matmuls between the recompute and
    # the backward phases is its implementation's business; the sum is checked against the hooks' count.
    assert minis_calls["backward"] > 0 and minis["recompute"] >= minis_calls["backward"]
    assert minis["recompute"] + minis["backward"] == minis_calls["backward"] + 2 * minis_calls["forward"]


@pytest.mark.parametrize("mini_sequence", [False, True], ids=["upstream", "minis"])
@pytest.mark.parametrize("setup", [TrainingSetup(grad_ckpt=True, optimizer="none"),
                                   TrainingSetup(method="lora", lora_rank=4, optimizer="none")],
                         ids=["full-gc", "lora"])
def test_one_and_two_layers_extrapolate_to_a_real_three_layer_count(setup, mini_sequence):
    config = small_config(3)
    seq_len = 40
    one, two, three = (cost.count_step(config, seq_len, setup, mini_sequence=mini_sequence, num_layers=layers)
                       for layers in (1, 2, 3))
    predicted = cost.extrapolate(one, two, 3)
    assert set(predicted.tallies) <= set(three.tallies) | {k for k, t in predicted.tallies.items() if not t.launches}
    for key, tally in three.tallies.items():
        got = predicted.tallies.get(key, cost.Tally())
        for name in ("flops", "bytes", "launches", "seconds"):
            assert getattr(got, name) == pytest.approx(getattr(tally, name), rel=1e-9, abs=1e-15), (key, name)
    assert two.total().launches > one.total().launches  # a layer adds work: the check above is not vacuous


def test_case_cost_reports_minis_cost_over_upstream():
    config = small_config(4)
    setup = TrainingSetup(grad_ckpt=False, optimizer="none")
    case = cost.case_cost(config, 64, setup)
    assumptions = cost.Assumptions(model="tiny", peak_tflops=700, peak_tbps=4, launch_us=4, optimizer="none",
                                   num_layers=4, lora_rank=16)
    row = cost.summarize(case, assumptions)
    # Without checkpointing minis recomputes the MLP in the backward: more FLOPs and launches. The LM head's
    # gradients are taken in its forward, so it runs once: no recompute.
    assert row["ratios"]["flops"] > 1 and row["minis"]["launches"] > row["upstream"]["launches"]
    assert row["ratios"]["tokens_per_s"] == pytest.approx(row["upstream"]["seconds"] / row["minis"]["seconds"])
    groups = {(r["group"], r["phase"]) for r in cost.breakdown(case)}
    assert {("mlp", "forward"), ("mlp", "recompute"), ("attention", "forward")} <= groups
    assert ("lm_head", "recompute") not in groups


def test_the_counted_step_builds_no_seq_by_seq_tensor():
    """transformers would build a seq x seq mask on fake tensors; the counted step takes a real run's decisions."""
    seq_len = 40
    shapes = set()

    class ShapeRecorder(cost.CostCounter):
        def count(self, func, args, kwargs, out):
            for tensor in torch.utils._pytree.tree_flatten((args, kwargs, out))[0]:
                if isinstance(tensor, torch.Tensor):
                    shapes.add(tuple(tensor.shape))
            super().count(func, args, kwargs, out)

    config = small_config(1)
    setup = TrainingSetup(optimizer="none")
    counter = ShapeRecorder(cost.OpGroups.for_model(config, setup))
    step = cost.count_step(config, seq_len, setup, mini_sequence=False, num_layers=1, counter=counter)
    assert step.total(group="attention").launches == 2  # the flash kernel, forward and backward
    assert shapes and not [shape for shape in shapes if shape[-2:] == (seq_len, seq_len)]


def test_the_optimizer_step_is_counted_only_when_asked():
    config = small_config(1)
    without = cost.count_step(config, 32, TrainingSetup(optimizer="none"), mini_sequence=True, num_layers=1)
    with_adamw = cost.count_step(config, 32, TrainingSetup(optimizer="adamw"), mini_sequence=True, num_layers=1)
    assert without.total(phase="optimizer").launches == 0
    assert with_adamw.total(phase="optimizer").launches > 0
    assert with_adamw.total(phase="backward").launches == without.total(phase="backward").launches


def test_ambiguous_widths_are_refused():
    config = small_config(2)
    with pytest.raises(PlanError, match=r"intermediate_size \(88\).*sequence length \(88\)"):
        cost.count_step(config, 88, TrainingSetup(optimizer="none"), mini_sequence=True, num_layers=1)
    with pytest.raises(PlanError, match=r"lora rank \(32\).*hidden_size \(32\)"):
        cost.count_step(config, 40, TrainingSetup(method="lora", lora_rank=32, optimizer="none"),
                        mini_sequence=True, num_layers=1)
    cost.OpGroups(vocab_size=257, intermediate_size=88, lora_rank=8).check(config, 40)  # rank = head_dim is fine


# --- the command line and the docs section ----------------------------------------------------------------------
def test_command_line_writes_its_section_and_keeps_the_rest_of_the_page(tmp_path, monkeypatch, capsys):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(small_config(2).to_dict()))
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nkept text\n")
    monkeypatch.setattr(cost, "DOC", str(page))
    argv = ["--model", str(config_path), "--seq", "64", "--methods", "full", "--grad-ckpt", "on", "--write-doc"]
    assert cost.main(argv) == 0
    first = page.read_text()
    assert first.startswith("# Benchmarks\n\nkept text\n") and "## Step cost model" in first
    assert f"python benchmarks/cost.py --model {config_path} --seq 64" in first
    assert cost.main(argv) == 0  # a rerun replaces the section, it does not append a second one
    assert page.read_text() == first
    out = capsys.readouterr().out
    assert "rate" in out


def test_bad_options_are_refused_with_the_value(capsys):
    with pytest.raises(SystemExit):
        cost.parse_args(["--peak-tflops", "-3"])
    assert "'-3' must be a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cost.parse_args(["--seq", "8192", "--breakdown-seq", "4096"])
    assert "--breakdown-seq 4096 is not one of the --seq values" in capsys.readouterr().err

"""PEFT (0.x) adapters under minis: same gradients as the unchunked model, and minis steps aside for aLoRA.

Each comparison builds the same tiny model twice, wraps it with the same PEFT config under the same seed, and runs
one forward/backward with the same seed: once with minis (the MLPs and the LM-head loss chunked) and once with
`config.use_mini_sequence=False`. LoRA dropout is on (p=0.1): minis draws each dropout mask for the whole sequence
and slices it per chunk, so the masks, and with them the gradients, equal the unchunked run's. Adapters are
initialized with `init_lora_weights=False` so that B is non-zero and every LoRA matrix gets a gradient.

fp32 tolerance: 1e-5 relative to each gradient's largest entry (they agree to ~1e-7; a different dropout mask or a
missing chunk changes them by tens of percent).

Every family of the registry (`minis.families.FAMILY_NAMES`) runs LoRA with dropout on all its linear layers, with
and without activation checkpointing: these are the cases where a family's own modules (fused projections,
softcapped or scaled logits, sliding windows) meet the adapters and the dropout replay, and each takes well under a
second. The other adapters wrap the same `nn.Linear` layers whatever the family, so they run on llama only.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from framework_helpers import (
    chunking_spy,
    model,
    pad_collator,
    token_dataset,
)
from helpers import max_relative_difference

from minis.checkpoint_offload import enable_activation_checkpointing
from minis.families import FAMILY_NAMES

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_thread")

GRAD_RTOL = 1e-5
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch():
    return pad_collator(token_dataset(2, 40, 56, seed=5))


def peft_model(minis_on: bool, family: str = "llama", **lora_kwargs):
    from peft import LoraConfig, get_peft_model

    net = model(family)
    net.config.use_mini_sequence = minis_on
    settings = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=ALL_PROJECTIONS, init_lora_weights=False)
    settings.update(lora_kwargs)
    torch.manual_seed(0)
    wrapped = get_peft_model(net, LoraConfig(task_type="CAUSAL_LM", **settings))
    wrapped.train()
    return wrapped


def gradients(wrapped, data=None):
    """Loss and trainable gradients of one forward/backward (seeded, so dropout draws the same numbers)."""
    torch.manual_seed(1234)
    with chunking_spy() as counts:
        loss = wrapped(**(data or batch())).loss
        loss.backward()
    grads = {name: p.grad.clone() for name, p in wrapped.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads, dict(counts)


def assert_same_gradients(on_model, off_model):
    loss_on, grads_on, counts_on = gradients(on_model)
    loss_off, grads_off, counts_off = gradients(off_model)
    assert counts_on["mlp"] > 0 and counts_on["loss"] > 0, counts_on
    assert counts_off == {"mlp": 0, "loss": 0}
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=0)
    assert max_relative_difference(grads_on, grads_off) < GRAD_RTOL
    return grads_on


def linear_layers(family: str) -> list[str]:
    """The names of the family's `nn.Linear` layers but the LM head: PEFT's "all-linear" without the fused expert
    weights of MoE models, which PEFT adapts through `ParamWrapper`, whose LoRA refuses dropout."""
    net = model(family)
    output = net.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in net.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not output})


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_with_dropout_on_all_linear_layers(family):
    """LoRA on every linear layer but the LM head: the family's own projection names, fused ones included."""
    targets = linear_layers(family)
    grads = assert_same_gradients(peft_model(True, family, target_modules=targets),
                                  peft_model(False, family, target_modules=targets))
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name in grads if ".lora_A" in name}
    assert adapted == set(targets), (adapted, targets)
    # The masks matter: with another seed for the dropout the gradients change a lot.
    other = peft_model(False, family, target_modules=targets)
    torch.manual_seed(99)
    other(**batch()).loss.backward()
    moved = {n: p.grad for n, p in other.named_parameters() if p.requires_grad}
    assert max_relative_difference(moved, grads) > 1e-2


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_dropout_under_activation_checkpointing(family, use_reentrant):
    """The checkpoint's recompute redraws the dropout masks from the restored generator; they must match too."""
    targets = linear_layers(family)
    on, off = peft_model(True, family, target_modules=targets), peft_model(False, family, target_modules=targets)
    for wrapped in (on, off):
        enable_activation_checkpointing(wrapped.base_model.model, {"use_reentrant": use_reentrant})
        wrapped.base_model.model.enable_input_require_grads()
    assert_same_gradients(on, off)


def test_dora():
    on, off = peft_model(True, use_dora=True), peft_model(False, use_dora=True)
    grads = assert_same_gradients(on, off)
    assert any("lora_magnitude_vector" in name for name in grads)


@pytest.mark.parametrize(
    "extra",
    [{"modules_to_save": ["lm_head", "embed_tokens"]}, {"trainable_token_indices": {"embed_tokens": [3, 4, 5]}}],
    ids=["modules_to_save", "trainable_tokens"],
)
def test_trainable_lm_head_and_embeddings(extra):
    grads = assert_same_gradients(peft_model(True, **extra), peft_model(False, **extra))
    if "modules_to_save" in extra:
        assert any("lm_head.modules_to_save" in name for name in grads), sorted(grads)
        assert any("embed_tokens.modules_to_save" in name for name in grads), sorted(grads)
    else:
        assert any("trainable_tokens_delta" in name for name in grads), sorted(grads)


def test_gradient_hooks_fire_once_per_backward():
    """What DDP's reducer, FSDP2 and ZeRO rely on: each trainable parameter's hooks run once per backward."""
    wrapped = peft_model(True, modules_to_save=["lm_head"])
    counts = {}
    for name, param in wrapped.named_parameters():
        if param.requires_grad:
            counts[name] = [0, 0]
            param.register_hook(lambda grad, name=name: counts[name].__setitem__(0, counts[name][0] + 1))
            param.register_post_accumulate_grad_hook(
                lambda p, name=name: counts[name].__setitem__(1, counts[name][1] + 1)
            )
    _, _, chunked = gradients(wrapped)
    assert chunked["mlp"] > 0 and chunked["loss"] > 0
    assert counts and all(c == [1, 1] for c in counts.values()), {n: c for n, c in counts.items() if c != [1, 1]}


def test_merge_and_unload():
    """Train the adapters a little with minis, merge them: the merged model computes what the adapted one did,
    and (a plain transformers model again) still runs mini-sequence and matches its unchunked self."""
    import minis

    wrapped = peft_model(True)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        gradients(wrapped)
        optimizer.step()
    data = batch()
    wrapped.eval()
    with torch.no_grad():
        adapted_logits = wrapped(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    merged = wrapped.merge_and_unload()
    assert "lora" not in " ".join(name for name, _ in merged.named_parameters())
    assert minis.is_active(merged)
    with torch.no_grad():
        merged_logits = merged(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-4, atol=1e-5)

    merged.train()
    merged.requires_grad_(True)  # PEFT froze the base weights
    _, grads_on, counts_on = gradients(merged, data)
    merged.zero_grad()
    merged.config.use_mini_sequence = False
    _, grads_off, _ = gradients(merged, data)
    assert counts_on["mlp"] > 0
    assert max_relative_difference(grads_on, grads_off) < GRAD_RTOL


def alora_batch():
    """Rows that contain the invocation tokens (7, 8) somewhere in the middle, as aLoRA expects."""
    data = batch()
    data["input_ids"][:, 20:22] = torch.tensor([7, 8])
    data["labels"] = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    return data


def test_activated_lora_on_mlp_turns_minis_off_with_one_warning(monkeypatch):
    """aLoRA applies its adapter to the tokens from the invocation to the end of the *sequence*; inside a chunk a
    layer would count from the chunk's end. minis runs every module holding an active aLoRA adapter unchunked and
    warns once; the result is exactly upstream's."""
    from minis import _warn

    monkeypatch.setattr(_warn, "_warned", set())
    alora = dict(alora_invocation_tokens=[7, 8], lora_dropout=0.0)
    data = alora_batch()
    on, off = peft_model(True, **alora), peft_model(False, **alora)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_on, grads_on, counts_on = gradients(on, data)
        gradients(on, data)  # a second step warns no more
    messages = [str(w.message) for w in caught if "ALoraLinearVariant" in str(w.message)]
    assert len(messages) == 1, messages
    assert counts_on["mlp"] == 0, "an MLP holding aLoRA was chunked"
    assert counts_on["loss"] > 0, "the LM head holds no aLoRA adapter, so the loss stays chunked"
    on.zero_grad()
    loss_on, grads_on, _ = gradients(on, data)
    loss_off, grads_off, _ = gradients(off, data)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=0)
    assert max_relative_difference(grads_on, grads_off) < GRAD_RTOL

    # Why: with the check bypassed, chunking breaks aLoRA. PEFT 0.21 flattens the chunk with `.view`, which a chunk
    # (a strided slice of the sequence) refuses; a version that reshaped instead would apply the adapter from each
    # chunk's end, at the wrong tokens. Either way the run must not silently equal upstream's.
    from minis import integration

    monkeypatch.setattr(integration, "sequence_dependent_adapter", lambda module: None)
    try:
        _, grads_bypassed, _ = gradients(peft_model(True, **alora), data)
    except RuntimeError as error:
        assert "view" in str(error)
    else:
        assert max_relative_difference(grads_bypassed, grads_off) > 1e-3


def test_activated_lora_on_attention_only_keeps_minis_on(monkeypatch):
    """aLoRA on the attention projections only: the chunked MLPs hold no aLoRA, so they stay chunked and exact."""
    from minis import _warn

    monkeypatch.setattr(_warn, "_warned", set())
    alora = dict(alora_invocation_tokens=[7, 8], lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    data = alora_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_on, grads_on, counts_on = gradients(peft_model(True, **alora), data)
    assert not [w for w in caught if "ALoraLinearVariant" in str(w.message)]
    loss_off, grads_off, _ = gradients(peft_model(False, **alora), data)
    assert counts_on["mlp"] > 0
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=0)
    assert max_relative_difference(grads_on, grads_off) < GRAD_RTOL


# Adapters chunking cannot reproduce: minis runs the modules holding them unchunked, warns once, never crashes.


def adapted_model(minis_on: bool, peft_config, family: str = "llama"):
    from peft import get_peft_model

    net = model(family)
    net.config.use_mini_sequence = minis_on
    torch.manual_seed(0)
    wrapped = get_peft_model(net, peft_config)
    wrapped.train()
    return wrapped


def assert_same_step_as_upstream(make, warning_match: str | None):
    """One seeded step with minis on and off: same loss and gradients; `warning_match` names the one warning."""
    from minis import _warn

    def step(wrapped):
        torch.manual_seed(1234)
        with chunking_spy() as counts:
            loss = wrapped(**batch()).loss
            loss.backward()
        grads = {name: p.grad for name, p in wrapped.named_parameters() if p.requires_grad}
        return loss.detach(), grads, dict(counts)

    _warn._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_on, grads_on, counts_on = step(make(True))
    minis_warnings = [str(w.message) for w in caught if str(w.message).startswith("minis:")]
    loss_off, grads_off, _ = step(make(False))
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=0)
    assert grads_on.keys() == grads_off.keys()
    for name, grad in grads_off.items():
        assert (grads_on[name] is None) == (grad is None), name
        if grad is None:
            continue
        # Relative to the gradient's largest entry, plus an absolute 1e-9 for gradients that are zero in exact
        # arithmetic (X-LoRA's classifier gets ~1e-11 of rounding noise; lora_dropout=1 zeroes every adapter's).
        difference = (grads_on[name] - grad).abs().max().item()
        assert difference <= GRAD_RTOL * grad.abs().max().item() + 1e-9, name
    if warning_match is None:
        assert not minis_warnings, minis_warnings
    else:
        assert len(minis_warnings) == 1 and warning_match in minis_warnings[0], minis_warnings
    return counts_on


def test_lora_dropout_of_one_zeroes_the_branch_like_upstream():
    from peft import LoraConfig

    config = lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=1.0, target_modules=ALL_PROJECTIONS,  # noqa: E731
                                init_lora_weights=False)
    counts = assert_same_step_as_upstream(lambda on: adapted_model(on, config()), None)
    assert counts["mlp"] > 0, "p=1 dropout is replayable: the MLPs stay chunked"


def test_boft_with_dropout_runs_its_modules_unchunked(monkeypatch):
    from peft import BOFTConfig
    from peft.tuners.boft import layer as boft_layer

    # BOFT tries to JIT-build its CUDA kernel (fbd_cuda) at every adapter creation and falls back to plain torch
    # when that fails, as it does without CUDA; no test may compile, so take the fallback directly.
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", False)

    config = lambda: BOFTConfig(boft_block_size=4, boft_dropout=0.2,  # noqa: E731
                                target_modules=["gate_proj", "up_proj", "down_proj"])
    assert_same_step_as_upstream(lambda on: adapted_model(on, config()), "draws random numbers")


@pytest.mark.parametrize("dropouts", [{"module_dropout": 0.3}, {"rank_dropout": 0.3}], ids=["module", "rank"])
def test_loha_with_dropout_runs_its_modules_unchunked(dropouts):
    from peft import LoHaConfig

    config = lambda: LoHaConfig(r=4, alpha=8, target_modules=["gate_proj", "down_proj", "lm_head"],  # noqa: E731
                                init_weights=False, **dropouts)
    assert_same_step_as_upstream(lambda on: adapted_model(on, config()), "draws random numbers")


def test_xlora_runs_its_modules_unchunked(tmp_path):
    from peft import LoraConfig, XLoraConfig, get_peft_model

    for index in range(2):
        torch.manual_seed(10 + index)
        lora = get_peft_model(model("llama"), LoraConfig(r=4, target_modules=["gate_proj", "down_proj"],
                                                         init_lora_weights=False))
        lora.save_pretrained(tmp_path / f"adapter{index}")

    def make(on):
        net = model("llama")
        net.config.use_mini_sequence = on
        net.config.use_cache = False
        torch.manual_seed(0)
        config = XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=net.config.hidden_size,
            xlora_depth=2,
            adapters={str(i): str(tmp_path / f"adapter{i}") for i in range(2)},  # PEFT loads them as "0", "1"
        )
        wrapped = get_peft_model(net, config)
        wrapped.train()
        return wrapped

    assert_same_step_as_upstream(make, "X-LoRA")


def _other_adapters():
    import peft

    mlp_and_attention = ["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"]
    mlp = ["gate_proj", "up_proj", "down_proj"]
    return {
        "ia3": (lambda: peft.IA3Config(target_modules=mlp_and_attention, feedforward_modules=mlp), None),
        "vera": (lambda: peft.VeraConfig(r=4, target_modules=["gate_proj", "up_proj"], vera_dropout=0.1), None),
        "adalora": (lambda: peft.AdaLoraConfig(r=4, target_modules=mlp_and_attention, total_step=10,
                                               lora_dropout=0.1), None),
        "oft": (lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=mlp, module_dropout=0.1), None),
        "lokr": (lambda: peft.LoKrConfig(r=4, target_modules=mlp_and_attention, rank_dropout=0.1,
                                         module_dropout=0.1), "draws random numbers"),
        "ln_tuning": (lambda: peft.LNTuningConfig(target_modules=["norm"]), None),
        "prompt_tuning": (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), None),
        "prefix_tuning": (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), None),
        "fourierft": (lambda: peft.FourierFTConfig(target_modules=["gate_proj", "up_proj"], n_frequency=16), None),
        "hra": (lambda: peft.HRAConfig(r=4, target_modules=["gate_proj", "up_proj"]), None),
        "lora_on_head_and_embeddings": (lambda: peft.LoraConfig(r=4, target_modules=["lm_head", "embed_tokens",
                                                                                      "down_proj"],
                                                                lora_dropout=0.2, init_lora_weights=False), None),
    }


@pytest.mark.parametrize("name", sorted(_other_adapters()))
def test_other_peft_adapters_match_upstream(name):
    """The adapter zoo beyond LoRA: same loss and gradients, and a warning only where a module runs unchunked."""
    make_config, warning = _other_adapters()[name]
    assert_same_step_as_upstream(lambda on: adapted_model(on, make_config()), warning)

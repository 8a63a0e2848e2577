"""The one table of model families minis patches: one row per `model_type`, standard library only.

Everything that needs to know the families reads this table: the import hook (which modules to watch), the
integration (which classes to patch and how a family's LM head differs), `minis.testing` (tiny configs), the planner
and the demo. The import hook imports this module at interpreter start-up, so it imports nothing outside the
standard library.

A row holds:
- `model_type` and `module`: transformers' `model_type` and the package under `transformers.models` that holds its
  code (`gemma3_text` lives in `gemma3`);
- class names: config, `PreTrainedModel` base, MLP (its `forward` is chunked; None for a family without a dense MLP,
  such as Mixtral) and causal LM (its `forward` computes the training loss over chunks);
- `experts_class`, for mixture-of-experts families: the module holding the experts' weights, which the sparse MoE
  block calls with the whole sequence's hidden states and routing (upstream's `<Family>Experts`). Its `forward` is
  chunked over tokens; the router and the block stay upstream's, so the recorded `router_logits` and the auxiliary
  load-balancing loss (upstream's `load_balancing_loss_func`, added by the causal LM) cover all tokens;
- what differs in the LM head, as names of config attributes: `final_logit_softcapping` (Gemma-2/3:
  `cap * tanh(logits / cap)`) and `logits_scaling` (Granite: `logits / scaling`), both applied before the loss;
- `norm_class`: the RMSNorm class of the decoder layers (also the final norm, and Qwen3/OLMo-2/Gemma-3's
  `q_norm`/`k_norm`); its `forward` runs over sequence chunks in long training forwards (`minis.layer_tiling`);
- `attention_class` and `attention_projections`: the attention module and its token-wise projections (names of
  its children); adapter-wrapped projections (PEFT LoRA) run over sequence chunks in long training forwards;
- `supports_sdpa`: False where transformers refuses SDPA attention for the family (Gemma-2's score softcapping);
- `tiny_config`: the fields that, on top of `TINY_COMMON`, give a small test model exercising what the family
  does differently, and `scaled_fields`: fields the demo sets from its sizes (`"head_dim"` or `"half_seq"`).

Adding a dense family whose MLP is token-wise and whose causal LM computes `lm_head(hidden)` (then optional
scaling or softcapping) and `self.loss_function` is one row here; `tests/test_models.py` then checks it. A MoE
family is one row too when its experts module has upstream's `forward(hidden_states, top_k_index, top_k_weights)`
and its causal LM adds `router_aux_loss_coef * load_balancing_loss_func(...)` as Qwen3-MoE's and Mixtral's do.

Example:
    >>> from minis.families import FAMILIES
    >>> FAMILIES["gemma3_text"].modeling_module
    'transformers.models.gemma3.modeling_gemma3'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["FAMILIES", "FAMILY_NAMES", "TINY_COMMON", "Family", "family_of_module", "get_family"]

_SCALED_FIELD_SOURCES = ("head_dim", "half_seq")


@dataclass(frozen=True)
class Family:
    """One model family minis patches (see the module docstring for what each field means)."""

    model_type: str
    module: str
    config_class: str
    pretrained_class: str
    mlp_class: str | None
    causal_lm_class: str
    norm_class: str | None = None
    attention_class: str | None = None
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    softcapping_attribute: str | None = None
    logits_scaling_attribute: str | None = None
    supports_sdpa: bool = True
    tiny_config: Mapping[str, Any] = field(default_factory=dict)
    scaled_fields: Mapping[str, str] = field(default_factory=dict)
    experts_class: str | None = None

    def __post_init__(self) -> None:
        for name in ("model_type", "module", "config_class", "pretrained_class", "causal_lm_class"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.isidentifier():
                raise ValueError(f"Family.{name} must be an identifier, got {value!r}")
        for name in ("mlp_class", "experts_class", "norm_class", "attention_class"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.isidentifier()):
                raise ValueError(f"Family.{name} must be an identifier or None, got {value!r}")
        if self.mlp_class is None and self.experts_class is None:
            raise ValueError(f"{self.model_type}: a family needs an mlp_class, an experts_class or both; got neither")
        if not isinstance(self.attention_projections, tuple) or not all(
            isinstance(name, str) and name.isidentifier() for name in self.attention_projections
        ):
            raise ValueError(
                f"{self.model_type}: attention_projections must be a tuple of identifiers, got "
                f"{self.attention_projections!r}"
            )
        for name, source in self.scaled_fields.items():
            if source not in _SCALED_FIELD_SOURCES:
                raise ValueError(
                    f"{self.model_type}: scaled field {name!r} comes from {source!r}; allowed: "
                    f"{', '.join(_SCALED_FIELD_SOURCES)}"
                )
        # Rows are shared by every importer: keep their mappings read-only.
        object.__setattr__(self, "tiny_config", MappingProxyType(dict(self.tiny_config)))
        object.__setattr__(self, "scaled_fields", MappingProxyType(dict(self.scaled_fields)))

    @property
    def is_moe(self) -> bool:
        """Whether the family routes tokens to experts (its row names an `experts_class`)."""
        return self.experts_class is not None

    @property
    def chunked_classes(self) -> tuple[str, ...]:
        """The modeling classes whose `forward` runs over token chunks: the dense MLP and/or the experts."""
        return tuple(name for name in (self.mlp_class, self.experts_class) if name is not None)

    @property
    def configuration_module(self) -> str:
        return f"transformers.models.{self.module}.configuration_{self.module}"

    @property
    def modeling_module(self) -> str:
        return f"transformers.models.{self.module}.modeling_{self.module}"


# Sizes shared by every family's tiny test model (tests, examples, demo defaults).
TINY_COMMON: Mapping[str, Any] = MappingProxyType(
    dict(
        hidden_size=32,
        intermediate_size=88,  # not a multiple of hidden_size: the automatic chunk count rounds up
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=257,
        max_position_embeddings=512,
    )
)

_GEMMA_SCALED = {"query_pre_attn_scalar": "head_dim", "sliding_window": "half_seq"}

_ROWS = (
    Family("llama", "llama", "LlamaConfig", "LlamaPreTrainedModel", "LlamaMLP", "LlamaForCausalLM",
           norm_class="LlamaRMSNorm", attention_class="LlamaAttention",
           tiny_config=dict(tie_word_embeddings=False)),
    Family("qwen2", "qwen2", "Qwen2Config", "Qwen2PreTrainedModel", "Qwen2MLP", "Qwen2ForCausalLM",
           norm_class="Qwen2RMSNorm", attention_class="Qwen2Attention",
           tiny_config=dict(tie_word_embeddings=True)),
    Family("mistral", "mistral", "MistralConfig", "MistralPreTrainedModel", "MistralMLP", "MistralForCausalLM",
           norm_class="MistralRMSNorm", attention_class="MistralAttention",
           tiny_config=dict(tie_word_embeddings=False, sliding_window=None)),
    Family("gemma2", "gemma2", "Gemma2Config", "Gemma2PreTrainedModel", "Gemma2MLP", "Gemma2ForCausalLM",
           norm_class="Gemma2RMSNorm", attention_class="Gemma2Attention",
           softcapping_attribute="final_logit_softcapping", supports_sdpa=False,
           tiny_config=dict(head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=30.0,
                            attn_logit_softcapping=50.0, sliding_window=64, tie_word_embeddings=True),
           scaled_fields=_GEMMA_SCALED),
    Family("qwen3", "qwen3", "Qwen3Config", "Qwen3PreTrainedModel", "Qwen3MLP", "Qwen3ForCausalLM",
           norm_class="Qwen3RMSNorm", attention_class="Qwen3Attention",
           tiny_config=dict(head_dim=8, tie_word_embeddings=True)),  # upstream's head_dim default is 128
    Family("olmo2", "olmo2", "Olmo2Config", "Olmo2PreTrainedModel", "Olmo2MLP", "Olmo2ForCausalLM",
           norm_class="Olmo2RMSNorm", attention_class="Olmo2Attention",
           tiny_config=dict(pad_token_id=0, eos_token_id=2, tie_word_embeddings=False)),
    Family("smollm3", "smollm3", "SmolLM3Config", "SmolLM3PreTrainedModel", "SmolLM3MLP", "SmolLM3ForCausalLM",
           norm_class="SmolLM3RMSNorm", attention_class="SmolLM3Attention",
           # Token ids default to Llama-3's (128k); `no_rope_layer_interval` 2 makes the second layer skip RoPE.
           tiny_config=dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, no_rope_layer_interval=2,
                            tie_word_embeddings=True)),
    Family("phi3", "phi3", "Phi3Config", "Phi3PreTrainedModel", "Phi3MLP", "Phi3ForCausalLM",
           norm_class="Phi3RMSNorm", attention_class="Phi3Attention",
           attention_projections=("qkv_proj", "o_proj"),
           # Its MLP fuses gate and up in one `gate_up_proj`: still token by token.
           tiny_config=dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)),
    Family("granite", "granite", "GraniteConfig", "GranitePreTrainedModel", "GraniteMLP", "GraniteForCausalLM",
           norm_class="GraniteRMSNorm", attention_class="GraniteAttention",
           logits_scaling_attribute="logits_scaling",
           # Real Granite models use logits_scaling 8 or 16 and multipliers != 1; 1.0 would not test the scaling.
           tiny_config=dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                            attention_multiplier=0.25, tie_word_embeddings=True)),
    Family("gemma3_text", "gemma3", "Gemma3TextConfig", "Gemma3PreTrainedModel", "Gemma3MLP", "Gemma3ForCausalLM",
           norm_class="Gemma3RMSNorm", attention_class="Gemma3Attention",
           softcapping_attribute="final_logit_softcapping",
           # A window shorter than the tests' 50 tokens on every other layer (upstream: 5 of 6), starting with the
           # first: sliding and full attention both run, whatever the number of layers.
           tiny_config=dict(head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=30.0, sliding_window=16,
                            sliding_window_pattern=2, tie_word_embeddings=True),
           scaled_fields=_GEMMA_SCALED),
    # Mixture-of-experts rows. The tiny configs weigh the auxiliary loss 100x more than the real models (0.001), so
    # that with `output_router_logits=True` (tests/test_moe.py) a wrong auxiliary loss or gradient shows; they keep
    # upstream's default `output_router_logits=False`. Top-2 of 8 experts leaves most experts idle in a small chunk.
    Family("qwen3_moe", "qwen3_moe", "Qwen3MoeConfig", "Qwen3MoePreTrainedModel", "Qwen3MoeMLP", "Qwen3MoeForCausalLM",
           experts_class="Qwen3MoeExperts", norm_class="Qwen3MoeRMSNorm", attention_class="Qwen3MoeAttention",
           # Every layer is MoE, as in Qwen3-30B-A3B; tests/test_moe.py also makes a layer dense (`mlp_only_layers`),
           # which the row's `Qwen3MoeMLP` chunks.
           tiny_config=dict(head_dim=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=40,
                            norm_topk_prob=True, router_aux_loss_coef=0.1, tie_word_embeddings=False)),
    Family("mixtral", "mixtral", "MixtralConfig", "MixtralPreTrainedModel", None, "MixtralForCausalLM",
           experts_class="MixtralExperts",  # every layer is MoE: there is no dense MLP class
           norm_class="MixtralRMSNorm", attention_class="MixtralAttention",
           tiny_config=dict(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.1,
                            tie_word_embeddings=False)),
)

FAMILIES: Mapping[str, Family] = MappingProxyType({row.model_type: row for row in _ROWS})
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)

_BY_MODULE: Mapping[str, tuple[Family, str]] = MappingProxyType(
    {
        **{row.configuration_module: (row, "configuration") for row in _ROWS},
        **{row.modeling_module: (row, "modeling") for row in _ROWS},
    }
)


def get_family(model_type: str) -> Family:
    """The row of `model_type`; a `ValueError` naming it and the known families when minis does not patch it."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"model_type {model_type!r} is not a minis family; minis patches {', '.join(FAMILY_NAMES)}")
    return family


def family_of_module(module_name: str) -> tuple[Family, str] | None:
    """`(family, "configuration" | "modeling")` for a transformers module minis patches, else None."""
    return _BY_MODULE.get(module_name)

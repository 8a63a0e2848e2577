"""Pure PyTorch mini-sequence ops. Nothing here imports transformers or reads a model config."""

from .lm_loss import chunked_causal_lm_loss, shift_labels_left
from .mini_sequence import chunk_bounds, mini_sequence_apply
from .mlp import mini_sequence_mlp
from .rng_replay import UnreplayableRandomOpError

__all__ = [
    "UnreplayableRandomOpError",
    "chunk_bounds",
    "chunked_causal_lm_loss",
    "mini_sequence_apply",
    "mini_sequence_mlp",
    "shift_labels_left",
]

"""A small byte-level BPE tokenizer trained on the corpus minis ships, so the demo needs nothing from a hub.

`train_tokenizer()` trains in about a second on the ~60 KB corpus (`minis/data/corpus.txt`, original prose written
for this package) and returns a `transformers.PreTrainedTokenizerFast` that saves and loads with
`save_pretrained` / `AutoTokenizer.from_pretrained` like any other.
"""

from __future__ import annotations

import os
from importlib import resources

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "corpus_path",
    "load_corpus_text",
    "train_tokenizer",
]

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

# 256 byte symbols and the special tokens must fit, and BPE needs a few merges to be worth its name.
_MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1


def corpus_path() -> str:
    """Filesystem path of the shipped corpus (the package is installed unzipped, `zip_safe=False`)."""
    return str(resources.files("minis").joinpath("data", "corpus.txt"))


def load_corpus_text(text_path: str | os.PathLike | None = None) -> str:
    """The text of `text_path`, or of the shipped corpus when it is None (UTF-8)."""
    if text_path is None:
        return resources.files("minis").joinpath("data", "corpus.txt").read_text(encoding="utf-8")
    with open(text_path, encoding="utf-8") as file:
        return file.read()


def train_tokenizer(vocab_size: int = 1024, text_path: str | os.PathLike | None = None):
    """Trains a byte-level BPE tokenizer on the shipped corpus (or on `text_path`).

    Byte-level means every string round-trips exactly (decode(encode(s)) == s), whatever characters it holds.
    The vocabulary holds the special tokens (`<|bos|>`, `<|eos|>`, `<|pad|>`, ids 0, 1 and 2), the 256 byte
    symbols and the merges learned from the text: exactly `vocab_size` entries unless the text runs out of pairs
    to merge first (the ~60 KB corpus supports a few thousand).

    Args:
        vocab_size: the largest vocabulary size, special tokens included.
        text_path: a UTF-8 text file to train on instead of the shipped corpus.

    Returns:
        A `transformers.PreTrainedTokenizerFast` with bos, eos and pad tokens set. It adds no special tokens by
        itself: callers put bos/eos where they want them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an int of at least {_MIN_VOCAB_SIZE}, got {vocab_size!r}")
    text = load_corpus_text(text_path)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the text or not
        show_progress=False,
    )
    # Paragraphs as training items: the pre-tokenizer splits them into words anyway, and a paragraph keeps the
    # newlines that separate them out of the merges.
    paragraphs = [paragraph + "\n\n" for paragraph in text.split("\n\n") if paragraph.strip()]
    backend.train_from_iterator(paragraphs, trainer=trainer, length=len(paragraphs))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,  # decode must give back the text exactly
        model_max_length=1 << 30,  # the demo chunks the whole corpus itself; no truncation warnings
    )

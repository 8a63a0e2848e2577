"""The demo's tokenizer: byte-level BPE trained on the shipped corpus, saved and reloaded like any HF tokenizer."""

import os

import pytest

from minis.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    corpus_path,
    load_corpus_text,
    train_tokenizer,
)

SAMPLE = "Rivers rewrite their beds, one season at a time.\n\n  Café prices: 2.50 a bunch — naïve 🙂 ok?"


def test_corpus_is_shipped_and_sized():
    text = load_corpus_text()
    assert os.path.isfile(corpus_path())
    assert 40_000 <= len(text.encode("utf-8")) <= 80_000
    assert text.count("\n\n") > 100  # many paragraphs, not one long line


def test_round_trip_through_save_and_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = train_tokenizer(1024)
    assert len(tokenizer) == 1024
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)

    assert len(reloaded) == 1024
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    for text in (SAMPLE, load_corpus_text()[:5000]):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
        assert max(ids) < 1024
        assert reloaded.decode(ids) == text  # byte-level: exact, spaces and non-ASCII included
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert [reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id] == [0, 1, 2]


@pytest.mark.parametrize("vocab_size", [300, 2048])
def test_vocab_size_is_respected(vocab_size):
    tokenizer = train_tokenizer(vocab_size)
    assert len(tokenizer) == vocab_size
    ids = tokenizer(load_corpus_text(), add_special_tokens=False)["input_ids"]
    assert max(ids) < vocab_size


def test_training_is_deterministic():
    assert train_tokenizer(512).get_vocab() == train_tokenizer(512).get_vocab()


def test_trains_on_another_text(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("the cat sat on the mat. the cat ate.\n\nthe mat sat still.\n" * 20, encoding="utf-8")
    tokenizer = train_tokenizer(300, text_path=path)
    assert len(tokenizer) <= 300  # a small text runs out of merges before the size is reached
    assert tokenizer.decode(tokenizer("the cat sat")["input_ids"]) == "the cat sat"


def test_rejects_a_vocabulary_too_small_for_the_bytes():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(100)

"""The README's Python snippet runs as written, on a tiny checkpoint saved here instead of the hub model."""

import os
import re
import warnings

import torch
from framework_helpers import TOKENIZER_VOCAB, model, tokenizer
from helpers import REPO_ROOT


def readme_snippet() -> str:
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as readme:
        blocks = re.findall(r"```python\n(.*?)```", readme.read(), flags=re.S)
    snippet = next(block for block in blocks if "from_pretrained" in block)
    assert re.search(r'^name = ".+"$', snippet, flags=re.M), "the snippet names its model in one `name = ...` line"
    return snippet


def test_readme_snippet_runs_and_its_comments_hold(tmp_path):
    tiny = model("llama")
    tiny.save_pretrained(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    snippet = re.sub(r'^name = ".+"$', f"name = {str(tmp_path)!r}", readme_snippet(), flags=re.M)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype.*")  # the deprecated spelling must not be used
        exec(compile(snippet, "README.md", "exec"), namespace)
    import minis

    loaded = namespace["model"]
    assert minis.is_active(loaded)
    ids = namespace["ids"]
    assert loaded.dtype == torch.bfloat16
    # The last line asks for logits in training with use_mini_sequence_loss=False.
    assert loaded(input_ids=ids, labels=ids).logits.shape == (1, ids.shape[1], TOKENIZER_VOCAB)
    loaded.config.use_mini_sequence_loss = True
    assert loaded(input_ids=ids, labels=ids).logits is None
    loaded.eval()
    assert loaded(input_ids=ids, labels=ids).logits.shape == (1, ids.shape[1], TOKENIZER_VOCAB)

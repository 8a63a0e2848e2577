"""`examples/longlora/fine-tune.py`: LongLoRA's flags, on transformers 5, with a tiny local checkpoint and the
shipped corpus (no hub).

The command under test is LongLoRA's (all of its flags, `--deepspeed` aside, which needs GPUs) plus `--data_path`
and `--use_cpu True`: transformers refuses `--bf16 True` on a machine without a GPU unless told to use the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from framework_helpers import REPO_ROOT, model, tokenizer

SCRIPT = os.path.join(REPO_ROOT, "examples", "longlora", "fine-tune.py")


def load_script():
    """The script as a module (its file name has a dash, so it cannot be imported by name)."""
    if "longlora_fine_tune" not in sys.modules:
        spec = importlib.util.spec_from_file_location("longlora_fine_tune", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules["longlora_fine_tune"]


def save_checkpoint(tmp_path_factory, family: str) -> str:
    """A tiny model and its tokenizer saved with `save_pretrained`, as `--model_name_or_path` reads them."""
    path = tmp_path_factory.mktemp(f"tiny-{family}")
    model(family).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def gemma2_checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory, "gemma2")


def longlora_command(checkpoint: str, output_dir: str, *extra: str) -> list[str]:
    from minis.tokenizer import corpus_path

    return [
        sys.executable, SCRIPT,
        "--model_name_or_path", checkpoint,
        "--bf16", "True",
        "--output_dir", output_dir,
        "--cache_dir", os.path.join(output_dir, "cache"),
        "--model_max_length", "128",
        "--use_flash_attn", "True",
        "--low_rank_training", "False",
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", "1",
        "--per_device_eval_batch_size", "2",
        "--gradient_accumulation_steps", "2",
        "--evaluation_strategy", "no",
        "--save_strategy", "steps",
        "--save_steps", "2",
        "--save_total_limit", "2",
        "--learning_rate", "2e-5",
        "--weight_decay", "0.0",
        "--warmup_steps", "1",
        "--lr_scheduler_type", "constant_with_warmup",
        "--logging_steps", "1",
        "--tf32", "True",
        "--max_steps", "3",
        "--report_to", "none",
        "--data_path", corpus_path(),
        "--use_cpu", "True",
        *extra,
    ]  # fmt: skip


def run(command: list[str], minis_on: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIS": "1" if minis_on else "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def logged_losses(output_dir: str) -> list[float]:
    with open(os.path.join(output_dir, "trainer_state.json")) as handle:
        return [entry["loss"] for entry in json.load(handle)["log_history"] if "loss" in entry]


def test_longlora_flags_parse_on_transformers_5():
    script = load_script()
    parser = script.transformers.HfArgumentParser(
        (script.ModelArguments, script.DataArguments, script.TrainingArguments)
    )
    with pytest.warns(RuntimeWarning, match="tf32"):
        _, data_args, args = parser.parse_args_into_dataclasses(
            args=longlora_command("some/model", "/tmp/out")[2:] + ["--deepspeed", "", "--use_full_attn", "True"]
        )
    assert args.eval_strategy == "no" and args.evaluation_strategy == "no"
    assert args.model_max_length == 128 and args.use_flash_attn and not args.low_rank_training
    assert args.trainable_params == "embed,norm" and args.max_steps == 3 and args.tf32 is None
    assert data_args.data_path.endswith("corpus.txt")


def test_flash_attn_fallback_or_clear_stop():
    script = load_script()

    class Args:
        use_flash_attn = True
        require_flash_attn = False

    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed; the fallback cannot be observed")
    with pytest.warns(RuntimeWarning, match="flash-attention 2 is not usable"):
        assert script.attention_implementation(Args) is None
    Args.require_flash_attn = True
    with pytest.raises(SystemExit, match="pip install flash-attn"):
        script.attention_implementation(Args)


def test_rope_is_scaled_linearly_beyond_the_trained_context():
    from minis.testing import tiny_config

    script = load_script()
    config = tiny_config("llama")  # max_position_embeddings=512
    script.scale_rope(config, 1000)
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.0
    untouched = tiny_config("llama")
    script.scale_rope(untouched, 512)
    assert untouched.rope_parameters["rope_type"] == "default"


def test_fine_tune_runs_the_longlora_command(gemma2_checkpoint, tmp_path):
    """The issue's example: full fine-tuning of a (tiny) Gemma-2 with LongLoRA's flags."""
    output_dir = str(tmp_path / "full")
    result = run(longlora_command(gemma2_checkpoint, output_dir))
    log = result.stdout + result.stderr
    assert "minis active: True" in log
    assert "flash-attention 2 is not usable" in log or "flash_attention_2" in log
    assert os.path.isfile(os.path.join(output_dir, "model.safetensors"))
    assert os.path.isdir(os.path.join(output_dir, "checkpoint-2"))
    assert len(logged_losses(output_dir)) == 3


@pytest.mark.slow
def test_fine_tune_low_rank_matches_minis_off(checkpoint, tmp_path):
    """LongLoRA's LoRA mode (`--low_rank_training True`, embeddings and norms trainable) gives the same loss curve
    with minis as with MINIS=0 (bf16 autocast: bf16 tolerance)."""
    extra = ("--low_rank_training", "True", "--trainable_params", "embed,norm")
    on_dir, off_dir = str(tmp_path / "on"), str(tmp_path / "off")
    on = run(longlora_command(checkpoint, on_dir, *extra), minis_on=True)
    run(longlora_command(checkpoint, off_dir, *extra), minis_on=False)
    assert "minis active: True" in on.stdout + on.stderr
    assert os.path.isfile(os.path.join(on_dir, "adapter_model.safetensors"))
    assert logged_losses(on_dir) == pytest.approx(logged_losses(off_dir), rel=1e-3)

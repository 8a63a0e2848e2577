"""`examples/longlora/fine-tune.py`: LongLoRA's flags, on transformers 5, with a tiny local checkpoint and the
shipped corpus (no hub).

The command under test is LongLoRA's (all of its flags, `--deepspeed` aside, which needs GPUs) plus `--data_path`
and `--use_cpu True`: transformers refuses `--bf16 True` on a machine without a GPU unless told to use the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from framework_helpers import model, tokenizer
from helpers import REPO_ROOT

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


# Every `TrainingArguments` field of transformers 4.34.0 (LongLoRA's release), read from its training_args.py.
TRANSFORMERS_4_34_TRAINING_ARGUMENTS = """
output_dir overwrite_output_dir do_train do_eval do_predict evaluation_strategy prediction_loss_only
per_device_train_batch_size per_device_eval_batch_size per_gpu_train_batch_size per_gpu_eval_batch_size
gradient_accumulation_steps eval_accumulation_steps eval_delay learning_rate weight_decay adam_beta1 adam_beta2
adam_epsilon max_grad_norm num_train_epochs max_steps lr_scheduler_type warmup_ratio warmup_steps log_level
log_level_replica log_on_each_node logging_dir logging_strategy logging_first_step logging_steps
logging_nan_inf_filter save_strategy save_steps save_total_limit save_safetensors save_on_each_node no_cuda
use_cpu use_mps_device seed data_seed jit_mode_eval use_ipex bf16 fp16 fp16_opt_level half_precision_backend
bf16_full_eval fp16_full_eval tf32 local_rank ddp_backend tpu_num_cores tpu_metrics_debug debug
dataloader_drop_last eval_steps dataloader_num_workers past_index run_name disable_tqdm remove_unused_columns
label_names load_best_model_at_end metric_for_best_model greater_is_better ignore_data_skip sharded_ddp fsdp
fsdp_min_num_params fsdp_config fsdp_transformer_layer_cls_to_wrap deepspeed label_smoothing_factor optim
optim_args adafactor group_by_length length_column_name report_to ddp_find_unused_parameters ddp_bucket_cap_mb
ddp_broadcast_buffers dataloader_pin_memory skip_memory_metrics use_legacy_prediction_loop push_to_hub
resume_from_checkpoint hub_model_id hub_strategy hub_token hub_private_repo hub_always_push
gradient_checkpointing include_inputs_for_metrics fp16_backend push_to_hub_model_id push_to_hub_organization
push_to_hub_token mp_parameters auto_find_batch_size full_determinism torchdynamo ray_scope ddp_timeout
torch_compile torch_compile_backend torch_compile_mode dispatch_batches include_tokens_per_second
""".split()


def parse_training_args(*flags: str):
    """The script's TrainingArguments parsed from `flags` (plus an output dir, CPU and no reporting)."""
    script = load_script()
    parser = script.transformers.HfArgumentParser((script.TrainingArguments,))
    (args,) = parser.parse_args_into_dataclasses(
        args=["--output_dir", "/tmp/longlora-out", "--use_cpu", "True", "--report_to", "none", *flags]
    )
    return args


def removed_flags_here() -> set[str]:
    import dataclasses

    import transformers

    upstream = {field.name for field in dataclasses.fields(transformers.TrainingArguments)}
    return {name for name in TRANSFORMERS_4_34_TRAINING_ARGUMENTS if name not in upstream}


def test_every_transformers_4_34_flag_that_transformers_5_removed_is_handled():
    removed = removed_flags_here()
    assert len(removed) == 32  # transformers 5.24: evaluation_strategy and 31 others
    assert set(load_script().REMOVED_TRAINING_FLAGS) == removed


def test_removed_flags_with_a_transformers_5_form_are_mapped(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "unset")  # restored after the test
    mapped = {
        "--evaluation_strategy": "steps",
        "--per_gpu_train_batch_size": "4",
        "--per_gpu_eval_batch_size": "3",
        "--warmup_ratio": "0.03",
        "--logging_dir": "/tmp/tb-logs",
        "--no_cuda": "True",
        "--tpu_metrics_debug": "True",
        "--adafactor": "True",
        "--group_by_length": "True",
        "--include_inputs_for_metrics": "True",
        "--push_to_hub_model_id": "long-model",
        "--push_to_hub_organization": "some-org",
        "--push_to_hub_token": "hf_token",
        "--torchdynamo": "eager",
        "--dispatch_batches": "False",
        "--include_tokens_per_second": "True",
    }
    args = parse_training_args("--eval_steps", "5", *[part for pair in mapped.items() for part in pair])
    assert args.eval_strategy == "steps"
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (4, 3)
    assert args.warmup_steps == 0.03 and args.get_warmup_steps(100) == 3  # 4.34: ceil(0.03 * 100)
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == "/tmp/tb-logs"
    assert args.use_cpu and args.debug == ["tpu_metrics_debug"]
    assert args.optim == "adafactor" and args.train_sampling_strategy == "group_by_length"
    assert args.include_for_metrics == ["inputs"]
    assert args.hub_model_id == "some-org/long-model" and args.hub_token == "hf_token"
    assert args.torch_compile and args.torch_compile_backend == "eager"
    assert args.accelerator_config.dispatch_batches is False
    assert args.include_num_input_tokens_seen == "all"
    notices = [line for line in capsys.readouterr().err.splitlines() if "a transformers 4.34 flag" in line]
    assert len(notices) == len(mapped)
    for flag, value in mapped.items():
        expected = f"fine-tune.py: {flag} {value}: a transformers 4.34 flag, passed on as"
        assert any(line.startswith(expected) for line in notices), expected


def test_a_bare_boolean_removed_flag_means_true():
    assert parse_training_args("--no_cuda").use_cpu


def test_removed_fsdp_flags_go_into_fsdp_config():
    args = parse_training_args(
        "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"
    )
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    args = parse_training_args(
        "--fsdp", "full_shard auto_wrap", "--fsdp_min_num_params", "1000", "--fsdp_config", '{"cpu_offload": true}'
    )
    # 4.34 wrapped by size whenever min_num_params > 0; transformers 5 must be told the policy
    assert args.fsdp_config["min_num_params"] == 1000 and args.fsdp_config["auto_wrap_policy"] == "SIZE_BASED_WRAP"
    assert args.fsdp_config["cpu_offload"] is True


def test_warmup_ratio_follows_transformers_4_34():
    assert parse_training_args("--warmup_ratio", "0.1", "--warmup_steps", "5").warmup_steps == 5  # steps win
    with pytest.raises(ValueError, match="--warmup_ratio 1.0.*--warmup_steps N"):
        parse_training_args("--warmup_ratio", "1.0")


def test_removed_flags_asking_for_nothing_new_are_dropped_with_a_notice(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    inert = {
        "--overwrite_output_dir": "True",
        "--save_safetensors": "False",
        "--use_mps_device": "False",
        "--jit_mode_eval": "False",
        "--use_ipex": "False",
        "--fp16_opt_level": "O2",
        "--half_precision_backend": "cuda_amp",
        "--fp16_backend": "auto",
        "--tpu_num_cores": "8",
        "--past_index": "-1",
        "--sharded_ddp": "''",  # the empty string, as the notice quotes it
        "--use_legacy_prediction_loop": "False",
        "--mp_parameters": "x",
        "--ray_scope": "last",
    }
    args = parse_training_args(*[part for flag, value in inert.items() for part in (flag, value.strip("'"))])
    assert args.per_device_train_batch_size == 8 and args.optim == "adamw_torch"  # nothing else changed
    notices = capsys.readouterr().err.splitlines()
    for flag, value in inert.items():
        expected = f"fine-tune.py: {flag} {value}: a transformers 4.34 flag, dropped"
        assert any(line.startswith(expected) for line in notices), expected


@pytest.mark.parametrize(
    ("flag", "value", "advice"),
    [
        ("--sharded_ddp", "zero_dp_2", "--fsdp True or --deepspeed"),
        ("--half_precision_backend", "apex", "torch.amp"),
        ("--fp16_backend", "apex", "torch.amp"),
        ("--use_ipex", "True", "drop the flag"),
        ("--jit_mode_eval", "True", "--torch_compile True"),
        ("--past_index", "0", "drop the flag"),
        ("--use_legacy_prediction_loop", "True", "drop the flag"),
    ],
)
def test_removed_flags_transformers_5_cannot_honour_stop_with_the_replacement(flag, value, advice):
    with pytest.raises(ValueError, match=f"{flag} {value}: transformers 5 removed this flag.*{re.escape(advice)}"):
        parse_training_args(flag, value)


def test_longlora_doc_lists_every_removed_flag():
    with open(os.path.join(REPO_ROOT, "docs", "frameworks", "longlora.md"), encoding="utf-8") as handle:
        doc = handle.read()
    section = doc.split("## transformers 4.34 flags that transformers 5 removed", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `--(\w+)`", section, flags=re.MULTILINE))
    assert listed == set(load_script().REMOVED_TRAINING_FLAGS)


def test_flash_attn_fallback_or_clear_stop():
    script = load_script()

    class Args:
        use_flash_attn = True
        require_flash_attn = False

    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed; the fallback cannot be observed")
    assert script.attention_implementation(Args) is None
    Args.require_flash_attn = True
    with pytest.raises(SystemExit, match="pip install flash-attn"):
        script.attention_implementation(Args)


@pytest.mark.parametrize(("family", "fallback"), [("llama", "sdpa"), ("qwen2", "sdpa"), ("gemma2", "eager")])
def test_flash_attn_fallback_warning_names_the_attention_transformers_chose(family, fallback):
    """transformers picks sdpa where a model supports it; Gemma-2 (logit softcapping) gets eager, and the warning
    must say so rather than promise sdpa."""
    from minis.testing import tiny_model

    model = tiny_model(family)
    assert model.config._attn_implementation == fallback  # what transformers chose with attn_implementation=None
    with pytest.warns(RuntimeWarning, match=f"flash-attention 2 is not usable.*falling back to {fallback} attention"):
        load_script().warn_flash_attention_fallback(model)


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
    assert "falling back to eager attention" in log or "flash_attention_2" in log  # Gemma-2: no sdpa
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

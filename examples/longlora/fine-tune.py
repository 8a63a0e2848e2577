"""LongLoRA's `fine-tune.py`, for transformers 5 and minis: long-context continued pre-training with the HF Trainer.

It takes the flags of LongLoRA's script (https://github.com/dvlab-research/LongLoRA, `fine-tune.py`), so its
commands run unchanged, e.g. on 8 GPUs:

    torchrun --nproc_per_node=8 fine-tune.py --model_name_or_path google/gemma-2-9b --bf16 True \
        --output_dir out --model_max_length 8192 --use_flash_attn True --low_rank_training False \
        --num_train_epochs 1 --per_device_train_batch_size 1 --per_device_eval_batch_size 2 \
        --gradient_accumulation_steps 8 --evaluation_strategy "no" --save_strategy "steps" --save_steps 1000 \
        --save_total_limit 2 --learning_rate 2e-5 --weight_decay 0.0 --warmup_steps 20 \
        --lr_scheduler_type "constant_with_warmup" --logging_steps 1 --deepspeed ds_configs/stage2.json \
        --tf32 True --max_steps 1000 --data_path corpus.jsonl

minis is not imported here: installed, it makes every model of a minis family (`minis.families`) mini-sequence at
`import transformers`; `MINIS=0` runs the same command without it. What differs from LongLoRA's script:

- Data comes from `--data_path` (a .txt file, a .jsonl/.json file with a "text" field, or a directory of them),
  since a hub may be unreachable. Without it, `--dataset_name` (default LongLoRA's RedPajama sample) is loaded
  from the hub. Texts are joined with EOS and cut into `model_max_length` blocks, as LongLoRA does.
- `--use_flash_attn True` uses flash-attention 2 when it is installed and a CUDA GPU is present; otherwise the
  script warns and uses transformers' default attention for the model: sdpa for llama, qwen2 and mistral, eager
  for gemma2 (sdpa cannot do its logit softcapping), which builds the (heads x seq x seq) scores. Pass
  `--require_flash_attn True` to stop with an error instead.
- LongLoRA's shifted sparse attention (S²-Attn, `--use_full_attn False`) patched transformers 4.3x's Llama
  attention and does not exist here: training always uses full attention (LongLoRA's `--use_full_attn True`).
  Passing `--use_full_attn False` warns.
- The transformers-4.34 `TrainingArguments` flags that transformers 5 removed (`--evaluation_strategy`,
  `--warmup_ratio`, `--per_gpu_train_batch_size`, ...; `REMOVED_TRAINING_FLAGS`) are accepted: mapped onto
  their transformers-5 form or dropped, with a notice each, or rejected with an error naming the replacement
  where transformers 5 cannot do what they ask. `--tf32 True` without a GPU that supports it warns and is ignored
  instead of failing.
- RoPE is scaled linearly when `--model_max_length` exceeds the model's `max_position_embeddings` (LongLoRA's
  rule), through transformers 5's `rope_parameters`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import DataCollatorForLanguageModeling, Trainer

logger = logging.getLogger("longlora")

IGNORE_INDEX = -100
DEFAULT_PAD_TOKEN = "[PAD]"
DEFAULT_EOS_TOKEN = "</s>"
DEFAULT_BOS_TOKEN = "<s>"
DEFAULT_UNK_TOKEN = "<unk>"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="EleutherAI/pythia-1.4b-deduped")
    model_type: str = field(default="llama", metadata={"help": "llama or gpt-neox (chooses the LoRA targets)."})


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None, metadata={"help": "Local .txt/.jsonl/.json file or directory of them (field 'text')."}
    )
    dataset_name: str = field(
        default="togethercomputer/RedPajama-Data-1T-Sample", metadata={"help": "Hub dataset when no --data_path."}
    )
    preprocessing_num_workers: int | None = field(default=None)


# ---------------------------------------------------------------------------------------------------------------
# transformers 4.34's TrainingArguments flags that transformers 5 no longer has
#
# LongLoRA was written against transformers 4.34. Of that release's `TrainingArguments` flags, the ones below are
# gone from transformers 5, so argparse would reject a 4.34 command line that uses any of them. This script accepts
# each one and does what 4.34 did where transformers 5 can: it maps the value onto the transformers-5 equivalent, or
# drops it when it asks for nothing transformers 5 does not already do, printing one notice line either way. A
# value that transformers 5 cannot honour stops the script with an error naming the flag and what to use instead.
# docs/frameworks/longlora.md has the same table in prose.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemovedFlag:
    """A transformers-4.34 `TrainingArguments` flag that transformers 5 removed, and how this script handles it.

    Args:
        type: the type the command-line value is parsed as.
        replacement: the transformers-5 way to get what the flag asked for, or why nothing is needed or possible;
            shown in the notices, the errors and `--help`.
        inert: True for values that ask for nothing transformers 5 does not already do (usually 4.34's default):
            such a value is dropped with a notice.
        translate: for the other values, sets the transformers-5 equivalent on the arguments and returns what it
            did, for the notice (it may raise `ValueError` for a value with no equivalent). None: every non-inert
            value is rejected.
    """

    type: type
    replacement: str
    inert: Callable[[Any], bool] = field(default=lambda value: False)
    translate: Callable[[Any, Any], str] | None = None


def _always(value: Any) -> bool:
    return True


def _equals(*inert_values: Any) -> Callable[[Any], bool]:
    return lambda value: value in inert_values


def _rename(new_name: str) -> Callable[[Any, Any], str]:
    """The value goes unchanged to the transformers-5 field `new_name`."""

    def translate(args, value):
        setattr(args, new_name, value)
        return f"passed on as --{new_name} {value}"

    return translate


def _assign(new_name: str, new_value: Any) -> Callable[[Any, Any], str]:
    """A boolean flag that asked for `--new_name new_value`."""

    def translate(args, value):
        setattr(args, new_name, new_value)
        return f"passed on as --{new_name} {new_value}"

    return translate


def _config_dict(value: Any) -> dict:
    """A dict-valued transformers-5 argument (`fsdp_config`, `accelerator_config`) as a dict, whether it is unset,
    a dict, a JSON string or the path of a JSON file, so that a removed flag can be merged into it."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        if value.lstrip().startswith("{"):
            return json.loads(value)
        with open(value, encoding="utf-8") as handle:
            return json.load(handle)
    raise ValueError(f"expected a dict, a JSON string or a JSON file path, got {value!r}")


def _warmup_ratio(args, ratio: float) -> str:
    # 4.34: ceil(total steps * warmup_ratio) warmup steps, unless --warmup_steps > 0, which overrides the ratio.
    # transformers 5: a --warmup_steps value below 1 is that same ratio.
    if not 0 <= ratio <= 1:
        raise ValueError(f"--warmup_ratio {ratio}: must lie in [0, 1]")
    if args.warmup_steps > 0:
        return f"dropped: --warmup_steps {args.warmup_steps} overrides it, as in transformers 4.34"
    if ratio == 1:
        raise ValueError(
            "--warmup_ratio 1.0 (warm up over the whole run) has no transformers-5 form: --warmup_steps 1.0 means "
            "one step. Pass --warmup_steps N with N the total number of optimizer steps."
        )
    args.warmup_steps = ratio
    return f"passed on as --warmup_steps {ratio} (transformers 5 reads a value below 1 as a fraction of the steps)"


def _logging_dir(args, path: str) -> str:
    os.environ["TENSORBOARD_LOGGING_DIR"] = path
    return f"passed on as TENSORBOARD_LOGGING_DIR={path} (where transformers 5's TensorBoard callback looks)"


def _tpu_metrics_debug(args, value: bool) -> str:
    if isinstance(args.debug, str):
        args.debug = f"{args.debug} tpu_metrics_debug".strip()
    else:  # None or a list
        args.debug = [*(args.debug or []), "tpu_metrics_debug"]
    return "passed on as --debug tpu_metrics_debug"


def _fsdp_min_num_params(args, count: int) -> str:
    # 4.34 wrapped by size whenever min_num_params > 0; transformers 5 needs the size-based policy named.
    config = _config_dict(args.fsdp_config)
    config.update(auto_wrap_policy="SIZE_BASED_WRAP", min_num_params=count)
    args.fsdp_config = config
    return f"passed on as --fsdp_config '{json.dumps(config)}'"


def _fsdp_layer_class(args, class_name: str) -> str:
    config = _config_dict(args.fsdp_config)
    classes = config.get("transformer_layer_cls_to_wrap") or []
    classes = [classes] if isinstance(classes, str) else list(classes)
    config["transformer_layer_cls_to_wrap"] = classes + [class_name]
    args.fsdp_config = config
    return f"passed on as --fsdp_config '{json.dumps(config)}'"


def _include_inputs_for_metrics(args, value: bool) -> str:
    if "inputs" not in args.include_for_metrics:
        args.include_for_metrics = [*args.include_for_metrics, "inputs"]
    return "passed on as --include_for_metrics inputs"


def _hub_model_id(args, value: str) -> str:
    # 4.34: model id and organization together name the repository; an organization alone names it after the
    # output directory. transformers 5 takes the full name in --hub_model_id.
    name = args.push_to_hub_model_id or os.path.basename(os.path.normpath(args.output_dir or "trainer_output"))
    organization = args.push_to_hub_organization
    args.hub_model_id = f"{organization}/{name}" if organization else name
    return f"passed on as --hub_model_id {args.hub_model_id}"


def _torchdynamo(args, backend: str) -> str:
    args.torch_compile_backend = backend
    args.torch_compile = True
    return f"passed on as --torch_compile True --torch_compile_backend {backend}"


def _dispatch_batches(args, value: bool) -> str:
    config = _config_dict(args.accelerator_config)
    config["dispatch_batches"] = value
    args.accelerator_config = config
    return f"passed on as --accelerator_config '{json.dumps(config)}'"


_TORCH_AMP_BACKENDS = ("auto", "cuda_amp", "cpu_amp")  # what 4.34 chose without Apex; transformers 5 always does

REMOVED_TRAINING_FLAGS: dict[str, RemovedFlag] = {
    "evaluation_strategy": RemovedFlag(str, "--eval_strategy", translate=_rename("eval_strategy")),
    "overwrite_output_dir": RemovedFlag(
        bool, "nothing needed: 4.34's Trainer read it only in init_git_repo, which this script never calls",
        inert=_always,
    ),
    "per_gpu_train_batch_size": RemovedFlag(
        int, "--per_device_train_batch_size", inert=_equals(0), translate=_rename("per_device_train_batch_size")
    ),
    "per_gpu_eval_batch_size": RemovedFlag(
        int, "--per_device_eval_batch_size", inert=_equals(0), translate=_rename("per_device_eval_batch_size")
    ),
    "warmup_ratio": RemovedFlag(
        float, "--warmup_steps R (a value below 1 is a fraction of the steps)",
        inert=_equals(0), translate=_warmup_ratio,
    ),
    "logging_dir": RemovedFlag(str, "the TENSORBOARD_LOGGING_DIR environment variable", translate=_logging_dir),
    "save_safetensors": RemovedFlag(
        bool, "nothing needed: transformers 5 always saves safetensors, never pytorch_model.bin", inert=_always
    ),
    "no_cuda": RemovedFlag(bool, "--use_cpu", inert=_equals(False), translate=_rename("use_cpu")),
    "use_mps_device": RemovedFlag(
        bool, "nothing needed: an available MPS device is used by itself; --use_cpu True avoids it", inert=_always
    ),
    "jit_mode_eval": RemovedFlag(
        bool, "JIT tracing for evaluation was removed; --torch_compile True is the nearest", inert=_equals(False)
    ),
    "use_ipex": RemovedFlag(
        bool, "the Intel Extension for PyTorch integration was removed; drop the flag", inert=_equals(False)
    ),
    "fp16_opt_level": RemovedFlag(
        str, "nothing needed: it set Apex AMP's level, and 4.34 ignored it without Apex; fp16 uses torch.amp",
        inert=_always,
    ),
    "half_precision_backend": RemovedFlag(
        str, "Apex AMP was removed: --fp16/--bf16 always use torch.amp, as 4.34's other backends did",
        inert=_equals(*_TORCH_AMP_BACKENDS),
    ),
    "fp16_backend": RemovedFlag(
        str, "Apex AMP was removed: --fp16/--bf16 always use torch.amp, as 4.34's other backends did",
        inert=_equals(*_TORCH_AMP_BACKENDS),
    ),
    "tpu_num_cores": RemovedFlag(
        int, "nothing needed: only 4.x's xla_spawn.py launcher read it, not the Trainer", inert=_always
    ),
    "tpu_metrics_debug": RemovedFlag(
        bool, "--debug tpu_metrics_debug", inert=_equals(False), translate=_tpu_metrics_debug
    ),
    "past_index": RemovedFlag(
        int, "feeding past states back, as for Transformer-XL and XLNet, was removed; drop the flag", inert=_equals(-1)
    ),
    "sharded_ddp": RemovedFlag(
        str, "FairScale sharded DDP was removed; use --fsdp True or --deepspeed with a ZeRO config",
        inert=_equals("", "False", "false"),
    ),
    "fsdp_min_num_params": RemovedFlag(
        int, '--fsdp_config \'{"auto_wrap_policy": "SIZE_BASED_WRAP", "min_num_params": N}\'',
        inert=_equals(0), translate=_fsdp_min_num_params,
    ),
    "fsdp_transformer_layer_cls_to_wrap": RemovedFlag(
        str, '--fsdp_config \'{"transformer_layer_cls_to_wrap": ["CLASS"]}\'', translate=_fsdp_layer_class
    ),
    "adafactor": RemovedFlag(bool, "--optim adafactor", inert=_equals(False), translate=_assign("optim", "adafactor")),
    "group_by_length": RemovedFlag(
        bool, "--train_sampling_strategy group_by_length", inert=_equals(False),
        translate=_assign("train_sampling_strategy", "group_by_length"),
    ),
    "use_legacy_prediction_loop": RemovedFlag(
        bool, "transformers 5 has only the (non-legacy) evaluation loop; drop the flag", inert=_equals(False)
    ),
    "include_inputs_for_metrics": RemovedFlag(
        bool, "--include_for_metrics inputs", inert=_equals(False), translate=_include_inputs_for_metrics
    ),
    "push_to_hub_model_id": RemovedFlag(str, "--hub_model_id ORGANIZATION/NAME", translate=_hub_model_id),
    "push_to_hub_organization": RemovedFlag(str, "--hub_model_id ORGANIZATION/NAME", translate=_hub_model_id),
    "push_to_hub_token": RemovedFlag(str, "--hub_token", translate=_rename("hub_token")),
    "mp_parameters": RemovedFlag(
        str, "nothing needed: SageMaker's launcher passed it and 4.34's Trainer ignored it", inert=_always
    ),
    "torchdynamo": RemovedFlag(str, "--torch_compile_backend (it turns --torch_compile on)", translate=_torchdynamo),
    "ray_scope": RemovedFlag(
        str, "nothing needed: only Ray hyperparameter search read it, and this script does not search",
        inert=_always,
    ),
    "dispatch_batches": RemovedFlag(
        bool, '--accelerator_config \'{"dispatch_batches": true}\'', translate=_dispatch_batches
    ),
    "include_tokens_per_second": RemovedFlag(
        bool, "--include_num_input_tokens_seen True (logs train_tokens_per_second with every log)",
        inert=_equals(False), translate=_assign("include_num_input_tokens_seen", True),
    ),
}  # fmt: skip


def apply_removed_flags(args) -> list[str]:
    """Maps, drops or rejects the removed transformers-4.34 flags present in `args` (see `REMOVED_TRAINING_FLAGS`).

    Returns one notice per flag given; raises `ValueError` naming the flag and its replacement for a value that
    transformers 5 cannot honour. Runs before transformers' own `__post_init__`, so mapped values are validated
    and processed exactly like values given under their transformers-5 names.
    """
    notices = []
    for name, flag in REMOVED_TRAINING_FLAGS.items():
        value = getattr(args, name, None)
        if value is None:  # not on the command line
            continue
        given = f"--{name} {shlex.quote(str(value))}"
        if flag.inert(value):
            notices.append(f"{given}: a transformers 4.34 flag, dropped ({flag.replacement})")
        elif flag.translate is not None:
            notices.append(f"{given}: a transformers 4.34 flag, {flag.translate(args, value)}")
        else:
            raise ValueError(f"{given}: transformers 5 removed this flag and has no equivalent: {flag.replacement}")
    return notices


def _removed_flag_fields() -> list[tuple[str, Any, Any]]:
    """Dataclass fields for the removed flags (default None: not given), skipping any the installed transformers
    still has."""
    upstream = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    fields = []
    for name, flag in REMOVED_TRAINING_FLAGS.items():
        if name in upstream:
            continue
        metadata = {"help": f"transformers 4 flag; here: {flag.replacement}"}
        if flag.type is bool:  # `--no_cuda` alone means True, as in 4.34 (argparse keywords, read by HfArgumentParser)
            metadata.update(nargs="?", const=True)
        fields.append((name, flag.type | None, field(default=None, metadata=metadata)))
    return fields


RemovedTrainingFlags = dataclasses.make_dataclass(
    "RemovedTrainingFlags", _removed_flag_fields(), bases=(transformers.TrainingArguments,)
)


@dataclass
class TrainingArguments(RemovedTrainingFlags):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    model_max_length: int = field(
        default=8192 * 4,
        metadata={"help": "Maximum sequence length. Sequences will be right padded (and possibly truncated)."},
    )
    use_flash_attn: bool = field(default=True, metadata={"help": "Whether to use flash attention for training."})
    require_flash_attn: bool = field(
        default=False, metadata={"help": "Stop with an error when --use_flash_attn True cannot be honoured."}
    )
    use_full_attn: bool = field(
        default=True, metadata={"help": "Accepted for LongLoRA compatibility: attention is always full here."}
    )
    low_rank_training: bool = field(default=True, metadata={"help": "Whether to use low rank adaptation (LoRA)."})
    trainable_params: str = field(
        default="embed,norm", metadata={"help": "Additional trainable parameters except LoRA weights, if low rank."}
    )

    def __post_init__(self):
        notices = apply_removed_flags(self)
        if int(os.environ.get("RANK", "0")) == 0:  # once per torchrun job, not once per process
            for notice in notices:
                print(f"fine-tune.py: {notice}", file=sys.stderr)
        if self.tf32 and not _tf32_available():
            warnings.warn("--tf32 True: no CUDA GPU with TF32 here; ignoring it", RuntimeWarning, stacklevel=2)
            self.tf32 = None
        super().__post_init__()


def _tf32_available() -> bool:
    from transformers.utils import is_torch_tf32_available

    return is_torch_tf32_available()


def smart_tokenizer_and_embedding_resize(special_tokens_dict: dict, tokenizer, model) -> None:
    """Adds the missing special tokens and resizes the embeddings (new rows: the mean of the old ones)."""
    num_new_tokens = tokenizer.add_special_tokens(special_tokens_dict)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if num_new_tokens > 0:
        input_embeddings = model.get_input_embeddings().weight.data
        output_embeddings = model.get_output_embeddings().weight.data
        input_embeddings[-num_new_tokens:] = input_embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)
        output_embeddings[-num_new_tokens:] = output_embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)


def tokenize_fn(tokenizer, example):
    """Joins the texts with EOS and cuts them into `model_max_length` rows (the last one padded), as LongLoRA does."""
    context_length = tokenizer.model_max_length
    outputs = tokenizer(
        tokenizer.eos_token.join(example["text"]),
        truncation=False,
        return_tensors="pt",
        pad_to_multiple_of=context_length,
        padding=True,
    )
    return {"input_ids": outputs["input_ids"].view(-1, context_length)}


def load_texts(data_args: DataArguments, cache_dir: str | None):
    """A `datasets.Dataset` with a "text" column, from `--data_path` or (without it) from the hub."""
    from datasets import Dataset, concatenate_datasets, load_dataset

    if data_args.data_path is None:
        return load_dataset(data_args.dataset_name, cache_dir=cache_dir, split="train")
    path = data_args.data_path
    files = sorted(glob.glob(os.path.join(path, "*"))) if os.path.isdir(path) else [path]
    parts = []
    for file in files:
        if file.endswith((".jsonl", ".json")):
            rows = load_dataset("json", data_files=file, cache_dir=cache_dir, split="train")
            parts.append(rows.select_columns("text"))
        elif file.endswith(".txt"):
            with open(file, encoding="utf-8") as handle:
                parts.append(Dataset.from_dict({"text": [handle.read()]}))
    if not parts:
        raise SystemExit(f"--data_path {path}: no .txt, .jsonl or .json file found")
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


FLASH_ATTENTION_UNUSABLE = (
    "--use_flash_attn True, but flash-attention 2 is not usable here (the flash_attn package is not installed "
    "or there is no CUDA GPU). Install it with `pip install flash-attn --no-build-isolation`"
)


def attention_implementation(training_args: TrainingArguments) -> str | None:
    """flash_attention_2 when asked for and usable; otherwise None, leaving the choice to transformers (see
    `warn_flash_attention_fallback`), or, with `--require_flash_attn True`, a stop with the install hint."""
    if not training_args.use_flash_attn:
        return None
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available() and torch.cuda.is_available():
        return "flash_attention_2"
    if training_args.require_flash_attn:
        raise SystemExit(f"{FLASH_ATTENTION_UNUSABLE}, or pass --use_flash_attn False.")
    return None


def warn_flash_attention_fallback(model) -> None:
    """Warns that `--use_flash_attn True` fell back, naming the attention transformers chose for this model.

    transformers picks sdpa where the model supports it (llama, qwen2, mistral) and eager otherwise: Gemma-2's
    attention-logit softcapping is not something sdpa can do, so Gemma-2 falls back to eager, which materializes the
    (heads x seq x seq) attention scores of one layer at a time.
    """
    chosen = model.config._attn_implementation
    message = f"{FLASH_ATTENTION_UNUSABLE}; falling back to {chosen} attention, transformers' default for " + (
        f"{model.config.model_type}"
    )
    if chosen == "eager":
        message += " (it builds the full heads x seq x seq attention scores: long sequences need much more memory)"
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def scale_rope(config, model_max_length: int) -> None:
    """LongLoRA's rule: linear RoPE scaling by ceil(model_max_length / max_position_embeddings) when longer."""
    orig_ctx_len = getattr(config, "max_position_embeddings", None)
    if not orig_ctx_len or model_max_length <= orig_ctx_len:
        return
    factor = float(math.ceil(model_max_length / orig_ctx_len))
    parameters = getattr(config, "rope_parameters", None) or {}
    if "rope_type" in parameters or not parameters:
        config.rope_parameters = {**parameters, "rope_type": "linear", "factor": factor}
    else:  # one set per attention type (e.g. Gemma-2's sliding and full attention)
        config.rope_parameters = {
            name: {**p, "rope_type": "linear", "factor": factor} for name, p in parameters.items()
        }


def enable_activation_checkpointing(model) -> None:
    """Checkpoints every layer, as LongLoRA does. transformers 5.23 renamed `gradient_checkpointing_enable` to
    `activation_checkpointing_enable` (the old name stays as a deprecated alias until v6); earlier 5.x releases
    have only the old name. (LongLoRA's `--gradient_checkpointing` flag stays accepted: TrainingArguments keeps it.)"""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def train() -> None:
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not training_args.use_full_attn:
        warnings.warn(
            "--use_full_attn False asks for LongLoRA's shifted sparse attention (S²-Attn), which this script does "
            "not implement; training uses full attention.",
            RuntimeWarning,
            stacklevel=2,
        )

    config = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=training_args.cache_dir)
    scale_rope(config, training_args.model_max_length)
    attn_implementation = attention_implementation(training_args)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=training_args.cache_dir,
        dtype=torch.bfloat16 if training_args.bf16 else torch.float32,
        attn_implementation=attn_implementation,
    )
    if training_args.use_flash_attn and attn_implementation is None:
        warn_flash_attention_fallback(model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length,
        padding_side="right",
        use_fast=True,
    )
    special_tokens_dict = {}
    if tokenizer.pad_token is None:
        special_tokens_dict["pad_token"] = DEFAULT_PAD_TOKEN
    if tokenizer.eos_token is None:
        special_tokens_dict["eos_token"] = DEFAULT_EOS_TOKEN
    if tokenizer.bos_token is None:
        special_tokens_dict["bos_token"] = DEFAULT_BOS_TOKEN
    if tokenizer.unk_token is None:
        special_tokens_dict["unk_token"] = DEFAULT_UNK_TOKEN
    smart_tokenizer_and_embedding_resize(special_tokens_dict, tokenizer, model)

    try:
        import minis

        logger.info("minis active: %s", minis.is_active(model))
    except ImportError:
        pass

    with training_args.main_process_first(desc="tokenizing the dataset"):
        from functools import partial

        dataset = load_texts(data_args, training_args.cache_dir)
        dataset = dataset.map(
            partial(tokenize_fn, tokenizer),
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            remove_columns=dataset.column_names,
        )
    data_collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)

    if training_args.low_rank_training:
        from peft import LoraConfig, get_peft_model

        if model_args.model_type == "gpt-neox":
            targets = ["query_key_value", "dense"]
        else:
            targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        lora_config = LoraConfig(
            r=8, lora_alpha=16, target_modules=targets, lora_dropout=0, bias="none", task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, lora_config)
        # Enable the additional trainable parameters (embeddings and norms by default).
        for name, param in model.named_parameters():
            if any(key in name for key in training_args.trainable_params.split(",")):
                param.requires_grad_()
        model.print_trainable_parameters()

    model.config.use_cache = False  # required for activation checkpointing
    model.enable_input_require_grads()  # required for activation checkpointing
    enable_activation_checkpointing(model)

    trainer = Trainer(
        model=model,
        processing_class=tokenizer,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=None,
        data_collator=data_collator,
    )
    trainer.train()
    trainer.save_state()
    trainer.save_model(output_dir=training_args.output_dir)


if __name__ == "__main__":
    train()

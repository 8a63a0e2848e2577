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

minis is not imported here: installed, it makes every llama, qwen2, mistral and gemma2 model mini-sequence at
`import transformers`; `MINIS=0` runs the same command without it. What differs from LongLoRA's script:

- Data comes from `--data_path` (a .txt file, a .jsonl/.json file with a "text" field, or a directory of them),
  since a hub may be unreachable. Without it, `--dataset_name` (default LongLoRA's RedPajama sample) is loaded
  from the hub. Texts are joined with EOS and cut into `model_max_length` blocks, as LongLoRA does.
- `--use_flash_attn True` uses flash-attention 2 when it is installed and a CUDA GPU is present; otherwise the
  script warns and uses transformers' default attention (sdpa), which also avoids the (seq x seq) score matrix
  on GPUs. Pass `--require_flash_attn True` to stop with an error instead.
- LongLoRA's shifted sparse attention (S²-Attn, `--use_full_attn False`) patched transformers 4.3x's Llama
  attention and does not exist here: training always uses full attention (LongLoRA's `--use_full_attn True`).
  Passing `--use_full_attn False` warns.
- `--evaluation_strategy` (renamed `eval_strategy` in transformers 5) is accepted and forwarded; `--tf32 True`
  without a GPU that supports it warns and is ignored instead of failing.
- RoPE is scaled linearly when `--model_max_length` exceeds the model's `max_position_embeddings` (LongLoRA's
  rule), through transformers 5's `rope_parameters`.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import warnings
from dataclasses import dataclass, field

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


@dataclass
class TrainingArguments(transformers.TrainingArguments):
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
    evaluation_strategy: str | None = field(
        default=None, metadata={"help": "transformers 4 name of --eval_strategy; forwarded to it."}
    )

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
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


def attention_implementation(training_args: TrainingArguments) -> str | None:
    """flash_attention_2 when asked for and usable; else transformers' default (None), warning or stopping."""
    if not training_args.use_flash_attn:
        return None
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available() and torch.cuda.is_available():
        return "flash_attention_2"
    message = (
        "--use_flash_attn True, but flash-attention 2 is not usable here (the flash_attn package is not installed "
        "or there is no CUDA GPU). Install it with `pip install flash-attn --no-build-isolation`"
    )
    if training_args.require_flash_attn:
        raise SystemExit(f"{message}, or pass --use_flash_attn False.")
    warnings.warn(f"{message}; falling back to transformers' default attention (sdpa).", RuntimeWarning, stacklevel=2)
    return None


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
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=training_args.cache_dir,
        dtype=torch.bfloat16 if training_args.bf16 else torch.float32,
        attn_implementation=attention_implementation(training_args),
    )
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

    model.config.use_cache = False  # required for gradient checkpointing
    model.enable_input_require_grads()  # required for gradient checkpointing
    model.gradient_checkpointing_enable()  # enable gradient checkpointing

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

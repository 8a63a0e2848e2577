"""Supervised fine-tuning with TRL's SFTTrainer and an optional PEFT LoRA adapter, from local data.

The same script runs on one process, under DDP, FSDP2 and DeepSpeed ZeRO-3 (see the run_peft_*.sh scripts and
configs/). It does not import minis: once minis is installed, its import hook gives every llama, qwen2, mistral and
gemma2 model mini-sequence MLPs, and TRL's own fused LM head computes the loss without full logits. `MINIS=0`
runs the same command without minis.

    python train.py --model_name_or_path meta-llama/Llama-3.1-8B --data_path data.jsonl --output_dir out \
        --use_peft_lora True --max_length 8192 --bf16 True --packing True

Data (`--data_path`): a .jsonl/.json file whose rows hold "text", or "prompt" and "completion" (completion-only
loss), or "messages" (conversational; needs a tokenizer with a chat template); or a .txt file, split into examples
at blank lines; or a directory of such files. `--dataset_name` loads a hub dataset instead, where a hub is
reachable.

Every SFTConfig / TrainingArguments flag works as usual (`--per_device_train_batch_size`, `--activation_checkpointing`,
`--learning_rate`, `--num_train_epochs`, `--max_steps`, `--eval_strategy`, `--use_cpu`, ...). On transformers older
than 5.23, which names checkpointing `--gradient_checkpointing*`, the `--activation_checkpointing*` flags are passed
on under those names.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed
from trl import SFTConfig, SFTTrainer

logger = logging.getLogger("sft")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or local directory of a causal LM."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to the model's."})
    use_flash_attn: bool = field(
        default=False, metadata={"help": "Use flash-attention 2 (falls back, with a warning, when not installed)."}
    )
    use_peft_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma-separated module names, or 'all-linear'."},
    )


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "Local .jsonl/.json/.txt file or directory."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (when --data_path is not given)."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Share of the examples held out for evaluation."})


def load_local_dataset(path: str):
    """A `datasets.Dataset` from a local file or directory (see the module docstring for the formats)."""
    from datasets import Dataset, concatenate_datasets, load_dataset

    files = sorted(glob.glob(os.path.join(path, "*"))) if os.path.isdir(path) else [path]
    parts = []
    for file in files:
        if file.endswith((".jsonl", ".json")):
            parts.append(load_dataset("json", data_files=file, split="train"))
        elif file.endswith(".txt"):
            with open(file, encoding="utf-8") as handle:
                paragraphs = [p.strip() for p in handle.read().split("\n\n") if p.strip()]
            parts.append(Dataset.from_dict({"text": paragraphs}))
    if not parts:
        raise SystemExit(f"--data_path {path}: no .jsonl, .json or .txt file found")
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def attention_implementation(use_flash_attn: bool) -> str | None:
    """'flash_attention_2' when asked for and usable; otherwise None (transformers' default) with a warning."""
    if not use_flash_attn:
        return None
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available() and torch.cuda.is_available():
        return "flash_attention_2"
    logger.warning(
        "--use_flash_attn True: flash-attention 2 is not usable here (flash_attn not installed or no CUDA GPU); "
        "falling back to transformers' default attention for this model (sdpa; eager for Gemma-2, whose score "
        "softcapping sdpa cannot do). Install it with `pip install flash-attn`."
    )
    return None


def with_installed_checkpointing_flags(argv: list[str]) -> list[str]:
    """`argv` with `--activation_checkpointing*` renamed `--gradient_checkpointing*` where this transformers (older
    than 5.23) has only the old names; unchanged otherwise."""
    if "activation_checkpointing" in {field.name for field in dataclasses.fields(SFTConfig)}:
        return argv
    old, new = "--activation_checkpointing", "--gradient_checkpointing"
    return [new + arg[len(old):] if arg.startswith(old) else arg for arg in argv]


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, SFTConfig))
    argv = with_installed_checkpointing_flags(sys.argv[1:] if argv is None else list(argv))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    set_seed(training_args.seed)

    if data_args.data_path is not None:
        dataset = load_local_dataset(data_args.data_path)
    elif data_args.dataset_name is not None:
        from datasets import load_dataset

        dataset = load_dataset(data_args.dataset_name, split="train")
    else:
        raise SystemExit("give --data_path (a local file or directory) or --dataset_name")
    eval_dataset = None
    if data_args.eval_fraction > 0:
        split = dataset.train_test_split(test_size=data_args.eval_fraction, seed=training_args.seed)
        dataset, eval_dataset = split["train"], split["test"]

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype=torch.bfloat16 if training_args.bf16 else torch.float32,
        attn_implementation=attention_implementation(model_args.use_flash_attn),
    )
    try:
        import minis

        logger.info("minis active: %s", minis.is_active(model))
    except ImportError:
        pass

    peft_config = None
    if model_args.use_peft_lora:
        from peft import LoraConfig

        targets = model_args.lora_target_modules
        peft_config = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=targets if targets == "all-linear" else targets.split(","),
            task_type="CAUSAL_LM",
        )

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    state = trainer.accelerator.state
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.accelerator.print(
        f"distributed: {state.distributed_type} over {state.num_processes} process(es); "
        f"trainable parameters: {trainable}"
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print(f"trained model: {type(trainer.model_wrapped).__name__} / {type(trainer.model).__name__}")
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model()
    # Ranks that exit with the process group alive can abort in its teardown ("terminate called without an
    # active exception" from gloo's threads); close it once every rank is done.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

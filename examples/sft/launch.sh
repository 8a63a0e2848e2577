#!/usr/bin/env bash
# Shared body of run_peft_{multigpu,fsdp,deepspeed}.sh: all GPUs of one machine through `accelerate launch`,
# same train.py and flags, the accelerate config (DDP, FSDP2 or ZeRO-3) being the only difference.
#   usage: launch.sh CONFIG_FILE DEFAULT_OUTPUT_DIR [extra train.py arguments...]
set -euo pipefail
cd "$(dirname "$0")"
CONFIG_FILE=$1
DEFAULT_OUTPUT=$2
shift 2
MODEL=${MODEL:-meta-llama/Llama-3.1-8B}
DATA=${DATA:?set DATA to a local .jsonl/.json/.txt file or directory}
OUTPUT=${OUTPUT:-$DEFAULT_OUTPUT}
MAX_LENGTH=${MAX_LENGTH:-8192}
NUM_PROCESSES=${NUM_PROCESSES:-8}

accelerate launch --config_file "$CONFIG_FILE" --num_processes "$NUM_PROCESSES" train.py \
  --model_name_or_path "$MODEL" \
  --data_path "$DATA" \
  --output_dir "$OUTPUT" \
  --use_peft_lora True --lora_r 16 --lora_alpha 32 --lora_dropout 0.05 \
  --max_length "$MAX_LENGTH" --packing True \
  --per_device_train_batch_size 1 --gradient_accumulation_steps 1 \
  --activation_checkpointing True --activation_checkpointing_kwargs '{"use_reentrant": false}' \
  --learning_rate 1e-4 --lr_scheduler_type cosine --warmup_steps 10 \
  --num_train_epochs 1 --logging_steps 5 --save_strategy epoch \
  --bf16 True --use_flash_attn True --report_to none \
  "$@"

#!/usr/bin/env bash
# DeepSpeed ZeRO-3 on all GPUs of one machine (accelerate, configs/deepspeed_zero3.yaml): same train.py and flags.
#   NUM_PROCESSES=8 MODEL=Qwen/Qwen2.5-72B DATA=data.jsonl ./run_peft_deepspeed.sh
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-meta-llama/Llama-3.1-8B}
DATA=${DATA:?set DATA to a local .jsonl/.json/.txt file or directory}
OUTPUT=${OUTPUT:-runs/sft-lora-zero3}
MAX_LENGTH=${MAX_LENGTH:-8192}
NUM_PROCESSES=${NUM_PROCESSES:-8}

accelerate launch --config_file configs/deepspeed_zero3.yaml --num_processes "$NUM_PROCESSES" train.py \
  --model_name_or_path "$MODEL" \
  --data_path "$DATA" \
  --output_dir "$OUTPUT" \
  --use_peft_lora True --lora_r 16 --lora_alpha 32 --lora_dropout 0.05 \
  --max_length "$MAX_LENGTH" --packing True \
  --per_device_train_batch_size 1 --gradient_accumulation_steps 1 \
  --gradient_checkpointing True --gradient_checkpointing_kwargs '{"use_reentrant": false}' \
  --learning_rate 1e-4 --lr_scheduler_type cosine --warmup_steps 10 \
  --num_train_epochs 1 --logging_steps 5 --save_strategy epoch \
  --bf16 True --use_flash_attn True --report_to none \
  "$@"

#!/usr/bin/env bash
# One GPU (or the CPU): LoRA SFT of a long-context model with minis. Override any variable on the command line:
#   MODEL=Qwen/Qwen2.5-7B DATA=my_data.jsonl MAX_LENGTH=16384 ./run_peft.sh
# Extra arguments are passed to train.py (e.g. --max_steps 10).
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-meta-llama/Llama-3.1-8B}
DATA=${DATA:?set DATA to a local .jsonl/.json/.txt file or directory}
OUTPUT=${OUTPUT:-runs/sft-lora}
MAX_LENGTH=${MAX_LENGTH:-8192}

python train.py \
  --model_name_or_path "$MODEL" \
  --data_path "$DATA" \
  --output_dir "$OUTPUT" \
  --use_peft_lora True --lora_r 16 --lora_alpha 32 --lora_dropout 0.05 \
  --max_length "$MAX_LENGTH" --packing True \
  --per_device_train_batch_size 1 --gradient_accumulation_steps 8 \
  --activation_checkpointing True \
  --learning_rate 1e-4 --lr_scheduler_type cosine --warmup_steps 10 \
  --num_train_epochs 1 --logging_steps 5 --save_strategy epoch \
  --bf16 True --use_flash_attn True --report_to none \
  "$@"

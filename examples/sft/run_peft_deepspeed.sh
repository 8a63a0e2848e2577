#!/usr/bin/env bash
# DeepSpeed ZeRO-3 on all GPUs of one machine (accelerate, configs/deepspeed_zero3.yaml): same train.py and flags.
#   NUM_PROCESSES=8 MODEL=Qwen/Qwen2.5-72B DATA=data.jsonl ./run_peft_deepspeed.sh
exec "$(dirname "$0")/launch.sh" configs/deepspeed_zero3.yaml runs/sft-lora-zero3 "$@"

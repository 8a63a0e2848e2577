#!/usr/bin/env bash
# DDP on all GPUs of one machine (accelerate, configs/multi_gpu.yaml): same train.py, same flags as run_peft.sh.
#   NUM_PROCESSES=8 MODEL=google/gemma-2-9b DATA=data.jsonl ./run_peft_multigpu.sh
exec "$(dirname "$0")/launch.sh" configs/multi_gpu.yaml runs/sft-lora-ddp "$@"

#!/usr/bin/env bash
# FSDP2 on all GPUs of one machine (accelerate, configs/fsdp2.yaml): same train.py, same flags as run_peft.sh.
#   NUM_PROCESSES=8 MODEL=meta-llama/Llama-3.1-70B DATA=data.jsonl ./run_peft_fsdp.sh
exec "$(dirname "$0")/launch.sh" configs/fsdp2.yaml runs/sft-lora-fsdp "$@"

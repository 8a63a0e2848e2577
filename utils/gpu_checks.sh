#!/usr/bin/env bash
# The device checks of issues 3-5 in one run, for a session that is lent a CUDA GPU (a few minutes on an H100/H200):
#   1. tests/test_gpu.py: bf16 + SDPA equivalence per family, the Llama-3-shaped saving at 8K;
#   2. benchmarks/throughput.py at 8K and 16K, without and with activation checkpointing: tokens/s, MFU, peak
#      memory of minis vs upstream, and the planner's prediction beside each measured peak;
#   3. the same with checkpoint offload at 16K (issue 8): the offload overhead and the peak it saves.
# Runs from the source tree (PYTHONPATH=src) on the machine's own torch/transformers; writes logs and JSON to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
python -m pytest tests/test_gpu.py -m gpu -v -rs 2>&1 | tee "$OUT/test_gpu.log"
python benchmarks/throughput.py --seq 8192 16384 --layers 4 --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log"
python benchmarks/throughput.py --seq 8192 16384 --layers 4 --grad-ckpt --json "$OUT/throughput_ckpt.json" 2>&1 | tee "$OUT/throughput_ckpt.log"
python benchmarks/throughput.py --seq 16384 --layers 4 --grad-ckpt --offload --json "$OUT/throughput_offload.json" 2>&1 | tee "$OUT/throughput_offload.log"

# ---- Sequence parallelism (issue 12): Ulysses and context parallelism of size 1 through the real code paths ----
# One GPU, one rank: DeepSpeed's UlyssesSPAttentionHF + data adapter + transformers' SP loss, and torch's
# context_parallel (ring attention) + FSDP2 + Trainer's num_items_in_batch, against no SP; minis on, then off.
# Expect equal losses per line (bf16) and compare peak_gib: SP of size 1 should add little (its all-to-all copies).
# Needs DeepSpeed importable (`DS_BUILD_OPS=0 pip install deepspeed`). Not yet run on a GPU; record it in docs/gpu.md.
python examples/sp/size1_check.py --seq 16384 --layers 4 --json "$OUT/sp_size1_minis.json" 2>&1 | tee "$OUT/sp_size1_minis.log"
python examples/sp/size1_check.py --seq 16384 --layers 4 --minis-off --json "$OUT/sp_size1_upstream.json" 2>&1 | tee "$OUT/sp_size1_upstream.log"

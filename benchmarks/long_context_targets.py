"""The planner's check of the long-context targets (issues #8 and #12): Llama-3-8B, flash-attention 2, batch 1,
activation checkpointing with the checkpoints offloaded to host memory, minis on.

    python benchmarks/long_context_targets.py

Each line predicts one step's peak per GPU at the target length and says whether it fits the GPU; the numbers are
`minis.planner.predict_peak`'s, on fake tensors (no GPU needed; about 4 minutes on 2 CPU cores).
"""

from __future__ import annotations

import time

from minis.planner import TrainingSetup, predict_peak

GiB = 1 << 30
OFFLOADED_CHECKPOINTS = dict(attn="flash", grad_ckpt=True, offload_activations=True)
FULL_FT_OFFLOADED = dict(method="full", optimizer_in_backward=True, zero_stage=3, offload_optimizer=True)

# (what, tokens, GPU memory in GiB, setup)
TARGETS = (
    ("LoRA r=16, one 80 GiB GPU", 524_288, 80, TrainingSetup(method="lora", **OFFLOADED_CHECKPOINTS)),
    ("full FT, AdamW in backward, optimizer state offloaded (ZeRO-3 x1), one 80 GiB GPU", 524_288, 80,
     TrainingSetup(world_size=1, **FULL_FT_OFFLOADED, **OFFLOADED_CHECKPOINTS)),
    ("LoRA r=16, one 141 GiB H200", 1_048_576, 141, TrainingSetup(method="lora", **OFFLOADED_CHECKPOINTS)),
    ("full FT, ZeRO-3 x8 with optimizer offload, Ulysses SP x8, 8 x 80 GiB", 3_702_784, 80,
     TrainingSetup(world_size=8, sp_size=8, **FULL_FT_OFFLOADED, **OFFLOADED_CHECKPOINTS)),
)


def main() -> None:
    for what, tokens, gpu_gib, setup in TARGETS:
        started = time.perf_counter()
        estimate = predict_peak("llama-3-8b", tokens, setup)
        verdict = "fits" if estimate.total <= gpu_gib * GiB else "does NOT fit"
        print(f"{what}: {tokens:,} tokens: peak {estimate.total / GiB:.2f} GiB per GPU, {verdict} in {gpu_gib} GiB; "
              f"host RAM {estimate.host_bytes / GiB:.1f} GiB per rank ({time.perf_counter() - started:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()

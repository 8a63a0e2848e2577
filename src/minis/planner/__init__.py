"""`minis plan`: predicts the peak GPU memory of one training step, and the longest sequence that fits.

How: the model is built on the meta device and given fake parameters (`FakeTensorMode`: tensors with shapes,
dtypes and storages but no memory and no compute), one real training step runs on them (forward, backward,
optimizer step) and `minis.memory.LiveStorageTracker` follows every tensor storage's life. The decoder layers of
a model are identical, so the step is simulated with two and with three (periods of) layers and the peak of the
full depth is extrapolated exactly, phase by phase (see docs/planner.md). Sharding (ZeRO, FSDP) and optimizer
offload are attributed afterwards by dividing the sharded components by the world size.

The prediction is for a CUDA run: scaled-dot-product attention is replaced during the simulation by a model of
what PyTorch's CUDA kernels (flash, memory-efficient) save and allocate, because the CPU kernels that fake tensors
would otherwise dispatch to are not the ones a GPU runs. The simulation also undoes transformers' "tracing"
decisions that fake tensors trigger (a full seq x seq mask, no packed-sequence check), so that it runs the code path
of a real unpadded batch.

Module map, in pipeline order (each file imports only from the ones above it):

- `inputs`: `TrainingSetup` (how the model is trained) and its validation, `PlanError`, `parse_memory_size`,
  `load_model_config` (a preset from `minis.presets`, a config.json, a dict or a config).
- `cuda`: what a CUDA run does that the simulation must reproduce: the SDPA kernel choice, the fused attention
  kernels' memory, flash-attention 2, and `_real_run_decisions` (no tracing-only seq x seq mask).
- `simulate`: builds the model (LoRA, checkpointing, offload, fake parameters), the modeled fused AdamW and the
  batch, and runs one step with `minis.memory.run_training_step` (`simulate_step`, `measure_fake_step_peak`).
- `peak`: timeline -> phase peaks -> per-GPU `PeakEstimate`, extrapolated to the full depth (`predict_peak`).
- `search`: the longest sequence that fits (`find_max_seq`).
- `suggest`: the cheapest checkpointing/offload setting that fits a length (`suggest`, `minis plan --suggest`).
- `report`: both variants, upstream and minis (`plan`), and the printed table (`format_report`).
- `cli`: the command line (`build_parser`, `run`, `main`); `minis.cli` mounts it as `minis plan`.

Python API: `predict_peak`, `find_max_seq`, `plan`; command line: `minis plan --help`.
"""

from .cli import build_parser, main, run
from .inputs import PLANNED_MODEL_TYPES, PlanError, TrainingSetup, load_model_config, parse_memory_size
from .peak import PeakEstimate, predict_peak
from .report import format_report, plan
from .search import find_max_seq
from .suggest import format_suggestion, suggest
from .simulate import build_model, make_batch, make_optimizer, measure_fake_step_peak, simulate_step

__all__ = [
    "PLANNED_MODEL_TYPES",
    "PeakEstimate",
    "PlanError",
    "TrainingSetup",
    "build_model",
    "build_parser",
    "find_max_seq",
    "format_report",
    "format_suggestion",
    "load_model_config",
    "main",
    "make_batch",
    "make_optimizer",
    "measure_fake_step_peak",
    "parse_memory_size",
    "plan",
    "predict_peak",
    "run",
    "simulate_step",
    "suggest",
]

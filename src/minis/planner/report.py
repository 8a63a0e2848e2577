"""Stage 6, report: `plan()` predicts upstream's and minis' peaks and longest sequences; `format_report` prints them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

from .inputs import GiB, PlanError, TrainingSetup, _positive, check_attention, load_model_config, parse_memory_size
from .peak import COMPONENTS, predict_peak
from .search import find_max_seq

__all__ = ["format_report", "plan"]

COMPONENT_TITLES = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "saved activations",
    "temporaries": "temporaries",
    "sharding_buffers": "gathered shards",
}


def plan(model: Any, *, seq: int | None = None, max_seq: bool = False, gpu_mem: int | str | None = None,
         setup: TrainingSetup | None = None, granularity: int = 256, host_mem: int | str | None = None,
         **setup_fields: Any) -> dict[str, Any]:
    """Predicts upstream's and minis' peak at `seq` and/or the longest sequence that fits in `gpu_mem`.

    With `host_mem` (host RAM per rank available for offloaded tensors), every estimate also says whether its host
    RAM fits; the longest-sequence search is by GPU memory, and the report says when the host would run out first.
    Setup fields can be given as `setup=TrainingSetup(...)` or as keyword arguments (`method="lora"`, ...).
    Returns the report that `minis plan --json` prints.
    """
    if setup is None:
        try:
            setup = TrainingSetup(**setup_fields)
        except TypeError as error:
            raise PlanError(f"unknown planner option: {error}") from None
    elif setup_fields:
        setup = replace(setup, **setup_fields)
    setup.validate()
    if seq is None and not max_seq:
        raise PlanError("give --seq N (predict the peak at N tokens) and/or --max-seq --gpu-mem SIZE")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 1):
        raise PlanError(f"--seq {seq!r} is not allowed; it must be a positive integer")
    if isinstance(gpu_mem, str):
        gpu_mem = parse_memory_size(gpu_mem)
    if gpu_mem is not None and (isinstance(gpu_mem, bool) or not isinstance(gpu_mem, int) or gpu_mem < 1 << 20):
        raise PlanError(f"--gpu-mem {gpu_mem!r} is not possible; give a positive size such as 80GiB")
    if max_seq and gpu_mem is None:
        raise PlanError("--max-seq needs --gpu-mem SIZE (the memory of one GPU, e.g. 80GiB)")
    if isinstance(host_mem, str):
        host_mem = parse_memory_size(host_mem, "--host-mem")
    if host_mem is not None and (isinstance(host_mem, bool) or not isinstance(host_mem, int) or host_mem < 1 << 20):
        raise PlanError(f"--host-mem {host_mem!r} is not possible; give a positive size such as 512GiB")
    _positive("--granularity", granularity)
    config = load_model_config(model)
    check_attention(config, setup.attn)
    report: dict[str, Any] = {
        "model": model if isinstance(model, str) else getattr(config, "_name_or_path", "") or config.model_type,
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "setup": asdict(setup),
        "setup_text": setup.describe(),
        "gpu_mem": gpu_mem,
        "host_mem": host_mem,
        "predicts": "a CUDA run; tensors counted by the PyTorch caching allocator's view (no CUDA context, "
                    "kernel workspaces or fragmentation)",
    }
    if seq is not None:
        upstream = predict_peak(config, seq, setup, mini_sequence=False)
        minis = predict_peak(config, seq, setup, mini_sequence=True)
        report["seq"] = {
            "seq_len": seq,
            "upstream": upstream.to_dict(),
            "minis": minis.to_dict(),
            "ratio": minis.total / upstream.total,
            "fits": None if gpu_mem is None
            else {"upstream": upstream.total <= gpu_mem, "minis": minis.total <= gpu_mem},
            "host_fits": None if host_mem is None
            else {"upstream": upstream.host_bytes <= host_mem, "minis": minis.host_bytes <= host_mem},
        }
    if max_seq:
        cache: dict = {}
        found = {}
        for name, flag in (("upstream", False), ("minis", True)):
            length, estimate = find_max_seq(config, gpu_mem, setup, mini_sequence=flag, granularity=granularity,
                                            cache=cache)
            found[name] = {"max_seq": length, "peak": None if estimate is None else estimate.to_dict(),
                           "host_fits": None if host_mem is None or estimate is None
                           else estimate.host_bytes <= host_mem}
        up, ms = found["upstream"]["max_seq"], found["minis"]["max_seq"]
        report["max_seq"] = {**found, "granularity": granularity, "factor": (ms / up) if up else None}
    return report


def _gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"


def _host_text(setup: Mapping[str, Any]) -> str:
    offloaded = [what for what, on in (("offloaded checkpoints, pinned", setup.get("offload_activations")),
                                       ("offloaded optimizer state", setup.get("offload_optimizer"))) if on]
    return " + ".join(offloaded) + " per rank" if offloaded else "nothing offloaded"


def format_report(report: Mapping[str, Any]) -> str:
    """The readable table `minis plan` prints."""
    lines = [f"minis plan: {report['model']} ({report['model_type']}, {report['num_layers']} layers)",
             f"setup: {report['setup_text']}"]
    note = None
    if "seq" in report:
        part = report["seq"]
        up, ms = part["upstream"], part["minis"]
        lines.append(f"peak of one training step at {part['seq_len']:,} tokens per sequence, per GPU:")
        lines.append(f"  {'':<22}{'upstream':>14}{'minis':>14}{'minis/upstream':>16}")
        for name in COMPONENTS:
            a, b = up["components"][name], ms["components"][name]
            if not a and not b:
                continue
            ratio = f"{b / a:.2f}" if a else "-"
            lines.append(f"  {COMPONENT_TITLES[name]:<22}{_gib(a):>14}{_gib(b):>14}{ratio:>16}")
        lines.append(f"  {'total peak':<22}{_gib(up['total']):>14}{_gib(ms['total']):>14}{part['ratio']:>16.2f}")
        lines.append(f"  peak during: upstream {up['phase_title']}; minis {ms['phase_title']}")
        if ms.get("local_seq_len"):
            lines.append(f"  sequence split over GPUs: {ms['local_seq_len']:,} tokens per GPU; the attention's exchange "
                         f"buffers ({_gib(ms['attention_exchange_bytes'])}) are in the temporaries")
        for name, data in (("upstream", up), ("minis", ms)):
            temps = ", ".join(f"{what} {_gib(size)}" for what, size in
                              ((t["what"], t["bytes"]) for t in data["largest_temporaries"]))
            if temps:
                lines.append(f"  largest temporaries ({name}): {temps}")
        if up["cpu_offloaded_bytes"]:
            lines.append(f"  optimizer state offloaded to CPU memory: {_gib(up['cpu_offloaded_bytes'])} per rank")
        lines.append(f"  {'host RAM needed':<22}{_gib(up['host_bytes']):>14}{_gib(ms['host_bytes']):>14}"
                     f"{'':>16}  ({_host_text(report['setup'])})")
        if part["fits"] is not None:
            fits = {k: "fits" if v else "does not fit" for k, v in part["fits"].items()}
            lines.append(f"  in {_gib(report['gpu_mem'])}: upstream {fits['upstream']}, minis {fits['minis']}")
        if part.get("host_fits") is not None:
            fits = {k: "fits" if v else "does not fit: the host would run out of RAM"
                    for k, v in part["host_fits"].items()}
            lines.append(f"  in {_gib(report['host_mem'])} of host RAM per rank: upstream {fits['upstream']}, "
                         f"minis {fits['minis']}")
        note = up
    if "max_seq" in report:
        part = report["max_seq"]
        up, ms = part["upstream"]["max_seq"], part["minis"]["max_seq"]
        factor = f"{part['factor']:.2f}x" if part["factor"] else "n/a (upstream fits no sequence)"
        lines.append(f"longest sequence that fits in {_gib(report['gpu_mem'])} per GPU "
                     f"(multiples of {part['granularity']}):")
        lines.append(f"  upstream {up:,} tokens, minis {ms:,} tokens: {factor}")
        for name in ("upstream", "minis"):
            peak = part[name]["peak"]
            if peak is not None:
                host_note = "" if part[name].get("host_fits") in (None, True) else \
                    f" (more than --host-mem {_gib(report['host_mem'])}: the host would run out of RAM)"
                lines.append(f"  {name} at {peak['seq_len']:,}: peak {_gib(peak['total'])} during "
                             f"{peak['phase_title']}; host RAM {_gib(peak['host_bytes'])}{host_note}")
        note = note or part["minis"]["peak"] or part["upstream"]["peak"]
    if note is not None:
        estimates = [(report.get("seq") or {}).get(name) for name in ("upstream", "minis")]
        if any(data and data["seq_by_seq_tensors"] for data in estimates):
            lines.append("note: this setup materializes seq x seq tensors (eager attention scores, or the mask "
                         "transformers builds for a sliding window with sdpa), so its memory grows quadratically; "
                         "--attn flash avoids it")
        if note["extrapolated"]:
            a, b = note["simulated_layers"]
            lines.append(f"method: simulated {a} and {b} of {note['num_layers']} decoder layers on fake tensors; the "
                         "layers are identical, so the full depth is extrapolated exactly (docs/planner.md)")
        else:
            lines.append(f"method: simulated all {note['num_layers']} decoder layers on fake tensors")
    lines.append("predicts a CUDA run (PyTorch allocator's view: no CUDA context, workspaces or fragmentation)")
    return "\n".join(lines)

"""DeepSpeed ZeRO-3 support for the mini-sequence function.

ZeRO-3 partitions each parameter to an empty tensor outside the modules that use it and gathers it in module
hooks. Two moments of the chunked function see parameters outside those hooks: when it is applied (autograd
records each input's shape then) and when autograd accumulates the gradients it returns. Both gather here.
Parameters are recognised by DeepSpeed's attributes (`ds_id`, `ds_status`); DeepSpeed is imported only when one
is found.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

__all__ = ["gather_until_accumulated", "gathered_while_applied", "is_zero3_parameter"]


def is_zero3_parameter(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def _partitioned(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The DeepSpeed ZeRO-3 parameters among `params` that are partitioned now (not gathered by anyone)."""
    return [param for param in params if getattr(getattr(param, "ds_status", None), "name", None) == "NOT_AVAILABLE"]


def gathered_while_applied(params: Sequence[torch.Tensor], zero3: bool):
    """ZeRO-3: gathers the partitioned `params` while the autograd function is applied.

    Autograd records each input's shape when the function is applied and checks the returned gradients against
    it, so the parameters must have their full shape then, not ZeRO-3's empty partitioned one.
    """
    partitioned = _partitioned(params) if zero3 else []
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def gather_until_accumulated(params: Sequence[torch.Tensor]) -> None:
    """ZeRO-3: gathers the partitioned `params` now and partitions them again once their gradients are accumulated.

    Autograd accumulates a returned gradient into a parameter of the full shape, but by the end of this backward
    ZeRO-3's hooks have partitioned the parameters again. They stay gathered until their post-accumulate hooks have
    run (ZeRO's own hook, registered first, reduces the gradient before ours partitions). A parameter that a module
    has claimed meanwhile (a tied embedding) or that ZeRO keeps persistent is left to ZeRO.
    """
    zero_params = _partitioned(params)
    if not zero_params:
        return
    zero_params[0].all_gather(param_list=zero_params)
    pending = {id(param) for param in zero_params}
    handles = []

    def release(param: torch.Tensor) -> None:
        pending.discard(id(param))
        if pending:
            return
        for handle in handles:
            handle.remove()
        idle = [
            p
            for p in zero_params
            if p.ds_status.name == "AVAILABLE" and not p.ds_active_sub_modules and not getattr(p, "ds_persist", False)
        ]
        if idle:
            idle[0].partition(param_list=idle, has_been_updated=False)

    handles.extend(param.register_post_accumulate_grad_hook(release) for param in zero_params)

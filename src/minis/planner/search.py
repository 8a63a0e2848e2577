"""Stage 5, search: the longest sequence whose predicted peak fits in a GPU's memory (`find_max_seq`)."""

from __future__ import annotations

import math
from typing import Any

from .inputs import TrainingSetup
from .peak import PeakEstimate, predict_peak

__all__ = ["find_max_seq"]


def find_max_seq(model: Any, gpu_mem: int, setup: TrainingSetup | None = None, *, mini_sequence: bool = True,
                 granularity: int = 256, max_len: int = 1 << 24, attention_memory: str = "cuda",
                 cache: dict | None = None) -> tuple[int, PeakEstimate | None]:
    """The longest sequence (a multiple of `granularity`) whose predicted peak fits in `gpu_mem` bytes.

    A bracketing search (doubling from 4096 tokens, or halving below it) and then a binary search inside the bracket;
    the bisection point is moved to the linear interpolation of the two bracket ends when that is inside, since
    the peak is close to affine in the sequence length, which saves most of the steps. Peak memory grows with the
    sequence length, which is what makes the search valid. Returns (0, None) when not even `granularity` tokens fit,
    and stops at `max_len`.
    """
    setup = setup or TrainingSetup()
    cache = {} if cache is None else cache
    # A split sequence must shard evenly: Ulysses needs a multiple of sp_size, context parallelism of 2 x cp_size.
    granularity = math.lcm(granularity, setup.sp_size, 2 * setup.cp_size if setup.cp_size > 1 else 1)

    def peak(units: int) -> PeakEstimate:
        key = (units * granularity, mini_sequence)
        if key not in cache:
            cache[key] = predict_peak(model, units * granularity, setup, mini_sequence=mini_sequence,
                                      attention_memory=attention_memory)
        return cache[key]

    limit = max(max_len // granularity, 1)
    fits: dict[int, PeakEstimate] = {}
    low, high = 0, None  # the longest known to fit (0: none), the shortest known not to fit
    units = min(max(4096 // granularity, 1), limit)
    while True:  # bracket
        estimate = peak(units)
        if estimate.total <= gpu_mem:
            fits[units] = estimate
            low = units
            if units == limit:
                return units * granularity, estimate
            if high is not None:
                break
            units = min(units * 2, limit)
        else:
            high = units
            if low or units == 1:
                break
            units //= 2
    if high is None:
        return low * granularity, fits.get(low)
    bisect_next = False
    while high - low > 1:
        width = high - low
        middle = (low + high) // 2
        if low and not bisect_next:
            below, above = peak(low).total, peak(high).total
            if above > below:
                guess = low + int((gpu_mem - below) * (high - low) / (above - below))
                middle = min(max(guess, low + 1), high - 1)
        estimate = peak(middle)
        if estimate.total <= gpu_mem:
            low, fits[middle] = middle, estimate
        else:
            high = middle
        # Regula falsi can crawl from one side on a convex curve: when a step did not halve the bracket, the next
        # one is a plain bisection.
        bisect_next = not bisect_next and (high - low) * 2 > width
    return low * granularity, fits.get(low)

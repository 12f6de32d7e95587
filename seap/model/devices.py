"""Work spread over several devices: independent walks (each task's statistics, each mask's
refit) split into one group per device, each group walked on its own device in a thread of its
own (the GPU kernels run concurrently; Python waits on them with the GIL released).

Nothing is split inside a walk, so what each group computes is what one device computes for it:
results do not depend on how many devices there are."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

Group = TypeVar("Group")
Result = TypeVar("Result")


def spread(costs: Mapping[str, float], count: int) -> list[list[str]]:
    """``costs``' names in at most ``count`` groups of about equal total cost (the largest first,
    each to the lightest group so far; ties to the first), each group in the given order, empty
    groups left out. Deterministic: the same costs give the same groups."""
    if count < 1:
        raise ValueError("count must be at least 1")
    order = list(costs)
    totals = [0.0] * min(count, len(order))
    groups: list[list[str]] = [[] for _ in totals]
    for name in sorted(order, key=lambda n: (-costs[n], order.index(n))):
        k = min(range(len(totals)), key=lambda j: (totals[j], j))
        groups[k].append(name)
        totals[k] += costs[name]
    return [sorted(g, key=order.index) for g in groups if g]


def on_devices(groups: Sequence[Group], devices: Sequence[torch.device],
               work: Callable[[Group, torch.device, int], Result]) -> list[Result]:
    """``work(group, device, k)`` for group ``k`` on ``devices[k]``, all at once (one thread each;
    one group runs in this thread); the results in group order. The first error is raised
    after every group has stopped."""
    if len(groups) > len(devices):
        raise ValueError(f"{len(groups)} groups for {len(devices)} devices")
    if len(groups) == 1:
        return [work(groups[0], devices[0], 0)]
    with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="seap-device") as pool:
        futures = [pool.submit(work, group, devices[k], k) for k, group in enumerate(groups)]
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]


__all__ = ["on_devices", "spread"]

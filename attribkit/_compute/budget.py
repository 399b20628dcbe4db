"""Memory budgeting: bytes available, rows within a budget, refusing before allocating.

``config.memory_budget`` bounds the working memory of an estimator: caches
and chunks beyond its inputs, outputs and fitted state. Code that works in
chunks asks :func:`rows_within` how many rows of a given size fit; code
that must hold one large object (a dense Fisher, a Krylov basis) asks
:func:`fits` (or :func:`check_fits`) first and refuses, with the sizes in
the message, before anything of that size is allocated. An object fits
when it needs no more than the larger of the budget and the memory
available on the device now (:func:`available_bytes`): the budget is a
promise the user can raise, the available memory what the machine allows.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "available_bytes",
    "check_fits",
    "fits",
    "gib",
    "memory_error",
    "memory_limit",
    "rows_within",
]


def available_bytes(device: torch.device) -> int:
    """Bytes that can be allocated on ``device`` now (0 when unknown).

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (free memory plus reclaimable
    page cache), else ``os.sysconf`` free pages. CUDA: the free memory that
    the driver reports.
    """
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return 0


def rows_within(budget: int, bytes_per_row: int, n: int | None = None) -> int:
    """Rows of ``bytes_per_row`` bytes that fit ``budget``: at least 1, at most ``n``."""
    rows = max(1, int(budget) // max(1, int(bytes_per_row)))
    return rows if n is None else max(1, min(int(n), rows))


def gib(nbytes: float) -> str:
    """``nbytes`` as GiB with three significant digits (for messages)."""
    return f"{nbytes / 2**30:.3g} GiB"


def memory_limit(budget: int, device: torch.device) -> tuple[int, int]:
    """``(budget, available bytes on device now)``: what :func:`fits` compares against."""
    return int(budget), available_bytes(device)


def fits(nbytes: int, limit: tuple[int, int]) -> bool:
    """Whether ``nbytes`` is within the larger of ``limit = (budget, available)``."""
    return nbytes <= max(limit)


def memory_error(owner: str, what: str, limit: tuple[int, int], device, advice: str) -> ValueError:
    """The ``ValueError`` of an object that does not fit ``limit``."""
    budget, available = limit
    return ValueError(
        f"{owner} cannot fit in memory: {what}; the limit is the larger of "
        f"config.memory_budget ({gib(budget)}) and the memory available on {device} "
        f"({gib(available)}). {advice}"
    )


def check_fits(nbytes: int, budget: int, device, *, owner: str, what: str, advice: str) -> None:
    """Refuse, before allocating, ``nbytes`` that fit neither the budget nor the device.

    The device is only asked when the budget is exceeded.
    """
    if nbytes <= budget:
        return
    limit = memory_limit(budget, device)
    if not fits(nbytes, limit):
        raise memory_error(owner, f"{what} needs {gib(nbytes)}", limit, device, advice)

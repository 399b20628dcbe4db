"""Shared benchmark mechanics: medians, peak memory, table printing."""

from __future__ import annotations

import gc
import os
import statistics
import time


def set_threads(n: int = 2) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _read_status(field: str) -> int:
    """A field of /proc/self/status in bytes (Linux), or -1 elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def measure(fn, repeats: int = 3, setup=None, times: list | None = None):
    """Median wall time of ``fn()`` over ``repeats`` runs and the peak extra RSS (MB).

    ``setup()`` (untimed) runs before each repetition. ``times``, when given,
    collects the samples (and the median is over all it holds: pass the same
    list twice to pool samples taken before and after other work). Returns
    (median_s, peak_mb, last_result).
    """
    times = [] if times is None else times
    peak, result = 0.0, None
    for _ in range(repeats):
        if setup is not None:
            setup()
        result = None
        gc.collect()
        base = _read_status("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        hwm = _read_status("VmHWM")
        if base >= 0 and hwm >= 0:
            peak = max(peak, (hwm - base) / 2**20)
    return statistics.median(times), peak, result


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as an aligned text table; ``columns`` = (key, header, format)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            value = row.get(key)
            line.append("-" if value is None else (fmt.format(value) if fmt else str(value)))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        )
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print(flush=True)

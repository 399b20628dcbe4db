"""The one progress bar of attribkit (``config.progress``).

Every long loop (batches of data, Lanczos iterations, blocks of a streamed
matrix or of training vectors) goes through :func:`bar`; a long single call
(a Cholesky factorisation) through :func:`stage`, a one-step bar. Bars are
tqdm's ``auto`` flavour, left behind on the terminal (``leave=False``), and
drawn only when ``enabled`` (``config.show_progress``: on when stderr is a
terminal under ``progress="auto"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

from tqdm.auto import tqdm

__all__ = ["bar", "stage"]


def bar(
    iterable: Iterable | None = None,
    *,
    enabled: bool,
    total: int | None = None,
    desc: str | None = None,
    several: bool = False,
):
    """A tqdm bar over ``iterable`` (or a manual one of ``total`` steps).

    Parameters
    ----------
    iterable : iterable, optional
        Iterate over the returned bar to iterate over it; without one, call
        ``update`` on the bar (it is also a context manager).
    enabled : bool
        Draw the bar (``config.show_progress``); a disabled bar costs nothing
        but the iteration.
    total : int, optional
        Number of steps (default ``len(iterable)`` when it has one).
    desc : str, optional
        The bar's label.
    several : bool, default=False
        Draw it only when there are several steps (a single block is not
        worth a bar).
    """
    if total is None and iterable is not None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    show = enabled and not (several and total is not None and total <= 1)
    return tqdm(iterable, total=total, desc=desc, disable=not show, leave=False)


@contextmanager
def stage(desc: str, enabled: bool):
    """A one-step bar around a long single call; completed only when the call succeeds."""
    one = tqdm(total=1, desc=desc, disable=not enabled, leave=False)
    one.refresh()
    try:
        yield one
        one.update(1)
    finally:
        one.close()

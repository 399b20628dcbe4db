"""One ``nn.Module`` used by one thread at a time.

attribkit hooks a model's layers and switches it to eval mode while it
differentiates it, and puts its modes back afterwards. Two threads doing that
to one module at once corrupt each other: hooks of one fit record the other's
forward passes, and whichever finishes last restores the modes the other set
(a model left in eval mode). :func:`use_model` makes the second thread raise
a ``RuntimeError`` at once instead, before it touches the model.

The registry is weak-keyed (a model that is garbage collected leaves it) and
guarded by a lock held only for the bookkeeping, so no thread ever waits for
another: the verdict depends on whether the uses overlap, never on timing.
Every submodule is registered along with the model, because two models that
share a submodule (a common backbone) share its hooks and modes too. The same
thread may enter again (a fit whose passes call ``per_example_gradients``,
nested estimators): uses are counted per thread and module.
"""

from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["use_model"]


class _Hold:
    """Who holds a module: one thread, the first use's description, a depth count."""

    __slots__ = ("depth", "thread", "thread_name", "what")

    def __init__(self, what: str):
        current = threading.current_thread()
        self.thread, self.thread_name, self.what, self.depth = current.ident, current.name, what, 0


_LOCK = threading.Lock()
_HOLDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _conflict(model: torch.nn.Module, name: str, module, hold: _Hold, what: str) -> RuntimeError:
    kind = type(model).__name__
    where = "it" if name == "" else f"its submodule {name!r} ({type(module).__name__})"
    return RuntimeError(
        f"The model ({kind}) given to {what} is in use in another thread: {where} is held by "
        f"{hold.what} in thread {hold.thread_name!r}. attribkit hooks a model and switches it to "
        "eval mode while it works, so one nn.Module cannot be used by two threads at once. Give "
        "each thread its own copy (copy.deepcopy(model)), or wait for the other thread to finish."
    )


class _Use:
    """Hold ``model`` (and every submodule) for the current thread while inside.

    A context manager, re-entrant within one thread; made by :func:`use_model`.

    Parameters
    ----------
    model : torch.nn.Module
        The model about to be hooked, switched to eval mode or differentiated.
    what : str
        The use, for error messages (``"EKFACIFVP.fit"``, ``"per_example_gradients"``).

    Raises
    ------
    RuntimeError
        On entry, when another thread holds the model or one of its
        submodules. Nothing has been registered or changed then.
    """

    def __init__(self, model: torch.nn.Module, what: str):
        self.model, self.what = model, what
        self._entered: list = []

    def __enter__(self):
        me = threading.get_ident()
        with _LOCK:
            modules = list(self.model.named_modules())
            for name, module in modules:
                hold = _HOLDS.get(module)
                if hold is not None and hold.thread != me:
                    raise _conflict(self.model, name, module, hold, self.what)
            for _, module in modules:
                hold = _HOLDS.get(module)
                if hold is None:
                    hold = _HOLDS[module] = _Hold(self.what)
                hold.depth += 1
                self._entered.append((module, hold))
        return self

    def __exit__(self, *exc):
        # The exit may run in another thread (a generator finalised elsewhere),
        # so it releases the holds this use took, not "the current thread's".
        with _LOCK:
            while self._entered:
                module, hold = self._entered.pop()
                hold.depth -= 1
                if hold.depth == 0 and _HOLDS.get(module) is hold:
                    del _HOLDS[module]
        return False


def use_model(model: torch.nn.Module, what: str) -> _Use:
    """``with use_model(model, "EKFACIFVP.fit"):`` holds ``model`` for this thread."""
    return _Use(model, what)

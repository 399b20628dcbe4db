"""Compute configuration shared by every estimator.

The data flow of a :class:`ComputeConfig`: an estimator stores the one it is
given (or ``None``) as a hyper-parameter; ``BaseEstimator.fit`` resolves
``None`` to ``ComputeConfig()`` and keeps the result with the fitted state
(pickled with it: a frozen dataclass of plain values). ``fit`` and
``transform`` read from it the device (``torch_device``, ``"auto"``
resolved at each access), the output and state dtype (``torch_dtype``),
the batch size of the passes over data, whether progress bars draw
(``show_progress``), the working-memory budget
(:mod:`attribkit._compute.budget`) and whether a fit reduces over a
``torch.distributed`` process group (:mod:`attribkit._compute.distributed`).
This module is a leaf: it imports only torch.
"""

from __future__ import annotations

import dataclasses
import re

import torch

__all__ = ["ComputeConfig"]

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_DEVICE_RE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for name, value in _DTYPES.items():
            if value is dtype:
                return name
    elif isinstance(dtype, str) and dtype in _DTYPES:
        return dtype
    raise ValueError(
        "The 'dtype' field of ComputeConfig must be one of "
        f"{sorted(_DTYPES)} (a string or the torch.dtype). Got {dtype!r} instead."
    )


def check_device_available(device: torch.device, name: str = "device") -> torch.device:
    """Raise a clear ``ValueError`` when ``device`` cannot be used here."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"The {name!r} {str(device)!r} is not available: torch sees no CUDA "
                "device on this machine. Use device='cpu' or 'auto'."
            )
        index = device.index if device.index is not None else 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"The {name!r} {str(device)!r} is not available: only "
                f"{torch.cuda.device_count()} CUDA device(s) are visible."
            )
    elif device.type != "cpu":
        raise ValueError(f"The {name!r} must be 'cpu' or 'cuda[:N]'. Got {str(device)!r} instead.")
    return device


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """Where and how an estimator computes.

    An immutable, picklable value object; every estimator takes one as its
    ``config`` parameter (``None`` means ``ComputeConfig()``).

    Parameters
    ----------
    device : str or torch.device, default="cpu"
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available).
        A CUDA device that torch cannot see raises ``ValueError`` here.
    dtype : str or torch.dtype, default="float32"
        The dtype of outputs and stored state: ``"float16"``, ``"bfloat16"``,
        ``"float32"`` or ``"float64"``. Stored as its name. Factorisations
        (Cholesky, eigendecompositions) run in float64 internally whatever this
        says, because their rounding error grows with the condition number and
        half/single precision loses the small eigen-directions that an inverse
        amplifies most.
    batch_size : int, default=64
        Examples per batch when an estimator iterates over data itself.
    progress : bool or "auto", default="auto"
        Show a tqdm progress bar on long work; ``"auto"`` shows it when stderr
        is a terminal.
    memory_budget : int, default=2 * 2**30
        Bytes of working memory an estimator may use for caches and chunks
        beyond its inputs, outputs and fitted state (e.g. a cached projection
        matrix).
    distributed : bool or "auto", default="auto"
        ``"auto"``: when ``torch.distributed`` is initialised with more than
        one rank, ``fit`` reduces its statistics over the default process
        group, each rank passing its own shard of the data; ``False``: never;
        ``True``: require an initialised process group (``fit`` raises
        ``RuntimeError`` otherwise). Only this setting is stored: the process
        group is looked up at fit time and never pickled.

    Examples
    --------
    >>> import attribkit as ak
    >>> cfg = ak.ComputeConfig(dtype="float64", batch_size=128)
    >>> cfg.torch_dtype
    torch.float64
    """

    device: str | torch.device = "cpu"
    dtype: str | torch.dtype = "float32"
    batch_size: int = 64
    progress: bool | str = "auto"
    memory_budget: int = 2 * 2**30
    distributed: bool | str = "auto"

    def __post_init__(self):
        device = self.device
        if isinstance(device, torch.device):
            device = str(device)
        if not isinstance(device, str) or not _DEVICE_RE.match(device):
            raise ValueError(
                "The 'device' field of ComputeConfig must be 'cpu', 'cuda', 'cuda:N' "
                f"or 'auto'. Got {self.device!r} instead."
            )
        if device != "auto":
            check_device_available(torch.device(device))
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or (self.batch_size < 1)
        ):
            raise ValueError(
                "The 'batch_size' field of ComputeConfig must be an int >= 1. "
                f"Got {self.batch_size!r} instead."
            )
        if self.progress not in (True, False, "auto"):
            raise ValueError(
                "The 'progress' field of ComputeConfig must be True, False or 'auto'. "
                f"Got {self.progress!r} instead."
            )
        if (
            isinstance(self.memory_budget, bool)
            or not isinstance(self.memory_budget, int)
            or self.memory_budget < 1
        ):
            raise ValueError(
                "The 'memory_budget' field of ComputeConfig must be an int >= 1 (bytes). "
                f"Got {self.memory_budget!r} instead."
            )

        setting = self.distributed
        is_auto = isinstance(setting, str) and setting == "auto"
        if not (setting is True or setting is False or is_auto):
            raise ValueError(
                "The 'distributed' field of ComputeConfig must be True, False or 'auto'. "
                f"Got {self.distributed!r} instead."
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        """The configured dtype as a ``torch.dtype``."""
        return _DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        """The device to compute on now (``"auto"`` resolved on each access)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def show_progress(self) -> bool:
        """Whether long work should draw a progress bar."""
        if self.progress == "auto":
            import sys

            return bool(getattr(sys.stderr, "isatty", lambda: False)())
        return bool(self.progress)

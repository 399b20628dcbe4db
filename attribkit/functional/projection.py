"""The seed's projection functions, over attribkit's projectors.

* ``random_project`` -> :class:`attribkit.RandomProjector` (array mode), one
  fitted projector per ``ensemble_id``;
* ``arnoldi_project`` -> the Lanczos core of :class:`attribkit.ArnoldiProjector`,
  run on the Hessian-vector products of the user's ``func`` at ``x``.

Names, parameter order, kinds and defaults are the seed's (dattri 0.1.0's
``dattri.func.projection``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np
import torch

from ..projection.random import RandomProjector
from ._common import config, is_int, value_error

__all__ = ["random_project"]

_MASK64 = (1 << 64) - 1


def _check_int(func: str, name: str, value, minimum: int | None = None) -> int:
    if not is_int(value) or (minimum is not None and value < minimum):
        expected = "an int" if minimum is None else f"an int >= {minimum}"
        raise value_error(func, name, expected, value)
    return int(value)


def ensemble_seed(proj_seed: int, ensemble_id: int) -> int:
    """The RandomProjector seed of ensemble member ``ensemble_id``.

    Member 0 uses ``proj_seed`` itself (so ``random_project(...)(X)`` is
    ``RandomProjector(seed=proj_seed).transform(X)``); every other member a
    64-bit seed that numpy's ``SeedSequence`` derives from
    ``(proj_seed, ensemble_id)``, so members are independent of each other
    (and of other ``proj_seed`` values, up to 64-bit hash collisions), and
    reproducible.
    """
    if ensemble_id == 0:
        return int(proj_seed)
    seq = np.random.SeedSequence(int(proj_seed) & _MASK64, spawn_key=(int(ensemble_id) & _MASK64,))
    words = seq.generate_state(2, np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def _feature_layout(feature, feature_batch_size: int, func: str) -> OrderedDict:
    """``name -> entries per example`` of the feature (one ``None`` key for a tensor)."""
    if isinstance(feature, Mapping):
        items = list(feature.items())
        if not items:
            raise ValueError(f"The 'feature' of {func} is an empty dict.")
    elif isinstance(feature, torch.Tensor):
        items = [(None, feature)]
    else:
        raise TypeError(
            f"The 'feature' parameter of {func} must be a torch.Tensor of shape "
            "(feature_batch_size, feature_dim) or a dict name -> tensor shaped like "
            f"model.named_parameters(). Got {type(feature).__name__} instead."
        )
    layout = OrderedDict()
    for key, value in items:
        where = "feature" if key is None else f"feature[{key!r}]"
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{where} of {func} must be a torch.Tensor. Got {type(value).__name__}."
            )
        if value.numel() == 0 or value.numel() % feature_batch_size:
            raise ValueError(
                f"{where} of {func} has {value.numel()} entries, which is not a positive "
                f"multiple of feature_batch_size={feature_batch_size}: it must hold "
                "feature_batch_size examples."
            )
        layout[key] = value.numel() // feature_batch_size
    return layout


def _flatten_feature(feature, layout: OrderedDict, func: str) -> tuple[torch.Tensor, bool]:
    """``(m, feature_dim)`` rows of ``feature`` in the layout's order; and whether it was 1-D."""
    p = sum(layout.values())
    if None in layout:
        if not isinstance(feature, torch.Tensor):
            raise TypeError(
                f"{func}'s projection was built for a tensor feature; got "
                f"{type(feature).__name__}."
            )
        if feature.ndim == 1 and feature.numel() == p:
            return feature.reshape(1, p), True
        if feature.ndim >= 2 and feature[0].numel() == p:
            return feature.reshape(feature.shape[0], p), False
        raise ValueError(
            f"The feature passed to {func}'s projection must have shape (m, {p}) (m examples "
            f"of feature_dim={p}). Got shape {tuple(feature.shape)} instead."
        )
    if not isinstance(feature, Mapping) or set(feature) != set(layout):
        got = list(feature) if isinstance(feature, Mapping) else type(feature).__name__
        raise ValueError(
            f"The feature passed to {func}'s projection must be a dict with the keys it was "
            f"built with ({list(layout)}). Got {got}."
        )
    m = None
    blocks = []
    for key, size in layout.items():
        value = feature[key]
        rows = value.shape[0] if value.ndim else 0
        if m is None:
            m = rows
        if rows != m or rows == 0 or value.numel() != rows * size:
            raise ValueError(
                f"feature[{key!r}] passed to {func}'s projection must hold m={m} examples of "
                f"{size} entries each. Got shape {tuple(value.shape)} instead."
            )
        blocks.append(value.reshape(m, size))
    return torch.cat(blocks, dim=1), False


def random_project(
    feature: dict[str, torch.Tensor] | torch.Tensor,
    feature_batch_size: int,
    proj_dim: int,
    proj_max_batch_size: int,
    device: str,
    proj_seed: int = 0,
    *,
    use_half_precision: bool = True,
) -> Callable:
    """Randomly projects the features to a smaller dimension.

    Builds a Johnson-Lindenstrauss projection for features shaped like
    ``feature`` and returns the function that applies it: each member of
    the ensemble is an :class:`attribkit.RandomProjector` (Rademacher
    ``±1/sqrt(proj_dim)`` entries, so squared norms are preserved in
    expectation) fitted to the feature's layout.

    Parameters
    ----------
    feature : torch.Tensor or dict of str to torch.Tensor
        An example of the features to project: a tensor of shape
        ``(feature_batch_size, feature_dim)``, or, typically for gradients of
        a ``torch.nn.Module``, a dict shaped like ``model.named_parameters()``
        whose values hold ``feature_batch_size`` examples each (e.g.
        ``(feature_batch_size, numel)`` or ``(feature_batch_size, *shape)``).
        Only its layout is used: ``feature_dim`` is the sum over keys of
        ``numel // feature_batch_size``.
    feature_batch_size : int
        The number of examples in each tensor of ``feature``.
    proj_dim : int
        Dimension of the projected feature.
    proj_max_batch_size : int
        Rows per call of the fast_jl CUDA kernel when it is used (a multiple
        of 8: at most 32 for A100 GPUs, 16 for V100, 40 for H100).
    device : str
        ``"cuda"`` (or ``"cuda:N"``) or ``"cpu"``.
    proj_seed : int, default=0
        Seed of the projection matrix.
    use_half_precision : bool, default=True
        Compute and store in ``torch.float16`` (else ``torch.float32``).
        On CUDA the projection runs in float16 with float32 accumulation.
        On the CPU, which has no fast float16 matrix product, the inputs are
        rounded to float16, the product is computed in float32 and the
        result is rounded to float16: outputs are float16 as documented, at
        float32 speed. (Features beyond float16's range, 65504, raise a
        ``ValueError`` suggesting a wider dtype: pass
        ``use_half_precision=False``.)

    Returns
    -------
    callable
        ``project(feature, ensemble_id=0)``: ``feature`` a tensor
        ``(m, feature_dim)`` (or a 1-D ``(feature_dim,)``) or a dict with the
        same keys holding ``m`` examples each; returns the
        ``(m, proj_dim)`` projection (``(proj_dim,)`` for 1-D input) on
        ``device``. Each ``ensemble_id`` (an int) is an independent
        projection, the same on every call: id 0 uses ``proj_seed``, the
        others seeds derived from ``(proj_seed, ensemble_id)``.

    Notes
    -----
    **Where this differs from the reference.** dattri 0.1.0 uses a normal
    matrix on the CPU and fast_jl's Rademacher matrix on CUDA (failing when
    fast_jl is missing), and its ensemble seeds
    ``proj_seed + 100000 * ensemble_id`` collide across seeds (seed 100000 of
    member 0 is seed 0 of member 1). Here the matrix is RandomProjector's:
    the same on CPU and CUDA for any batch size, dict input equal to its
    flattened input; on CUDA with fast_jl installed (and ``proj_dim`` a
    multiple of 512, ``proj_max_batch_size`` of 8) fast_jl's kernel and
    matrix are used instead, as RandomProjector's ``backend="auto"`` does.
    The matrix of the latest ``ensemble_id`` used is cached while it fits
    the default memory budget (2 GiB).

    Examples
    --------
    >>> import torch
    >>> from attribkit.functional import random_project
    >>> model = torch.nn.Linear(20, 4)
    >>> grads = {k: torch.randn(8, p.numel()) for k, p in model.named_parameters()}
    >>> project = random_project(grads, 8, 16, 32, "cpu", use_half_precision=False)
    >>> project(grads).shape
    torch.Size([8, 16])
    >>> torch.equal(project(grads, ensemble_id=1), project(grads, ensemble_id=1))
    True
    >>> torch.equal(project(grads, ensemble_id=1), project(grads))
    False
    """
    name = "random_project"
    fbs = _check_int(name, "feature_batch_size", feature_batch_size, minimum=1)
    proj_dim = _check_int(name, "proj_dim", proj_dim, minimum=1)
    max_batch = _check_int(name, "proj_max_batch_size", proj_max_batch_size, minimum=1)
    proj_seed = _check_int(name, "proj_seed", proj_seed)
    if not isinstance(use_half_precision, (bool, np.bool_)):
        raise value_error(name, "use_half_precision", "a bool", use_half_precision)
    layout = _feature_layout(feature, fbs, name)
    p = sum(layout.values())
    cfg = config(device, torch.float16 if use_half_precision else torch.float32)
    # A stride-0 row: the layout without copying (or even reading) the user's feature.
    template = torch.zeros((), device=cfg.torch_device).expand(1, p)
    members: dict[int, RandomProjector] = {}

    def _member(ensemble_id: int) -> RandomProjector:
        if ensemble_id not in members:
            members.clear()  # keep one (possibly cached) matrix, as the reference does
            members[ensemble_id] = RandomProjector(
                proj_dim=proj_dim,
                seed=ensemble_seed(proj_seed, ensemble_id),
                max_batch_size=max_batch,
                config=cfg,
            ).fit(template)
        return members[ensemble_id]

    def _random_project_func(feature, ensemble_id: int = 0) -> torch.Tensor:
        """The ``(m, proj_dim)`` projection of ``feature`` by member ``ensemble_id``."""
        ensemble_id = _check_int(name, "ensemble_id", ensemble_id)
        flat, one = _flatten_feature(feature, layout, name)
        out = _member(ensemble_id).transform(flat.detach())
        return out[0] if one else out

    return _random_project_func

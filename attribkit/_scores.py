"""Influence scores from a fitted inverse-Fisher-vector-product estimator.

``influence(ifvp, train, test)`` is ``ifvp.transform(test) @ train.T``. The
test side is preconditioned once; the training vectors are read in blocks of
rows sized to ``config.memory_budget`` (so they may be an ``np.memmap`` larger
than memory: only one block is ever copied), each block is scored against the
whole test set, and the scores are written by the GEMM straight into the
result's columns (``out=`` a column slice), or merged into a running top-k
when ``top_k`` is given. ``self_influence`` streams the vectors
the same way and keeps only the row-wise products.

Sign convention (Koh & Liang, 2017): with ``F`` standing for the Hessian of
the mean training loss, up-weighting training example ``i`` by ``ε`` changes
the test loss by ``-ε g_testᵀ F⁻¹ g_i``; so a positive score is a proponent
(more weight lowers the test loss) and removing example ``i`` (``ε = -1/n``)
raises the test loss by about ``score / n_train``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from ._compute import progress
from ._compute import validation as V
from ._compute.budget import rows_within
from ._compute.precision import itemsize
from ._compute.vectors import all_finite, flatten_input, unflatten_output

__all__ = ["influence", "self_influence"]

_SELF_BLOCK = 2048


# --------------------------------------------------------------------------- inputs
def _resolve(ifvp, owner: str):
    """``(estimator, preprocess)`` for a fitted IFVP or a Pipeline ending in one."""
    pre = None
    final = ifvp
    if isinstance(ifvp, Pipeline):
        final = ifvp.steps[-1][1] if ifvp.steps else None
        if len(ifvp.steps) > 1:
            pre = ifvp[:-1].transform
    if not getattr(final, "_is_ifvp", False):
        what = (
            f"a Pipeline whose last step is {type(final).__name__}"
            if isinstance(ifvp, Pipeline)
            else type(ifvp).__name__
        )
        hint = ""
        if hasattr(final, "_is_ifvp") or hasattr(final, "transform"):
            hint = (
                " A projector or other transformer maps gradients to new features but does "
                "not precondition them; put it before an IFVP estimator in a Pipeline."
            )
        raise TypeError(
            f"The 'ifvp' argument of {owner} must be a fitted attribkit IFVP estimator "
            "(ExplicitIFVP, DataInfIFVP, EKFACIFVP, ...) or a fitted sklearn Pipeline whose "
            f"last step is one. Got {what} instead.{hint}"
        )
    check_is_fitted(final)
    return final, pre


def _as_rows(x, name: str, owner: str):
    """``(container, n_rows)`` without copying arrays, tensors, memmaps or dicts."""
    if isinstance(x, Mapping):
        if not x:
            raise ValueError(f"Input {name} of {owner} is an empty dict.")
        lengths = {k: len(v) for k, v in x.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"All values of input {name} of {owner} must have the same number of rows. "
                f"Got {lengths}."
            )
        return x, next(iter(lengths.values()))
    if isinstance(x, (np.ndarray, torch.Tensor)):
        if x.ndim != 2:
            raise ValueError(
                f"Expected a 2-D array for input {name} of {owner}, (n_samples, "
                f"n_features). Got shape {tuple(x.shape)} instead."
            )
        return x, int(x.shape[0])
    if hasattr(x, "to_numpy"):  # pandas / polars frames
        x = x.to_numpy()
    else:
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(
            f"Expected a 2-D array for input {name} of {owner}, (n_samples, n_features). "
            f"Got shape {tuple(x.shape)} instead."
        )
    return x, int(x.shape[0])


def _rows(x, start: int, stop: int):
    if isinstance(x, Mapping):
        return {k: v[start:stop] for k, v in x.items()}
    return x[start:stop]


def _row_bytes(x) -> int:
    """Bytes of one input row (before conversion)."""
    if isinstance(x, Mapping):
        return sum(_row_bytes(v) for v in x.values())
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        x = np.asarray(x[:1])
    item = x.element_size() if isinstance(x, torch.Tensor) else x.dtype.itemsize
    return item * math.prod(x.shape[1:])


class _Side:
    """Flattens blocks of one set of vectors into the estimator's layout."""

    def __init__(self, est, pre, name: str, owner: str):
        self.est, self.pre, self.name, self.owner = est, pre, name, owner
        self.dtype = est._config.torch_dtype

    def flat(self, block) -> tuple[torch.Tensor, str]:
        if self.pre is not None:
            block = self.pre(block)
        inp = flatten_input(
            block,
            self.est.param_shapes_,
            self.owner,
            device=self.est._device,
            dtype=self.dtype,
            name=self.name,
        )
        return inp.flat, inp.kind


def _block_rows(est, raw, m: int, extra_per_row: int = 0, reserved: int = 0) -> int:
    """Training rows per block within ``config.memory_budget``.

    A block costs its raw copy and its flat tensor in ``config.dtype``, plus
    ``m`` scores per row when they go through an ``(m, block)`` temporary (0
    when the product is written straight into the result, which is output,
    not working memory) and ``extra_per_row``; ``reserved`` bytes of the
    budget are taken first (the running top-k merge's fixed temporaries).
    """
    item = itemsize(est._config.torch_dtype)
    per_row = _row_bytes(raw) + est.n_features_in_ * item + m * item + extra_per_row
    return rows_within(est._config.memory_budget - reserved, per_row)


def _bar(total_blocks: int, est, desc: str):
    return progress.bar(
        total=total_blocks, desc=desc, enabled=est._config.show_progress, several=True
    )


def _kind(x) -> str:
    """Results are numpy for numpy (or other array-like) input, torch otherwise."""
    return "torch" if isinstance(x, (torch.Tensor, Mapping)) else "numpy"


def _out(t: torch.Tensor, kind: str):
    return unflatten_output(t, kind, None)


def _overflow(est, what: str) -> ValueError:
    """Finite inputs (checked on the way in) gave non-finite ``what``: an overflow."""
    return ValueError(
        f"{type(est).__name__} produced non-finite {what} from finite vectors: the result "
        f"overflows config.dtype={est._config.dtype!r}. Use a wider dtype."
    )


# --------------------------------------------------------------------------- influence
def influence(ifvp, train_vectors, test_vectors, top_k: int | None = None):
    """Influence scores ``ifvp.transform(test) @ train.T``, block by block.

    Entry ``(t, i)`` is ``g_tᵀ F⁻¹ g_i``: the influence of training example
    ``i`` on the loss of test example ``t``. **Sign**: a positive score means
    training example ``i`` is a *proponent* of test example ``t``: up-weighting
    it lowers the test loss, and removing it (retraining without it) raises
    that loss by about ``score / n_train``; a negative score is an *opponent*
    (Koh & Liang, 2017, with the Fisher standing for the Hessian). For a
    score to mean this, the gradients must be of the same loss the model was
    trained with; a test example's gradient is taken at its true label to ask
    "why this loss", at the model's predicted label to ask "why this
    prediction".

    Parameters
    ----------
    ifvp : fitted IFVP estimator or fitted sklearn.pipeline.Pipeline
        For example a fitted :class:`~attribkit.ExplicitIFVP` or
        :class:`~attribkit.DataInfIFVP`; or a Pipeline whose last step is one,
        whose earlier steps (e.g. a :class:`~attribkit.RandomProjector`)
        transform both sets of vectors first. Anything else raises
        ``TypeError``.
    train_vectors : array-like of shape (n_train, n_features) or dict
        Training gradients in the layout the (pipeline's) input expects. May
        be an ``np.memmap`` larger than memory: it is read in blocks of rows
        and never copied whole.
    test_vectors : array-like of shape (n_test, n_features) or dict
        Test gradients, preconditioned at once (they must fit in memory).
    top_k : int, optional
        When given, return the ``top_k`` strongest proponents and opponents
        of each test example instead of the score matrix, found by a running
        merge over the blocks (the whole matrix is never held).

    Returns
    -------
    scores : ndarray or torch.Tensor of shape (n_test, n_train)
        When ``top_k`` is None. numpy when ``test_vectors`` is a numpy array
        (or another array-like), else torch; in ``config.dtype``.
    (top_values, top_indices, bottom_values, bottom_indices) : tuple
        When ``top_k`` is given, each of shape ``(n_test, top_k)``:
        ``top_values`` the largest scores in decreasing order and
        ``top_indices`` their training rows (int64), ``bottom_values`` the
        smallest (most negative) scores in increasing order and
        ``bottom_indices`` theirs; equal to ``torch.topk`` of the full
        matrix (largest and smallest). Same array type as ``scores``.

    Raises
    ------
    ValueError
        When the vectors contain NaN or infinity, or when finite vectors give
        non-finite scores (they overflow ``config.dtype``; the message names
        it): no score matrix or ranking with inf or NaN is ever returned. The
        check costs one reduction per block of scores.

    Notes
    -----
    Training rows are processed in blocks whose raw copy and flat tensor fit
    ``config.memory_budget`` (working memory beyond inputs and outputs, as
    everywhere in attribkit): each block's product is written by one GEMM
    straight into its columns of the C-ordered result, with no temporary, so
    the result is not charged and the blocks are as large as the budget
    allows (512 rows of 1,024 float32 features in 4 MiB; 4,096 x 4,096 scores
    from such blocks measured 1.0-1.1x the in-memory one-block time). With
    ``top_k`` the GEMM writes a block's scores beside the kept values in one
    ``(n_test, top_k + block)`` temporary, which is charged (after the
    merge's fixed ``(n_test, top_k)`` temporaries), and one top-k per side
    selects from both; selecting from narrow blocks is slower per score, so
    a tiny budget costs more here (4 MiB for 4,096 test rows: about 1.5x the
    one-block time). The scores equal the one-shot product to rounding (each
    is the same dot product; BLAS may block a narrower GEMM differently). A
    progress bar (``config.progress``) follows the blocks when there are
    several.

    Examples
    --------
    >>> import torch, attribkit as ak
    >>> G = torch.randn(20, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> ifvp = ak.ExplicitIFVP(damping=0.1).fit(G)
    >>> ak.influence(ifvp, G, G[:3]).shape
    torch.Size([3, 20])
    >>> top, top_idx, bottom, bottom_idx = ak.influence(ifvp, G, G[:3], top_k=2)
    >>> top_idx.shape
    torch.Size([3, 2])
    >>> scores = ak.influence(ifvp, G, G[:3])
    >>> torch.allclose(top[:, 0], scores.max(dim=1).values)  # the strongest proponent
    True
    """
    owner = "influence"
    est, pre = _resolve(ifvp, owner)
    train, n = _as_rows(train_vectors, "train_vectors", owner)
    if n == 0:
        raise ValueError(f"Input train_vectors of {owner} has 0 rows; expected at least 1.")
    if top_k is not None:
        V.check_int(owner, "top_k", top_k, minimum=1)
        if top_k > n:
            raise V.param_error(owner, "top_k", f"an int in [1, n_train={n}]", top_k)
    dtype = est._config.torch_dtype
    kind = _kind(test_vectors)
    test, _ = _Side(est, pre, "test_vectors", owner).flat(test_vectors)
    # In row blocks for the reason self_influence gives.
    preconditioned = torch.cat(
        [
            est._transform(test[s : s + _SELF_BLOCK]).to(dtype)
            for s in range(0, len(test), _SELF_BLOCK)
        ]
    )
    # Inputs are checked finite as they are flattened, so a NaN or infinity
    # here or in a block of scores is an overflow of config.dtype (API section
    # 9): raise rather than return it, or rank it in top_k. One reduction per
    # block (all_finite), the elementwise test only when that sum is not finite.
    if not all_finite(preconditioned):
        raise _overflow(est, "influence scores")
    m = preconditioned.shape[0]
    side = _Side(est, pre, "train_vectors", owner)
    item = itemsize(dtype)
    if top_k is None:
        # Each block's product is written by the GEMM straight into its columns
        # of the result (``out=`` a column slice: BLAS's leading dimension, no
        # temporary, no copy), so only the block's raw and flat copies count.
        rows = _block_rows(est, train, 0)
        scores = torch.empty((m, n), dtype=dtype, device=est._device)
    else:
        # The block's (m, block) scores are a temporary, charged; the merge's fixed
        # temporaries (the kept values' columns, each side's new top-k and indices)
        # are reserved first.
        rows = _block_rows(est, train, m, reserved=4 * m * top_k * (item + 8))
        # The GEMM writes each block's scores into the right-hand columns of
        # ``window``, whose left-hand columns hold the kept values: one top-k per
        # side and block selects from both, with no concatenation.
        window = torch.empty((m, top_k + min(rows, n)), dtype=dtype, device=est._device)
        top = bottom = None
        kept = 0
    blocks = range(0, n, rows)
    with torch.no_grad(), _bar(len(blocks), est, "influence") as bar:
        for start in blocks:
            stop = min(n, start + rows)
            flat, _ = side.flat(_rows(train, start, stop))
            if flat.shape[0] != stop - start:  # pragma: no cover - a preprocess changed rows
                raise ValueError("The pipeline's earlier steps changed the number of rows.")
            if top_k is None:
                block = scores[:, start:stop]
            else:
                block = window[:, top_k : top_k + stop - start]
            torch.mm(preconditioned, flat.T, out=block)
            if not all_finite(block):
                raise _overflow(est, "influence scores")
            if top_k is not None:
                candidates = window[:, top_k - kept : top_k + stop - start]
                k = min(top_k, kept + stop - start)
                top = _select(candidates, top, k, start, largest=True)
                bottom = _select(candidates, bottom, k, start, largest=False)
                kept = k
            del flat  # before the next block is read: one block's copies at a time
            bar.update(1)
    if top_k is None:
        return _out(scores, kind)
    return tuple(_out(t, kind) for t in (*top, *bottom))


def _select(candidates: torch.Tensor, kept, k: int, offset: int, *, largest: bool):
    """The running ``(values, indices)`` top-k after one more block.

    ``candidates`` is ``[kept values | block scores]`` (its left-hand columns
    are overwritten with this side's kept values); block column ``j`` is
    training row ``offset + j``.
    """
    n_kept = 0 if kept is None else kept[0].shape[1]
    if n_kept:
        candidates[:, :n_kept] = kept[0]
    values, pos = torch.topk(candidates, k, dim=1, largest=largest)
    idx = pos + (offset - n_kept)
    if n_kept:
        idx = torch.where(pos < n_kept, kept[1].gather(1, pos.clamp(max=n_kept - 1)), idx)
    return values, idx


def self_influence(ifvp, vectors):
    """Self-influence ``g_iᵀ F⁻¹ g_i`` of each vector, without the ``n × n`` matrix.

    The diagonal of ``influence(ifvp, vectors, vectors)``: row-wise sums of
    ``transform(V) * V``, computed in blocks of rows within
    ``config.memory_budget`` (``vectors`` may be an ``np.memmap`` larger than
    memory). Mislabelled and atypical training examples score high: their
    gradient is large in directions the rest of the data does not support.

    Parameters
    ----------
    ifvp : fitted IFVP estimator or fitted sklearn.pipeline.Pipeline
        As in :func:`influence`.
    vectors : array-like of shape (n, n_features) or dict
        Per-example gradients in the layout the (pipeline's) input expects.

    Returns
    -------
    ndarray or torch.Tensor of shape (n,)
        The self-influence scores: numpy for numpy (or array-like) input, else
        torch; in ``config.dtype``.
        The products are summed in the precision of the estimator's
        ``transform`` (float64 for ExplicitIFVP) before the cast.

    Raises
    ------
    ValueError
        When the vectors contain NaN or infinity, or when finite vectors give
        non-finite scores (they overflow ``config.dtype``; the message names it).

    Examples
    --------
    >>> import torch, attribkit as ak
    >>> G = torch.randn(20, 5, dtype=torch.float64)
    >>> ifvp = ak.ExplicitIFVP(damping=0.1).fit(G)
    >>> s = ak.self_influence(ifvp, G)
    >>> s.shape
    torch.Size([20])
    >>> torch.allclose(s, ak.influence(ifvp, G, G).diagonal())
    True
    """
    owner = "self_influence"
    est, pre = _resolve(ifvp, owner)
    data, n = _as_rows(vectors, "vectors", owner)
    if n == 0:
        raise ValueError(f"Input vectors of {owner} has 0 rows; expected at least 1.")
    dtype = est._config.torch_dtype
    side = _Side(est, pre, "vectors", owner)
    # A block holds its raw copy, its flat tensor and the (float64) transform.
    rows = _block_rows(est, data, 0, extra_per_row=16 * est.n_features_in_)
    # Blocks of at most 2048 rows: transforms with many more right-hand sides
    # run slower per row (ExplicitIFVP's triangular solves fall out of cache:
    # measured 0.54 s for 20,000 x 512 in 2048-row blocks, 1.4 s at once).
    rows = min(rows, _SELF_BLOCK)
    blocks = range(0, n, rows)
    out = torch.empty(n, dtype=dtype, device=est._device)
    kind = _kind(vectors)
    with _bar(len(blocks), est, "self_influence") as bar:
        for start in blocks:
            stop = min(n, start + rows)
            flat, _ = side.flat(_rows(data, start, stop))
            pre_flat = est._transform(flat)
            work = torch.promote_types(pre_flat.dtype, flat.dtype)
            out[start:stop] = (pre_flat.to(work) * flat.to(work)).sum(1).to(dtype)
            bar.update(1)
    if not all_finite(out):
        raise _overflow(est, "self-influence")
    return _out(out, kind)

"""Does attribution predict retraining? Leave-one-out correlation and the LDS.

Two protocols score an attribution method against the ground truth of
retraining, which stays the user's code (``examples/quickstart.py`` shows it):

* :func:`loo_correlation` (Koh & Liang, 2017): leave each of some training
  examples out in turn, retrain, and correlate, per test example, the measured
  change of its loss with the example's score;
* :func:`lds`, the linear datamodeling score (Park et al., 2023): retrain on
  many random subsets of the training set and correlate, per test example,
  the sum of the scores of each subset with the retrained model's output.

**Sign convention** (that of :func:`attribkit.influence`): a positive score
``scores[t, i]`` says training example ``i`` is a *proponent* of test example
``t``: up-weighting it lowers ``t``'s loss, so removing it *raises* that loss,
by about ``scores[t, i] / n_train``. A good method therefore has a *positive*
LOO correlation with ``loss_changes = retrained loss - original loss``, and a
positive LDS with ``outputs`` where higher is better (minus the loss, the
correct-class margin, ...). A method with the sign reversed shows up as a
correlation near ``-1``.

Both functions take numpy arrays, torch tensors or nested lists, compute in
float64 and return a numpy ``(n_test,)`` array. A correlation is undefined
when one of its two series is constant; that test example gets ``nan`` and a
``UserWarning`` names it (average with ``np.nanmean``).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

__all__ = ["loo_correlation", "lds"]

_METHODS = ("spearman", "pearson")


def _as_float_array(value, name: str, func: str, ndim: int) -> np.ndarray:
    """``value`` as a finite float64 numpy array with ``ndim`` dimensions."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"The '{name}' argument of {func} must be a numeric array-like. "
            f"Got {type(value).__name__} instead ({exc})."
        ) from exc
    if array.ndim != ndim:
        raise ValueError(
            f"The '{name}' argument of {func} must be a {ndim}-D array. Got an array of "
            f"shape {array.shape} instead."
        )
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(
            f"The '{name}' argument of {func} must be finite. Got {bad} NaN or infinite "
            f"entries out of {array.size}."
        )
    return array


def _correlations(x: np.ndarray, y: np.ndarray, method: str, func: str) -> np.ndarray:
    """Column-wise correlation of two ``(m, k)`` arrays -> ``(k,)``.

    Spearman is Pearson's correlation of the ranks (ties get their average
    rank, as ``scipy.stats.spearmanr`` does); both come from ``scipy.stats``.
    """
    if method == "spearman":
        x = stats.rankdata(x, axis=0)
        y = stats.rankdata(y, axis=0)
    constant = (np.ptp(x, axis=0) == 0) | (np.ptp(y, axis=0) == 0)
    result = np.full(x.shape[1], np.nan)
    ok = ~constant
    if ok.any():
        result[ok] = stats.pearsonr(x[:, ok], y[:, ok], axis=0).statistic
    if constant.any():
        which = np.flatnonzero(constant)
        shown = ", ".join(map(str, which[:10])) + (", ..." if len(which) > 10 else "")
        warnings.warn(
            f"{func}: the correlation is undefined for {len(which)} test example(s) "
            f"(indices {shown}) because their scores or measurements are constant over the "
            "retrained models; they get nan.",
            UserWarning,
            stacklevel=3,
        )
    return np.clip(result, -1.0, 1.0)


def loo_correlation(scores, removed, loss_changes, method: str = "spearman") -> np.ndarray:
    """Leave-one-out correlation of attribution scores, per test example.

    For each test example ``t``, the correlation over the left-out training
    examples ``removed[j]`` between the predicted effect ``scores[t,
    removed[j]]`` and the measured change ``loss_changes[j, t]`` of ``t``'s
    loss when ``removed[j]`` is left out and the model retrained (Koh &
    Liang, 2017).

    Parameters
    ----------
    scores : array-like of shape (n_test, n_train)
        Attribution scores, e.g. from :func:`attribkit.influence`; positive
        means proponent (removing the example should raise the test loss).
    removed : array-like of int, shape (n_removed,)
        Indices (``0 <= i < n_train``, distinct) of the training examples that
        were left out, one retraining each; ``n_removed >= 2``.
    loss_changes : array-like of shape (n_removed, n_test)
        ``loss_changes[j, t]`` = loss of test example ``t`` under the model
        retrained without ``removed[j]``, minus its loss under the original
        model.
    method : {"spearman", "pearson"}, default="spearman"
        Rank (Spearman, ties averaged) or linear (Pearson) correlation, from
        ``scipy.stats``.

    Returns
    -------
    ndarray of shape (n_test,)
        The float64 correlations, in ``[-1, 1]``: ``1`` when the scores order the
        retraining effects perfectly; ``nan`` (with a ``UserWarning``) for a
        test example whose scores or loss changes over ``removed`` are
        constant.

    Raises
    ------
    ValueError
        For shapes that do not match, indices out of range or repeated,
        fewer than two removed examples, non-finite values or an unknown
        ``method``.

    See Also
    --------
    lds : The linear datamodeling score, from retraining on subsets.

    References
    ----------
    .. [1] P. W. Koh and P. Liang, "Understanding Black-box Predictions via
       Influence Functions", ICML 2017.

    Examples
    --------
    >>> import numpy as np
    >>> from attribkit.evaluation import loo_correlation
    >>> scores = np.array([[3.0, -1.0, 0.5, 2.0], [0.1, 0.2, 0.3, 0.4]])
    >>> removed = [0, 1, 3]
    >>> loss_changes = np.array([[0.3, 0.01], [-0.1, 0.02], [0.2, 0.04]])
    >>> loo_correlation(scores, removed, loss_changes)
    array([1., 1.])
    >>> loo_correlation(-scores, removed, loss_changes)  # a reversed sign
    array([-1., -1.])
    """
    func = "loo_correlation"
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(
            f"The 'method' argument of {func} must be one of {_METHODS}. Got {method!r} instead."
        )
    scores = _as_float_array(scores, "scores", func, 2)
    n_test, n_train = scores.shape
    removed = _check_indices(removed, n_train, func)
    loss_changes = _as_float_array(loss_changes, "loss_changes", func, 2)
    expected = (len(removed), n_test)
    if loss_changes.shape != expected:
        raise ValueError(
            f"The 'loss_changes' argument of {func} must have shape (len(removed), n_test) = "
            f"{expected}: one row per left-out example, one column per test example of "
            f"'scores' {scores.shape}. Got {loss_changes.shape} instead."
        )
    return _correlations(scores[:, removed].T, loss_changes, method, func)


def _check_indices(removed, n_train: int, func: str) -> np.ndarray:
    try:
        import torch

        if isinstance(removed, torch.Tensor):
            removed = removed.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    array = np.asarray(removed)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ValueError(
            f"The 'removed' argument of {func} must be a 1-D array of integer indices into "
            f"the training examples. Got an array of shape {array.shape} and dtype "
            f"{array.dtype} instead."
        )
    if array.size < 2:
        raise ValueError(
            f"The 'removed' argument of {func} must hold at least 2 indices (a correlation "
            f"over fewer points is undefined). Got {array.size}."
        )
    bad = (array < 0) | (array >= n_train)
    if bad.any():
        raise ValueError(
            f"The 'removed' argument of {func} must hold indices in [0, n_train) = "
            f"[0, {n_train}) (n_train = columns of 'scores'). Got {array[bad][:5].tolist()}."
        )
    values, counts = np.unique(array, return_counts=True)
    if (counts > 1).any():
        raise ValueError(
            f"The 'removed' argument of {func} must not repeat an index (each left-out "
            f"example is one retraining). Got repeated indices {values[counts > 1][:5].tolist()}."
        )
    return array.astype(np.intp)


def lds(scores, subsets, outputs) -> np.ndarray:
    """Linear datamodeling score of attribution scores, per test example.

    For each test example ``t``, the Spearman correlation over the retrained
    models ``m`` between the summed scores of the model's training subset,
    ``sum_{i in subset m} scores[t, i]``, and the model's measured output
    ``outputs[m, t]`` (Park et al., 2023). Scores that add up the way
    retraining does rank the subsets correctly and get an LDS near 1.

    Parameters
    ----------
    scores : array-like of shape (n_test, n_train)
        Attribution scores, e.g. from :func:`attribkit.influence`; positive
        means proponent (keeping the example should help the test example).
    subsets : array-like of bool, shape (n_models, n_train)
        ``subsets[m, i]`` is True when training example ``i`` was in the
        training set of model ``m`` (the field uses random half-size
        subsets); 0/1 integers are accepted too. ``n_models >= 2``.
    outputs : array-like of shape (n_models, n_test)
        The measured output of model ``m`` on test example ``t``, higher
        meaning better for it: minus the loss, or the correct-class margin.

    Returns
    -------
    ndarray of shape (n_test,)
        The float64 Spearman correlations, in ``[-1, 1]``; ``nan`` (with a
        ``UserWarning``) for a test example whose subset sums or outputs are
        constant over the models.

    Raises
    ------
    ValueError
        For shapes that do not match, masks that are not boolean (or 0/1),
        fewer than two models, or non-finite values.

    See Also
    --------
    loo_correlation : The leave-one-out protocol.

    References
    ----------
    .. [1] S. M. Park, K. Georgiev, A. Ilyas, G. Leclerc and A. Madry, "TRAK:
       Attributing Model Behavior at Scale", ICML 2023.

    Examples
    --------
    >>> import numpy as np
    >>> from attribkit.evaluation import lds
    >>> scores = np.array([[1.0, 2.0, -1.0, 0.5]])
    >>> subsets = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=bool)
    >>> outputs = np.array([[-0.1], [-0.5], [-0.3]])  # minus the test loss
    >>> lds(scores, subsets, outputs)
    array([1.])
    """
    func = "lds"
    scores = _as_float_array(scores, "scores", func, 2)
    n_test, n_train = scores.shape
    masks = _check_subsets(subsets, n_train, func)
    outputs = _as_float_array(outputs, "outputs", func, 2)
    expected = (masks.shape[0], n_test)
    if outputs.shape != expected:
        raise ValueError(
            f"The 'outputs' argument of {func} must have shape (n_models, n_test) = "
            f"{expected}: one row per subset of 'subsets', one column per test example of "
            f"'scores' {scores.shape}. Got {outputs.shape} instead."
        )
    predicted = masks.astype(np.float64) @ scores.T  # (n_models, n_test)
    return _correlations(predicted, outputs, "spearman", func)


def _check_subsets(subsets, n_train: int, func: str) -> np.ndarray:
    try:
        import torch

        if isinstance(subsets, torch.Tensor):
            subsets = subsets.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    array = np.asarray(subsets)
    if array.ndim != 2 or array.shape[1] != n_train:
        raise ValueError(
            f"The 'subsets' argument of {func} must be a 2-D (n_models, n_train) boolean mask "
            f"with n_train = {n_train} columns (those of 'scores'). Got an array of shape "
            f"{array.shape} instead."
        )
    if array.dtype != np.bool_:
        numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
        if not numeric or not np.isin(array, (0, 1)).all():
            raise ValueError(
                f"The 'subsets' argument of {func} must be a boolean mask (or 0/1 values). "
                f"Got dtype {array.dtype} with values other than 0 and 1."
            )
        array = array.astype(bool)
    if array.shape[0] < 2:
        raise ValueError(
            f"The 'subsets' argument of {func} must hold at least 2 models (a correlation "
            f"over fewer is undefined). Got {array.shape[0]}."
        )
    return array

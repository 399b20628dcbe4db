"""Influence scores from a fitted inverse-Fisher-vector-product estimator."""

from __future__ import annotations

from sklearn.utils.validation import check_is_fitted

from ._vectors import flatten_input, unflatten_output


def influence(ifvp, train_vectors, test_vectors):
    """Influence scores ``ifvp.transform(test) @ train.T``.

    Parameters
    ----------
    ifvp : fitted attribkit IFVP estimator
        For example a fitted :class:`~attribkit.ExplicitIFVP` or
        :class:`~attribkit.DataInfIFVP`.
    train_vectors : array-like of shape (n_train, n_features) or dict
        Training gradients, in the estimator's layout.
    test_vectors : array-like of shape (n_test, n_features) or dict
        Test gradients, in the estimator's layout.

    Returns
    -------
    scores : ndarray or torch.Tensor of shape (n_test, n_train)
        numpy when ``test_vectors`` is a numpy array (or array-like), else torch; in
        ``config.dtype``. Entry ``(t, i)`` is ``g_testᵀ F⁻¹ g_train_i``.

    Examples
    --------
    >>> import torch, attribkit as ak
    >>> G = torch.randn(20, 5, dtype=torch.float64)
    >>> ifvp = ak.ExplicitIFVP(damping=0.1).fit(G)
    >>> ak.influence(ifvp, G, G[:3]).shape
    torch.Size([3, 20])
    """
    check_is_fitted(ifvp)
    owner = type(ifvp).__name__
    dtype = ifvp._config.torch_dtype
    test = flatten_input(
        test_vectors,
        ifvp.param_shapes_,
        owner,
        device=ifvp._device,
        dtype=dtype,
        name="test_vectors",
    )
    train = flatten_input(
        train_vectors,
        ifvp.param_shapes_,
        owner,
        device=ifvp._device,
        dtype=dtype,
        name="train_vectors",
    )
    preconditioned = ifvp._transform(test.flat).to(dtype)
    scores = preconditioned @ train.flat.T
    return unflatten_output(scores, test.kind, None)

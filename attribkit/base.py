"""The estimator contract shared by every attribkit estimator.

``BaseEstimator.fit`` and ``transform`` are template methods (as curvlinops'
``_torch_base``): they validate, dispatch between model mode and array mode,
convert containers, devices and dtypes, keep ``fit`` atomic and give results
back in the container the user passed. Subclasses implement only

* ``_check_params(self)`` - validate hyper-parameters (raise ``ValueError``);
* ``_fit_model(self, model, data, config)`` - fit from a ``torch.nn.Module``
  and data; must call ``self._set_layout(shapes)`` before it communicates
  (under ``torch.distributed``, that is where the ranks first agree on what
  they fit, when the class sets ``_agree_on_fit = True``);
* ``_fit_array(self, G, config)`` - fit from a flat ``(n, p)`` tensor (the
  layout is already set);
* ``_transform(self, V)`` - flat ``(m, p)`` in, flat result out.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import sklearn.base
import torch
import torch.distributed as dist
from sklearn.utils.validation import (
    _check_feature_names,
    _check_feature_names_in,
    check_is_fitted,
)
from torch.utils._pytree import tree_map

from ._compute import validation as V
from ._compute.checksum import fingerprints
from ._compute.distributed import reducer
from ._compute.gradients import iter_gradients, layout_params
from ._compute.guard import use_model
from ._compute.model import autograd_on
from ._compute.vectors import (
    ARRAY_KEY,
    all_finite,
    fit_layout,
    flatten_dict,
    flatten_input,
    layout_size,
    unflatten_output,
)
from .config import ComputeConfig, check_device_available

__all__ = ["BaseEstimator"]


def _map_tensors(value, fn):
    """Apply ``fn`` to every tensor in nested containers (dicts, lists, tuples)."""
    return tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, value)


class BaseEstimator(sklearn.base.TransformerMixin, sklearn.base.BaseEstimator):
    """Base class of attribkit estimators (a scikit-learn transformer).

    ``fit(model, data=None)`` works in two modes:

    * **model mode** - ``model`` is a ``torch.nn.Module`` and ``data`` the
      examples (DataLoader, Dataset, ``(inputs, targets)`` tuple or iterable
      of batches);
    * **array mode** - ``model`` is an ``(n_samples, n_features)`` array-like
      or a dict ``name -> (n_samples, *shape)`` of per-example gradients;
      ``data`` is ignored (it is scikit-learn's ``y``), so the estimator works
      inside a ``sklearn.pipeline.Pipeline``.

    A failed ``fit`` leaves a previously fitted estimator unchanged. Fitted
    estimators pickle with their state on the CPU and no model or data; on
    load the state goes back to ``config.device`` when that is available.
    :func:`attribkit.save` / :func:`attribkit.load` store the same state
    without pickle, in a safetensors file that is safe to load from anyone
    (hooks ``_persist_state`` / ``_restore_state``).

    **Threads.** ``transform`` (and ``inverse_transform``, ``ihvp``) of a
    fitted estimator may be called from several threads at once and gives
    the serial result: it never writes the fitted state, and its caches are
    filled once. A model is used by one thread at a time: ``fit`` on a model
    that another thread is fitting on, or differentiating with
    :func:`~attribkit.per_example_gradients`, raises ``RuntimeError`` in the
    second thread (before touching the model); give each thread its own
    ``copy.deepcopy(model)``.

    Attributes
    ----------
    n_features_in_ : int
        Length of the flat vectors the estimator accepts.
    param_shapes_ : OrderedDict
        ``name -> shape`` of the parameters (or the single array block) whose
        flattened concatenation, in this order, is a flat vector.
    feature_names_in_ : ndarray of str
        Column names of a DataFrame given to ``fit`` in array mode (only then).

    Notes
    -----
    ``get_feature_names_out`` follows scikit-learn, so
    ``set_output(transform="pandas")`` works in a Pipeline: estimators whose
    output has the input's layout (IFVPs, ``_same_layout = True``) pass the
    input names through; the others (projectors) name their outputs with the
    lowercased class name and an index (``randomprojector0``, ...), as
    ``ClassNamePrefixFeaturesOutMixin`` does.

    An estimator is an inverse-Fisher-vector-product estimator, accepted by
    :func:`attribkit.influence`, when its class attribute ``_is_ifvp`` is
    true. Classes defined in the ``attribkit.ifvp`` package get
    ``_is_ifvp = True`` automatically; any other subclass (a user's own IFVP)
    opts in by setting ``_is_ifvp = True`` in its class body.

    **Subclassing.** ``fit`` and ``transform`` validate, convert and dispatch;
    a subclass implements only ``_fit_array(G, config)`` (from a flat
    ``(n, p)`` tensor on the fitted device), ``_fit_model(model, data,
    config)`` (which must call ``self._set_layout(shapes)``), ``_transform(V)``
    (flat ``(m, p)`` in, flat out) and, optionally, ``_check_params()``. A
    class attribute ``_model_mode`` or ``_array_mode`` set to a string
    instead of ``True`` refuses that mode with the string as the reason;
    ``_same_layout = False`` marks a projector (its output is not in the
    input's layout).

    Examples
    --------
    A diagonal inverse Fisher as a user's own IFVP estimator, accepted by
    :func:`attribkit.influence`:

    >>> import torch, attribkit as ak
    >>> class DiagonalIFVP(ak.BaseEstimator):
    ...     # (diag(F) + damping I)^-1, F the empirical Fisher of the gradients
    ...     _is_ifvp = True
    ...     _model_mode = "pass per-example gradients (ak.per_example_gradients)."
    ...
    ...     def __init__(self, damping=0.1, config=None):
    ...         self.damping = damping
    ...         self.config = config
    ...
    ...     def _fit_array(self, G, config):
    ...         self.diagonal_ = G.square().mean(0)
    ...
    ...     def _transform(self, V):
    ...         return V / (self.diagonal_ + self.damping)
    >>> G = torch.randn(20, 5)
    >>> ifvp = DiagonalIFVP().fit(G)
    >>> ifvp.n_features_in_, ak.influence(ifvp, G, G[:2]).shape
    (5, torch.Size([2, 20]))
    """

    #: True, or the reason why fitting from an array/model is impossible.
    _array_mode = True
    _model_mode = True
    #: transform returns vectors in the input's layout (IFVPs) or not (projectors).
    _same_layout = True
    #: accepted by ``influence``/``self_influence`` as the preconditioner ``F^-1``.
    _is_ifvp = False
    #: attributes that are caches: dropped when pickling and when moving devices.
    _transient = ()
    #: a model-mode fit communicates under torch.distributed: the ranks must
    #: first agree on what they fit (API section 9; see ``_agreement``).
    _agree_on_fit = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Every estimator of the attribkit.ifvp package is an IFVP without
        # having to say so; others inherit the flag or set it themselves.
        if "_is_ifvp" not in cls.__dict__ and cls.__module__.startswith("attribkit.ifvp."):
            cls._is_ifvp = True

    # ------------------------------------------------------------------ fit
    def fit(self, model, data=None):
        """Fit from a model and data (model mode) or from gradients (array mode).

        Parameters
        ----------
        model : torch.nn.Module, array-like of shape (n_samples, n_features) or dict
            The model, or per-example gradients.
        data : DataLoader, Dataset, tuple, mapping or iterable of batches, optional
            The examples in model mode (a batch is ``(inputs, targets)`` or a
            Hugging Face mapping, as in :func:`~attribkit.per_example_gradients`);
            ignored in array mode.

        Returns
        -------
        self
            This estimator, fitted. On an exception it is left as it was
            (still fitted, with its previous state, if it was).
        """
        config = V.check_config(self, self.config)
        self._check_params()
        if config.distributed is True and not (dist.is_available() and dist.is_initialized()):
            # distributed=True requires a process group in every mode (API section 1),
            # even where the fit itself stays local (array mode, the projectors).
            reducer(config, f"{type(self).__name__}.fit")  # raises RuntimeError
        fitted = self._blank()
        fitted._config = config
        fitted._device = config.torch_device
        if isinstance(model, torch.nn.Module):
            if self._model_mode is not True:
                raise TypeError(
                    f"{type(self).__name__} cannot fit from a model: {self._model_mode}"
                )
            # The whole fit holds the model: a second thread raises at once
            # instead of hooking it, or switching its modes, in between passes.
            # autograd_on: the passes differentiate even inside torch.inference_mode().
            with (
                use_model(model, f"{type(self).__name__}.fit"),
                autograd_on(),
                fitted._agreement(model, config),
            ):
                fitted._fit_model(model, data, config)
            if not hasattr(fitted, "param_shapes_"):  # pragma: no cover - subclass bug
                raise RuntimeError(f"{type(self).__name__}._fit_model did not set the layout.")
        else:
            if self._array_mode is not True:
                raise TypeError(
                    f"{type(self).__name__} cannot fit from an array of gradients: "
                    f"{self._array_mode} Got {type(model).__name__}; pass a torch.nn.Module "
                    "and data."
                )
            shapes, G = fit_layout(model, name="X")
            _check_feature_names(fitted, model, reset=True)
            fitted._set_layout(shapes)
            fitted._fit_array(G.to(fitted._device), config)
        fitted._init_transient()
        self._adopt(fitted)
        return self

    def _blank(self):
        """A new instance with this one's attributes less any fitted state.

        Attributes that others set on the estimator (scikit-learn's callback
        context, say) are kept; the ones a previous fit made are not.
        """
        new = object.__new__(type(self))
        previous = self.__dict__.get("_fit_keys", frozenset())
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k not in previous})
        new.__dict__["_fit_keys"] = frozenset(new.__dict__)  # what existed before fitting
        return new

    def _adopt(self, fitted) -> None:
        """Take over the state of a successful fit (all at once: fit is atomic)."""
        before = fitted.__dict__["_fit_keys"]
        fitted.__dict__["_fit_keys"] = frozenset(set(fitted.__dict__) - before) | {"_fit_keys"}
        self.__dict__.clear()
        self.__dict__.update(fitted.__dict__)

    def _set_layout(self, shapes) -> None:
        self.param_shapes_ = OrderedDict((k, tuple(int(d) for d in s)) for k, s in shapes.items())
        self.n_features_in_ = layout_size(self.param_shapes_)
        pending = self.__dict__.pop("_pending_agreement", None)
        if pending is not None:
            self._agree(*pending)

    # ------------------------------------------------------------ distributed agreement
    @contextlib.contextmanager
    def _agreement(self, model: torch.nn.Module, config: ComputeConfig):
        """Around ``_fit_model``: the ranks of a distributed fit agree on what they fit.

        For classes with ``_agree_on_fit`` whose fit is distributed (an active
        reducer), the agreement is armed here and runs in ``_set_layout``, as
        soon as the layout is known and before the estimator's first
        collective: one all-gather of 64 bytes
        (:meth:`~attribkit._compute.distributed.Reducer.agree_fit`). A rank that
        fails before it gets there (a parameter its model lacks, say) still
        takes part, flagged, so the others raise a ``ValueError`` quoting its
        error instead of waiting in a collective it never joins.
        """
        owner = f"{type(self).__name__}.fit"
        red = reducer(config, owner, device=self._device) if self._agree_on_fit else None
        if red is None or not red.active:
            yield
            return
        self.__dict__["_pending_agreement"] = (red, model, owner, config)
        try:
            yield
        except Exception as exc:
            if self.__dict__.pop("_pending_agreement", None) is not None:
                red.agree_fit(owner, error=exc)  # tells the others; this rank's error follows
            raise
        finally:
            self.__dict__.pop("_pending_agreement", None)

    def _agree(self, red, model: torch.nn.Module, owner: str, config: ComputeConfig) -> None:
        """Describe this rank's fit and check it against the others' (see ``_agreement``).

        Compared exactly: the class, ``get_params()`` (``config`` by its
        ``dtype`` only: device index, progress, memory budget and batch size
        may differ per rank without changing the fit), ``param_shapes_`` and
        the names, shapes and dtypes of the model's parameters and buffers;
        to :data:`~attribkit._compute.checksum.FINGERPRINT_RTOL`: a float64
        fingerprint of all their values (every value can change the curvature
        of the covered ones).
        """
        try:
            cls = type(self)
            fields = {"estimator": f"{cls.__module__}.{cls.__qualname__}"}
            params = self.get_params(deep=False)
            params.pop("config", None)
            fields.update((f"params.{k}", v) for k, v in params.items())
            fields["config.dtype"] = str(config.torch_dtype).removeprefix("torch.")
            fields["param_shapes_"] = {k: list(s) for k, s in self.param_shapes_.items()}
            tensors = dict(model.named_parameters())
            tensors.update((f"{k} (buffer)", b) for k, b in model.named_buffers())
            fields["model"] = {k: [list(t.shape), str(t.dtype)] for k, t in tensors.items()}
            prints = dict(zip(tensors, fingerprints(tensors.values())))
        except Exception as exc:
            red.agree_fit(owner, error=exc)
            raise
        red.agree_fit(owner, fields, prints)

    # ------------------------------------------------------------ hooks
    def _check_params(self) -> None:
        """Validate hyper-parameters; raise ``ValueError`` naming the bad one."""

    def _init_transient(self) -> None:
        """(Re)build the ``_transient`` caches' holders after fit, load and ``to``."""

    def _fit_model(self, model, data, config: ComputeConfig) -> None:  # pragma: no cover
        raise NotImplementedError

    def _fit_array(self, G: torch.Tensor, config: ComputeConfig) -> None:  # pragma: no cover
        raise NotImplementedError

    def _transform(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------ transform
    def transform(self, vectors):
        """Apply the fitted transformation to a batch of vectors.

        Parameters
        ----------
        vectors : ndarray, torch.Tensor of shape (m, n_features), or dict
            Flat vectors, or a dict ``name -> (m, *shape)`` keyed like
            ``param_shapes_``.

        Returns
        -------
        ndarray, torch.Tensor or dict
            In ``config.dtype``; numpy for numpy input, torch otherwise.
        """
        return self._apply(vectors, self._transform, same_layout=self._same_layout)

    def _apply(self, vectors, fn, *, same_layout: bool):
        """Validate and flatten ``vectors``, apply ``fn``, give the result back in kind."""
        check_is_fitted(self)
        if not isinstance(vectors, Mapping):
            _check_feature_names(self, vectors, reset=False)
        owner, dtype = type(self).__name__, self._config.torch_dtype
        shapes, device = self.param_shapes_, self._device
        inp = flatten_input(vectors, shapes, owner, device=device, dtype=dtype, check_finite=False)
        out = fn(inp.flat).to(dtype)
        # NaN and infinities in the input propagate to the result, so testing
        # the result (often much smaller) replaces testing the input; only a
        # failure looks at the input, to say which went wrong.
        if not all_finite(out):
            flatten_input(vectors, shapes, owner, device=device, dtype=torch.float64)
            raise ValueError(
                f"{owner} produced non-finite values from finite input X: the input or the "
                f"result overflows config.dtype={self._config.dtype!r}. Use a wider dtype."
            )
        return unflatten_output(out, inp.kind, shapes if same_layout else None)

    # ------------------------------------------------------------ consuming gradients
    def project_gradients(self, model, data, *, loss="cross_entropy", params=None, config=None):
        """Apply ``transform`` to the per-example gradients of ``model`` on ``data``, lazily.

        This is how a fitted estimator consumes gradients when it is the
        ``projector`` of :func:`attribkit.per_example_gradients`: the rows
        come batch by batch, so only one batch of gradients is ever held.
        The default differentiates (:func:`attribkit.per_example_gradients`'
        way: layer hooks, ``torch.func`` for the rest) the parameters the
        estimator's layout names (those of
        ``param_shapes_`` when it was fitted on the model, else ``params``,
        whose gradients must have ``n_features_in_`` entries), concatenates
        them in the layout's order and passes each batch through
        ``transform``. Estimators that can do better override it:
        :class:`~attribkit.KroneckerProjector` projects from layer hooks
        without forming the gradients.

        Parameters
        ----------
        model : torch.nn.Module
            The model the gradients are taken of (checked against the
            fitted layout before anything runs).
        data : DataLoader, Dataset, tuple (inputs, targets), mapping or iterable of batches
            The examples.
        loss : {"cross_entropy", "mse", "causal_lm"} or callable, default="cross_entropy"
            The per-example loss, as in :func:`~attribkit.per_example_gradients`.
        params : list of str, optional
            Parameters to differentiate; must name the fitted ones (any
            order) when the estimator was fitted on the model.
        config : ComputeConfig, optional
            ``batch_size``, progress and ``distributed`` of the gradient
            pass; default the estimator's own.

        Returns
        -------
        batches : iterator of torch.Tensor
            ``(b, k)`` rows per batch of ``data``, in ``config.dtype`` of the
            estimator, computed as the iterator is consumed.
        k : int
            The width of every batch of rows.

        Examples
        --------
        >>> import torch, attribkit as ak
        >>> model = torch.nn.Linear(3, 2)
        >>> proj = ak.RandomProjector(proj_dim=4).fit(model)
        >>> X, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
        >>> batches, k = proj.project_gradients(model, (X, y))
        >>> k, [tuple(b.shape) for b in batches]
        (4, [(5, 4)])
        """
        check_is_fitted(self)
        config = V.check_config(self, self._config if config is None else config)
        names, _ = layout_params(model, self, params)
        k = int(self._n_features_out)

        def batches():
            for grads in iter_gradients(model, data, loss=loss, params=names, config=config):
                # In the layout's order (a dict-fitted one may differ from model order).
                yield self.transform(flatten_dict(grads, names or grads))

        return batches(), k

    # ------------------------------------------------------------ feature names
    @property
    def _n_features_out(self) -> int:
        """Number of output columns of ``transform`` (fitted estimators only).

        The input's for ``_same_layout`` estimators; else ``proj_dim_`` when
        the estimator has it (every projector of attribkit); else measured on
        one zero vector.
        """
        if self._same_layout:
            return self.n_features_in_
        if hasattr(self, "proj_dim_"):
            return int(self.proj_dim_)
        zero = torch.zeros(1, self.n_features_in_, dtype=self._config.torch_dtype)
        return int(self._transform(zero.to(self._device)).shape[1])

    def _layout_feature_names(self) -> list[str]:
        """``name[i]`` for the flat entries of each parameter (``name`` if scalar)."""
        names = []
        for key, shape in self.param_shapes_.items():
            size = math.prod(shape)
            names.extend([key] if shape == () else [f"{key}[{i}]" for i in range(size)])
        return names

    def get_feature_names_out(self, input_features=None):
        """Get the names of the output features (scikit-learn's transformer API).

        Parameters
        ----------
        input_features : array-like of str, optional
            Names of the input features. Default: ``feature_names_in_`` when
            ``fit`` saw a DataFrame; else ``x0, x1, ...`` for a plain array,
            or ``name[i]`` (the flat index ``i`` within parameter ``name``)
            for a model's or a dict's layout.

        Returns
        -------
        ndarray of str objects
            Estimators whose output has the input's layout (IFVPs) return the
            input names; projectors return ``<classname>0``, ``<classname>1``,
            ... (the lowercased class name and an index) for their
            ``n_features_out`` columns.
        """
        check_is_fitted(self, "n_features_in_")
        if self._same_layout:
            plain = list(self.param_shapes_) == [ARRAY_KEY]
            if input_features is None and not plain and not hasattr(self, "feature_names_in_"):
                return np.asarray(self._layout_feature_names(), dtype=object)
            return _check_feature_names_in(self, input_features)
        _check_feature_names_in(self, input_features, generate_names=False)
        prefix = type(self).__name__.lower()
        return np.asarray([f"{prefix}{i}" for i in range(self._n_features_out)], dtype=object)

    # ------------------------------------------------------------ devices & pickling
    def to(self, device):
        """Move the fitted state to another device.

        Parameters
        ----------
        device : str or torch.device
            ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when
            available). A device torch cannot see raises ``ValueError``.

        Returns
        -------
        self
            This estimator, its fitted tensors on ``device``. ``config`` is
            unchanged: an estimator pickled and loaded again goes back to
            ``config.device`` when that is available. Unfitted, nothing moves.
        """
        if isinstance(device, str) and device == "auto":
            target = ComputeConfig("auto").torch_device
        else:
            try:
                target = torch.device(device) if isinstance(device, (str, torch.device)) else None
            except RuntimeError:
                target = None
            if target is None:
                raise ValueError(
                    f"The 'device' argument of {type(self).__name__}.to must be 'cpu', "
                    f"'cuda', 'cuda:N', 'auto' or a torch.device. Got {device!r} instead."
                )
        check_device_available(target)
        if hasattr(self, "_device"):
            self._move(target)
        return self

    def _move(self, device: torch.device) -> None:
        params = set(self._get_param_names())
        for key in list(self.__dict__):
            if key in params or key.startswith("__"):
                continue
            self.__dict__[key] = _map_tensors(self.__dict__[key], lambda t: t.to(device))
        for key in self._transient:
            self.__dict__.pop(key, None)
        self._device = device
        self._init_transient()

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        for key in self._transient:
            state.pop(key, None)
        if "_device" in state:
            state = {k: _map_tensors(v, lambda t: t.detach().cpu()) for k, v in state.items()}
            state["_device"] = torch.device("cpu")
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        config = self.__dict__.get("_config")
        if config is None:
            return
        target = torch.device("cpu")
        try:
            target = check_device_available(config.torch_device)
        except ValueError:
            pass  # no such device here: the state stays on the CPU
        if target.type != "cpu":
            self._move(target)
        else:
            self._init_transient()

    # ------------------------------------------------------------ ak.save / ak.load
    def _persist_state(self) -> dict:
        """The attributes :func:`attribkit.save` writes: by default what pickle stores.

        That is ``__getstate__()``: every attribute but the ``_transient``
        caches, tensors detached on the CPU. Every value must be plain data
        (see :mod:`attribkit.persistence`); ``save`` raises ``TypeError``
        naming an attribute that is not. An estimator holding more (a model or
        data by reference) overrides this to return what a file can keep,
        overrides :meth:`_restore_state` to match, and says in its docstring
        what a saved file keeps.
        """
        return self.__getstate__()

    def _restore_state(self, state: dict) -> None:
        """Set a state :func:`attribkit.load` read, on an instance made without ``__init__``.

        By default as unpickling does (``__setstate__``): transient caches are
        rebuilt and the state goes to ``config.device`` when that is available.
        """
        self.__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        try:
            dtype = V.check_config(self, self.config).dtype
        except ValueError:
            dtype = "float32"
        tags.transformer_tags.preserves_dtype = [dtype] if dtype in ("float32", "float64") else []
        return tags

"""Losses, target sampling for the true Fisher, and per-example gradients.

Per-example gradients use ``torch.func``: ``functional_call`` of the model
with the selected parameters swapped in, ``grad`` of the per-example loss and
``vmap`` over the batch, so one batch costs one vectorised backward pass.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from . import _validation as V
from ._data import EMPTY_DATA_MESSAGE, EmptyDataError, batch_len, iter_batches
from .config import ComputeConfig

__all__ = ["per_example_gradients"]


# --------------------------------------------------------------------------- losses
def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # torch.nn.CrossEntropyLoss convention: outputs (N, C, d1, ...), targets
    # (N, d1, ...) class indices or (N, C, d1, ...) probabilities.
    losses = F.cross_entropy(outputs, targets, reduction="none")
    if losses.ndim == 1:
        return losses
    if not targets.is_floating_point():
        # Tokens at ignore_index (-100) are left out of their example's mean.
        keep = (targets != -100).to(losses.dtype)
        return (losses * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1)
    return losses.flatten(1).mean(1)


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.shape != outputs.shape and targets.numel() == outputs.numel():
        targets = targets.reshape(outputs.shape)
    targets = targets.to(outputs.dtype)
    return F.mse_loss(outputs, targets, reduction="none").reshape(outputs.shape[0], -1).mean(1)


BUILTIN_LOSSES = {"cross_entropy": _cross_entropy, "mse": _mse}


def resolve_loss(loss, owner="per_example_gradients") -> Callable:
    """The per-example loss ``(outputs, targets) -> (N,)`` for ``loss``.

    The built-ins are per-example versions of ``torch.nn.CrossEntropyLoss``
    and ``torch.nn.MSELoss`` (MSE averages over output dimensions), so their
    batch mean equals the torch loss.
    """
    V.check_loss(owner, loss)
    if callable(loss):
        return loss
    return BUILTIN_LOSSES[loss]


def sample_targets(outputs: torch.Tensor, loss) -> torch.Tensor:
    """Targets drawn from the model's predictive distribution (``fisher="true"``).

    Cross-entropy: classes drawn from ``softmax(outputs)`` over dim 1.
    MSE: ``outputs + sqrt(D / 2) * N(0, I)`` with ``D`` output dimensions per
    example: the Gaussian whose negative log-likelihood is the per-example MSE
    up to a constant, so that the expected outer product of gradients equals
    the Gauss-Newton matrix of the loss. Uses torch's global generator
    (``torch.manual_seed`` makes it reproducible).
    """
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(
            "The 'fisher' parameter 'true' needs targets sampled from the model, which is "
            "supported for loss='cross_entropy' and loss='mse' only. Got a custom loss "
            f"{loss!r}; use fisher='empirical'."
        )
    outputs = outputs.detach()
    if loss == "cross_entropy":
        probs = torch.softmax(outputs.movedim(1, -1).double(), dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        draws = torch.multinomial(flat, 1).reshape(probs.shape[:-1])
        return draws
    dim = math.prod(outputs.shape[1:])
    return outputs + math.sqrt(dim / 2.0) * torch.randn_like(outputs)


def expected_targets(outputs: torch.Tensor, loss) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and weights that enumerate the model's predictive distribution.

    The exact expected Fisher (``fisher="expected"``) of a built-in loss is
    ``sum_k w_k g_k g_k^T`` per example, where ``g_k`` is the gradient of the
    loss at target ``targets[k]``; it equals the Gauss-Newton matrix
    ``J^T H_f J`` (``H_f`` the Hessian of the loss in the outputs).

    * Cross-entropy, outputs ``(N, C)``: ``K = C`` targets, ``targets[c]`` is
      class ``c`` for every example and ``weights[c] = softmax(outputs)[:, c]``
      (``sum_c p_c (p - e_c)(p - e_c)^T = diag(p) - p p^T``).
    * MSE, outputs ``(N, *shape)`` with ``D`` entries per example: ``K = D``
      targets ``outputs - sqrt(D / 2) e_k`` with weight 1, since the gradient
      in the outputs is ``(2 / D)(f - y)`` and ``sum_k (2/D)^2 (D/2) e_k e_k^T
      = (2 / D) I`` is the Hessian of the per-example MSE.

    Returns
    -------
    targets : torch.Tensor of shape (K, N, ...)
        Detached; class indices (int64) for cross-entropy, outputs' dtype for MSE.
    weights : torch.Tensor of shape (K, N)
        In the outputs' dtype; each example's weights sum to 1 (cross-entropy)
        or are all 1 (MSE).

    Raises ``ValueError`` for a custom loss and for cross-entropy outputs with
    extra dimensions (sequences), whose exact expectation needs one gradient
    per token and class.
    """
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(
            "The 'fisher' parameter 'expected' takes the exact expectation over the model's "
            "predictive distribution, which is supported for loss='cross_entropy' and "
            f"loss='mse' only. Got a custom loss {loss!r}; use fisher='empirical'."
        )
    outputs = outputs.detach()
    n = outputs.shape[0]
    if loss == "cross_entropy":
        if outputs.ndim != 2:
            raise ValueError(
                "The 'fisher' parameter 'expected' with loss='cross_entropy' needs model "
                f"outputs of shape (batch, classes). Got {tuple(outputs.shape)}: for sequence "
                "outputs the exact expectation needs one gradient per token and class; use "
                "fisher='true' (sampled targets) or 'empirical'."
            )
        classes = outputs.shape[1]
        weights = torch.softmax(outputs.double(), dim=1).T.to(outputs.dtype)
        targets = torch.arange(classes, device=outputs.device).unsqueeze(1).expand(classes, n)
        return targets.contiguous(), weights.contiguous()
    dim = math.prod(outputs.shape[1:])
    eye = torch.eye(dim, dtype=outputs.dtype, device=outputs.device)
    eye = eye.reshape(dim, 1, *outputs.shape[1:])
    targets = outputs.unsqueeze(0) - math.sqrt(dim / 2.0) * eye
    weights = torch.ones(dim, n, dtype=outputs.dtype, device=outputs.device)
    return targets, weights


# --------------------------------------------------------------------------- params
def select_params(model: torch.nn.Module, params, owner) -> OrderedDict:
    """Ordered ``name -> parameter`` of the parameters to differentiate."""
    named = OrderedDict(model.named_parameters())
    if params is None:
        chosen = OrderedDict((n, p) for n, p in named.items() if p.requires_grad)
        if not chosen:
            raise ValueError(f"The model given to {V._owner(owner)} has no trainable parameter.")
        return chosen
    V.check_params(owner, params)
    unknown = [n for n in params if n not in named]
    if unknown:
        raise ValueError(
            f"The 'params' parameter of {V._owner(owner)} names parameters the model does "
            f"not have: {unknown}. Available: {list(named)}."
        )
    if len(set(params)) != len(params):
        raise ValueError(
            f"The 'params' parameter of {V._owner(owner)} lists a parameter twice: {params}."
        )
    # Model order, whatever order the user listed them in.
    wanted = set(params)
    return OrderedDict((n, p) for n, p in named.items() if n in wanted)


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _call(model, state, inputs):
    if isinstance(inputs, dict):
        return functional_call(model, state, args=(), kwargs=inputs)
    if isinstance(inputs, tuple):
        return functional_call(model, state, inputs)
    return functional_call(model, state, (inputs,))


class _EvalMode:
    """Evaluate in eval mode (no dropout, running batch-norm stats), then restore.

    Each submodule gets its own ``training`` flag back, so a model whose
    parts were in different modes (a frozen, eval-mode backbone under a
    training head) is left exactly as it was.
    """

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for module, training in self.modes:
            module.training = training


def model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (or buffer), if any."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def iter_gradients(
    model: torch.nn.Module,
    data,
    *,
    loss="cross_entropy",
    params=None,
    fisher: str = "empirical",
    config: ComputeConfig,
    owner="per_example_gradients",
    desc: str = "gradients",
) -> Iterator[OrderedDict]:
    """Yield per-example gradients batch by batch: ``name -> (b, *shape)``.

    Gradients are detached, on the model's device and in its dtype. The model
    is evaluated in eval mode (dropout off, batch-norm running statistics) and
    its mode is restored afterwards. Floating-point inputs and targets are cast
    to the dtype of the model's parameters (integer ones, such as class labels
    or token ids, are left alone).

    Every batch is checked for non-finite gradients (one sum per batch; the
    per-element diagnosis runs only when that sum is not finite): a NaN or Inf
    gradient raises ``ValueError`` naming the batch, the example and its likely
    cause. A model call that fails on the first batch is re-raised as a
    ``ValueError`` giving the batch's shapes.

    ``fisher="expected"`` (built-in losses only) yields instead
    ``name -> (K, b, *shape)``: the weighted pseudo-gradients
    ``sqrt(w_k) g_k`` of :func:`expected_targets`, whose outer products summed
    over ``k`` are each example's exact expected Fisher (its Gauss-Newton
    matrix). That costs ``K`` vectorised backward passes per batch (``K = C``
    classes for cross-entropy, ``D`` output entries for MSE) and holds ``K``
    times one batch of gradients.
    """
    loss_fn = resolve_loss(loss, owner)
    V.check_fisher(owner, fisher)
    if fisher == "true" and callable(loss):
        sample_targets(None, loss)  # raises the explanatory error
    if fisher == "expected" and callable(loss):
        expected_targets(None, loss)  # raises the explanatory error
    selected = select_params(model, params, owner)
    names = list(selected)
    sel = {n: p.detach() for n, p in selected.items()}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in sel}
    frozen.update(dict(model.named_buffers()))
    device = model_device(model)
    dtype = model_dtype(model)

    def one_loss(sel_params, x, t):
        x1 = torch.utils._pytree.tree_map(lambda a: a.unsqueeze(0), x)
        out = _call(model, {**frozen, **sel_params}, x1)
        value = loss_fn(out, t.unsqueeze(0))
        return value.reshape(())

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))
    checked = False
    batch, offset = 0, 0
    batches = iter_batches(data, config, device=device, dtype=dtype, desc=desc)
    with _EvalMode(model):
        for inputs, targets in batches:
            if fisher != "empirical" or not checked:
                with torch.no_grad():
                    if checked:
                        outputs = _call(model, {**frozen, **sel}, inputs)
                    else:
                        outputs = _first_call(model, {**frozen, **sel}, inputs, targets, owner)
                if not checked:
                    _check_loss_output(loss_fn, outputs, targets, owner)
                    checked = True
                if fisher == "true":
                    targets = sample_targets(outputs, loss)
            if fisher == "expected":
                yield _expected_gradients(
                    per_example,
                    sel,
                    names,
                    inputs,
                    outputs,
                    loss,
                    batch,
                    offset,
                    owner,
                    lambda x, t: loss_fn(_call(model, {**frozen, **sel}, x), t),
                )
                batch += 1
                offset += batch_len(inputs)
                continue
            grads = per_example(sel, inputs, targets)
            out = OrderedDict((n, grads[n].detach()) for n in names)
            _check_finite_gradients(
                out,
                inputs,
                targets,
                batch,
                offset,
                owner,
                lambda x, t: loss_fn(_call(model, {**frozen, **sel}, x), t),
            )
            yield out
            batch += 1
            offset += batch_len(inputs)


def _expected_gradients(
    per_example, sel, names, inputs, outputs, loss, batch, offset, owner, loss_of
) -> OrderedDict:
    """``name -> (K, b, *shape)`` pseudo-gradients ``sqrt(w_k) g_k`` of one batch."""
    all_targets, weights = expected_targets(outputs, loss)
    rows: dict[str, list] = {n: [] for n in names}
    for k in range(all_targets.shape[0]):
        grads = per_example(sel, inputs, all_targets[k])
        grads = OrderedDict((n, grads[n].detach()) for n in names)
        _check_finite_gradients(grads, inputs, all_targets[k], batch, offset, owner, loss_of)
        root = weights[k].clamp_min(0).sqrt()
        for n in names:
            g = grads[n]
            rows[n].append(g * root.to(g.dtype).reshape(-1, *([1] * (g.ndim - 1))))
    return OrderedDict((n, torch.stack(rows[n])) for n in names)


def _shapes(x):
    """Shapes of a batch's tensors, for error messages."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, dict):
        return {k: _shapes(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(_shapes(v) for v in x)
    return type(x).__name__


def _first_call(model, state, inputs, targets, owner):
    """The model's outputs on the first batch; a failure is re-raised with its shapes."""
    try:
        return _call(model, state, inputs)
    except Exception as exc:
        raise ValueError(
            f"The model given to {V._owner(owner)} failed on the first batch of 'data' "
            f"(inputs of shape {_shapes(inputs)}, targets of shape {_shapes(targets)}) with "
            f"{type(exc).__name__}: {exc}\nEach batch must be a pair (inputs, targets) whose "
            "first dimension is the batch, and inputs are passed to the model as "
            "model(inputs) (a tuple as positional, a dict as keyword arguments). A list of "
            "single examples wants a DataLoader: "
            "torch.utils.data.DataLoader(list_of_pairs, batch_size=...), or a tuple "
            "(X, y) of stacked arrays."
        ) from exc


def _example(x, j):
    if isinstance(x, torch.Tensor):
        return x[j : j + 1]
    if isinstance(x, dict):
        return {k: _example(v, j) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(_example(v, j) for v in x)
    return x


def _all_finite(x) -> bool:
    if isinstance(x, torch.Tensor):
        return not x.is_floating_point() or bool(torch.isfinite(x).all())
    if isinstance(x, dict):
        return all(_all_finite(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return all(_all_finite(v) for v in x)
    return True


def _check_finite_gradients(grads, inputs, targets, batch, offset, owner, loss_of):
    """Raise ``ValueError`` naming the first example with a NaN/Inf gradient.

    One scalar sum per batch is the cheap test (NaN and Inf propagate through
    it); only when it is not finite are the gradients checked entry by entry,
    so a sum that merely overflows raises nothing.
    """
    total = torch.stack([g.sum() for g in grads.values()]).sum()
    if bool(torch.isfinite(total)):
        return
    bad = None
    for g in grads.values():
        rows = ~torch.isfinite(g.reshape(g.shape[0], -1)).all(1)
        bad = rows if bad is None else bad | rows
    if not bool(bad.any()):
        return
    j = int(bad.nonzero()[0, 0])
    where = [n for n, g in grads.items() if not bool(torch.isfinite(g[j]).all())]
    x_j, t_j = _example(inputs, j), _example(targets, j)
    if not _all_finite(x_j):
        cause = (
            "The inputs of that example contain NaN or infinity: check the data (missing "
            "values, a division by zero in preprocessing)."
        )
    elif not _all_finite(t_j):
        cause = "The targets of that example contain NaN or infinity: check the targets."
    else:
        try:
            with torch.no_grad():
                value = loss_of(x_j, t_j)
            value = float(value.reshape(-1)[0])
        except Exception:  # the diagnosis must not hide the real error
            value = None
        if value is not None and not math.isfinite(value):
            cause = (
                f"Its inputs and targets are finite but its loss is {value}: check the model "
                "(overflowing activations, a float16 model; try float64) and the loss (log of "
                "0, division by 0, targets out of range)."
            )
        else:
            cause = (
                f"Its inputs, targets and loss ({value}) are finite: check the loss and the "
                "model for operations whose derivative is infinite there (sqrt or norm at 0, "
                "log near 0)."
            )
    raise ValueError(
        f"{V._owner(owner)} got a per-example gradient containing NaN or infinity in batch "
        f"{batch} at example {j} of that batch (example {offset + j} of the data), for "
        f"parameters {where}. {cause}"
    )


def _check_loss_output(loss_fn, outputs, targets, owner):
    try:
        losses = loss_fn(outputs, targets)
    except Exception as exc:  # pragma: no cover - message depends on torch
        raise ValueError(
            f"The 'loss' of {V._owner(owner)} failed on model outputs of shape "
            f"{tuple(outputs.shape)} and targets of shape {tuple(targets.shape)}: {exc}"
        ) from exc
    if not isinstance(losses, torch.Tensor) or losses.shape != (outputs.shape[0],):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
        raise ValueError(
            f"The 'loss' of {V._owner(owner)} must return per-example losses of shape "
            f"(batch,) = ({outputs.shape[0]},). Got {shape} instead (a reduced loss?)."
        )


def param_shapes(selected: OrderedDict) -> OrderedDict:
    return OrderedDict((n, tuple(p.shape)) for n, p in selected.items())


def _known_length(data) -> int | None:
    """Number of examples ``data`` will yield, when it can be told without iterating."""
    from torch.utils.data import DataLoader, Dataset

    from ._data import _as_tensor, _is_pair_of_arrays, batch_len

    try:
        if _is_pair_of_arrays(data):
            return int(batch_len(_as_tensor(data[0])))
        if isinstance(data, DataLoader):
            if data.batch_size is None:  # a custom batch_sampler: sizes unknown
                return None
            size = len(data.sampler)
            return size - size % data.batch_size if data.drop_last else size
        if isinstance(data, Dataset):
            return len(data)
    except TypeError:  # no __len__ (an IterableDataset, say)
        return None
    return None


def _n_outputs(projector, n_features: int) -> int:
    """Width ``k`` of the projector's output, preferably without running it."""
    from .projection import RandomProjector

    if isinstance(projector, RandomProjector):  # known without generating its matrix
        return int(projector.proj_dim)
    k = getattr(projector, "_n_features_out", None)  # attribkit's and scikit-learn's
    if k is None:  # any other transformer: one zero row tells
        probe = projector.transform(np.zeros((1, n_features)))
        k = np.asarray(probe).shape[1]
    return int(k)


def _projector_params(model, projector, params) -> tuple[list | None, int]:
    """Parameters to differentiate for ``projector`` and the feature count it expects.

    A projector fitted on a model names its parameters in ``param_shapes_``:
    they are differentiated (``params`` may repeat them, in any order). One
    fitted on arrays (or any other transformer) takes the flat gradients of
    ``params`` (default: all trainable), whose count must be its
    ``n_features_in_``.
    """
    from sklearn.utils.validation import check_is_fitted

    if not hasattr(projector, "transform"):
        raise TypeError(
            "The 'projector' argument of per_example_gradients must be a fitted transformer "
            f"(RandomProjector, KroneckerProjector, ...). Got {type(projector).__name__} instead."
        )
    check_is_fitted(projector)
    named = dict(model.named_parameters())
    shapes = getattr(projector, "param_shapes_", None)
    if shapes and all(k in named for k in shapes):
        wrong = {k: (tuple(s), tuple(named[k].shape)) for k, s in shapes.items()}
        wrong = {k: v for k, v in wrong.items() if v[0] != v[1]}
        if wrong:
            raise ValueError(
                f"The 'projector' of per_example_gradients was fitted on parameters of other "
                f"shapes than the model's: {wrong} (fitted, model)."
            )
        if params is not None and set(params) != set(shapes):
            raise ValueError(
                "The 'params' argument of per_example_gradients must name the parameters "
                f"the projector was fitted on ({list(shapes)}) or be None. Got {params!r}."
            )
        return list(shapes), int(sum(math.prod(s) for s in shapes.values()))
    n_in = getattr(projector, "n_features_in_", None)
    selected = select_params(model, params, "per_example_gradients")
    p = int(sum(q.numel() for q in selected.values()))
    if n_in is not None and int(n_in) != p:
        raise ValueError(
            f"The 'projector' of per_example_gradients expects {n_in} features, but the "
            f"gradients of the selected parameters have {p}. Fit the projector on the model "
            "or choose matching 'params'."
        )
    return (None if params is None else list(params)), p


_NUMPY_DTYPES = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
}


class _Rows:
    """The ``(n, k)`` result: filled batch by batch into ``out``, or collected."""

    def __init__(self, out, n: int | None, k: int, config: ComputeConfig):
        self.out, self.n, self.k, self.filled = out, n, k, 0
        self.dtype, self.device = config.torch_dtype, config.torch_device
        self.chunks: list[torch.Tensor] = []
        if out is not None:
            self._check()

    def _check(self) -> None:
        out, name = self.out, "The 'out' argument of per_example_gradients"
        if isinstance(out, np.ndarray):
            want = _NUMPY_DTYPES.get(self.dtype)
            if want is None:
                raise ValueError(
                    f"{name} cannot be a numpy array under config.dtype={self.dtype}: numpy "
                    "has no such dtype. Pass a torch tensor or use another config.dtype."
                )
            if out.dtype != want:
                raise ValueError(
                    f"{name} must have dtype {np.dtype(want).name} (config.dtype). Got "
                    f"{out.dtype.name} instead; pass config=ComputeConfig(dtype=...) to match."
                )
            if not out.flags.writeable:
                raise ValueError(f"{name} must be writeable (a memmap opened with mode 'r'?).")
        elif isinstance(out, torch.Tensor):
            if out.dtype != self.dtype:
                raise ValueError(
                    f"{name} must have dtype {self.dtype} (config.dtype). Got {out.dtype} "
                    "instead; pass config=ComputeConfig(dtype=...) to match."
                )
            if out.requires_grad:
                raise ValueError(f"{name} must not require grad.")
        else:
            raise TypeError(
                f"{name} must be a numpy array (np.memmap included) or a torch tensor. "
                f"Got {type(out).__name__} instead."
            )
        shape = tuple(out.shape)
        expected = f"({'n' if self.n is None else self.n}, {self.k})"
        if len(shape) != 2 or shape[1] != self.k or (self.n is not None and shape[0] != self.n):
            raise ValueError(f"{name} must have shape {expected}. Got {shape} instead.")

    def add(self, rows: torch.Tensor) -> None:
        b = rows.shape[0]
        if self.out is None:
            self.chunks.append(rows.to(device=self.device, dtype=self.dtype))
        else:
            stop = self.filled + b
            if stop > self.out.shape[0]:
                raise ValueError(
                    f"The 'out' argument of per_example_gradients has {self.out.shape[0]} rows "
                    f"but 'data' yields more examples (at least {stop})."
                )
            rows = rows.detach().to(dtype=self.dtype)
            if isinstance(self.out, np.ndarray):
                self.out[self.filled : stop] = rows.cpu().numpy()
            else:
                self.out[self.filled : stop].copy_(rows)
        self.filled += b

    def result(self):
        if self.out is None:
            return torch.cat(self.chunks)
        if self.filled != self.out.shape[0]:
            raise ValueError(
                f"The 'out' argument of per_example_gradients has {self.out.shape[0]} rows "
                f"but 'data' yielded {self.filled} examples (rows {self.filled}: are unset)."
            )
        if isinstance(self.out, np.memmap):
            self.out.flush()
        return self.out


def per_example_gradients(
    model: torch.nn.Module,
    data,
    loss="cross_entropy",
    params=None,
    config: ComputeConfig | None = None,
    flatten: bool = True,
    projector=None,
    out=None,
):
    """Per-example gradients of the loss with respect to the model's parameters.

    Parameters
    ----------
    model : torch.nn.Module
        The model; evaluated in eval mode (mode restored afterwards).
    data : DataLoader, Dataset, tuple (inputs, targets) or iterable of batches
        The examples, streamed in ``config.batch_size`` batches when given as
        a tuple or Dataset.
    loss : "cross_entropy", "mse" or callable, default="cross_entropy"
        Per-example loss; a callable takes ``(outputs, targets)`` and returns
        losses of shape ``(batch,)``.
    params : list of str, optional
        Names of the parameters to differentiate (default: all trainable, or
        the parameters a model-fitted ``projector`` was fitted on).
    config : ComputeConfig, optional
        ``dtype`` and ``device`` of the result; ``batch_size``; ``progress``.
        Default: the projector's config when ``projector`` is an attribkit
        estimator, else ``ComputeConfig()``.
    flatten : bool, default=True
        Return one ``(n, p)`` tensor (parameters flattened and concatenated
        in model order) instead of a dict ``name -> (n, *shape)``. Must be
        True with ``projector`` or ``out``.
    projector : fitted transformer, optional
        Each batch of gradients is projected before it is kept, so memory is
        one batch of gradients plus the ``(n, k)`` result. A
        :class:`~attribkit.RandomProjector` or other transformer fitted on
        the model differentiates the parameters it was fitted on; one fitted
        on arrays (or any fitted scikit-learn transformer) takes the flat
        gradients of ``params``, which must have its ``n_features_in_``
        entries. A :class:`~attribkit.KroneckerProjector` never forms
        per-example gradients: hooks capture each covered layer's inputs and
        output gradients and only their projections are multiplied.
    out : ndarray, np.memmap or torch.Tensor of shape (n, k), optional
        Preallocated result (``k = p`` without a projector) in
        ``config.dtype``, filled batch by batch and returned: for results
        larger than memory, e.g. ``np.lib.format.open_memmap(path, mode="w+",
        dtype="float32", shape=(n, k))``. Its type, ``ndim``, ``k``, dtype and
        (when ``data`` has a length: a tuple, a Dataset, a DataLoader with a
        sized sampler) ``n`` are checked before any work. For data of unknown
        length, a batch that would overflow ``out`` raises at once and too few
        examples raise at the end (the rows written stay written). A memmap
        is flushed before it is returned.

    Returns
    -------
    torch.Tensor, dict, or ``out``
        ``(n, p)`` tensor, a dict of ``(n, *shape)`` tensors, ``(n, k)``
        projections, or ``out`` itself, filled.

    Notes
    -----
    **Distributed.** This function never communicates. Under
    ``torch.distributed`` each rank passes its own shard of the data and
    computes (or writes into ``out``) its own rows only; with
    ``config.distributed`` on (the default ``"auto"``) a rank whose shard is
    empty and of known length (a tuple of tensors, a Dataset, a DataLoader,
    an empty list of batches) gets ``0`` rows instead of the empty-data
    error. To fill one file from every rank, give each rank its row slice of
    a shared memmap (a slice of an ``np.memmap`` is one)::

        import numpy as np, torch.distributed as dist
        rank, world = dist.get_rank(), dist.get_world_size()
        sizes = [None] * world
        dist.all_gather_object(sizes, len(shard))      # examples per rank
        start, n = sum(sizes[:rank]), sum(sizes)
        if rank == 0:                                  # one (n, k) file for all
            np.lib.format.open_memmap(path, mode="w+", dtype="float32", shape=(n, k))
        dist.barrier()
        big = np.load(path, mmap_mode="r+")
        ak.per_example_gradients(model, shard, projector=proj,
                                 out=big[start : start + sizes[rank]])
        dist.barrier()                                 # now every row is written

    or gather the rows in memory (ranks may hold different numbers of rows,
    so pad to the largest)::

        G = ak.per_example_gradients(model, shard, projector=proj)
        rows = max(sizes)
        padded = G.new_zeros(rows, G.shape[1]); padded[: len(G)] = G
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        G_all = torch.cat([p[:m] for p, m in zip(parts, sizes)])  # rank order

    Examples
    --------
    >>> import torch, attribkit as ak
    >>> model = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> ak.per_example_gradients(model, (X, y)).shape
    torch.Size([5, 8])
    >>> proj = ak.RandomProjector(proj_dim=4).fit(model)
    >>> ak.per_example_gradients(model, (X, y), projector=proj).shape
    torch.Size([5, 4])
    """
    if config is None and projector is not None:
        config = getattr(projector, "_config", None)
    config = V.check_config("per_example_gradients", config)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            "The 'model' argument of per_example_gradients must be a torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    device, dtype = config.torch_device, config.torch_dtype
    if _known_length(data) == 0 or (isinstance(data, (list, tuple)) and len(data) == 0):
        from ._distributed import reducer

        if reducer(config, "per_example_gradients").active:  # an empty shard: 0 rows
            return _no_rows(model, data, params, config, flatten, projector, out)
    if projector is None and out is None:
        chunks: dict[str, list] = {}
        for grads in iter_gradients(model, data, loss=loss, params=params, config=config):
            for n, g in grads.items():
                chunks.setdefault(n, []).append(g.to(device=device, dtype=dtype))
        result = OrderedDict((n, torch.cat(c)) for n, c in chunks.items())
        if flatten:
            return torch.cat([g.reshape(g.shape[0], -1) for g in result.values()], dim=1)
        return result
    _require_flat(flatten)
    if projector is None:
        p = sum(q.numel() for q in select_params(model, params, "per_example_gradients").values())
        rows = _Rows(out, _known_length(data), p, config)
        for grads in iter_gradients(model, data, loss=loss, params=params, config=config):
            rows.add(torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1))
        return rows.result()
    if hasattr(projector, "_iter_projected"):
        # Projectors that never form per-example gradients (KroneckerProjector).
        batches, k = projector._iter_projected(
            model, data, loss=loss, params=params, config=config
        )
        rows = _Rows(out, _known_length(data), k, config)
        for projected in batches:
            rows.add(projected)
        return rows.result()
    names, p = _projector_params(model, projector, params)
    k = _n_outputs(projector, p)
    rows = _Rows(out, _known_length(data), k, config)
    from .base import BaseEstimator

    ours = isinstance(projector, BaseEstimator)
    for grads in iter_gradients(model, data, loss=loss, params=names, config=config):
        # In the projector's layout order (a dict-fitted one may differ from model order).
        order = names or list(grads)
        flat = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in order], dim=1)
        if ours:
            projected = projector.transform(flat)
        else:  # a scikit-learn transformer: numpy in, numpy out
            projected = torch.as_tensor(np.asarray(projector.transform(flat.cpu().numpy())))
        rows.add(projected)
    return rows.result()


def _require_flat(flatten: bool) -> None:
    if not flatten:
        raise ValueError(
            "The 'flatten' argument of per_example_gradients must be True when 'projector' or "
            "'out' is given (the result is one (n, k) array). Got False."
        )


def _no_rows(model, data, params, config, flatten, projector, out):
    """The result for a rank whose shard is empty (``per_example_gradients``)."""
    device, dtype = config.torch_device, config.torch_dtype
    if projector is None and out is None:
        selected = select_params(model, params, "per_example_gradients")
        result = OrderedDict(
            (n, torch.zeros(0, *q.shape, device=device, dtype=dtype)) for n, q in selected.items()
        )
        if flatten:
            return torch.cat([g.reshape(0, math.prod(g.shape[1:])) for g in result.values()], 1)
        return result
    _require_flat(flatten)
    if projector is None:
        k = sum(q.numel() for q in select_params(model, params, "per_example_gradients").values())
    elif hasattr(projector, "_iter_projected"):
        k = int(projector.proj_dim_)
    else:
        k = _n_outputs(projector, _projector_params(model, projector, params)[1])
    rows = _Rows(out, 0, k, config)
    return rows.out if out is not None else torch.zeros(0, k, device=device, dtype=dtype)


# --------------------------------------------------------------------------- HVPs
HVP_MODES = ("rev-fwd", "rev-rev")


class MeanLossHVP:
    """Curvature-vector products ``v -> (H + damping I) v`` of the mean loss over ``data``.

    ``H`` is the Hessian, in the selected parameters, of the mean loss
    ``(1/n) sum_i loss_i`` over all ``n`` examples ``data`` yields. A call
    takes one flat vector ``(p,)`` or a block of ``k`` of them ``(k, p)``
    (products ``(k, p)``, one per row, vectorised over the rows with
    ``torch.func.vmap`` in chunks of at most ``max_rows``). Each call
    streams over ``data`` once, so the data set never has to fit in memory:
    per batch ``b`` it adds the Hessian-vector product of the batch's *summed*
    loss (``|b|`` times its mean, so a ragged last batch weighs exactly what
    its examples weigh) to a float64 sum, with the example count in one more
    entry of the same tensor. That one tensor is all-reduced over processes
    (:func:`attribkit._distributed.reducer`: one collective per call, a no-op
    in one process) and only then divided by the count, so every rank gets
    the product of the union of the shards.

    The model runs through ``torch.func.functional_call`` with detached copies
    of its parameters, in eval mode (mode restored after every pass; the
    parameters' ``requires_grad`` is never touched). Floating-point inputs and
    targets are cast to the parameters' dtype.

    Parameters
    ----------
    model : torch.nn.Module
        The model; its parameters and buffers are captured at construction.
    data : DataLoader, Dataset, tuple (inputs, targets) or re-iterable of batches
        Iterated once per call; a one-shot iterator (a generator) is refused.
    loss : {"cross_entropy", "mse"} or callable
        The per-example loss, as everywhere in attribkit.
    params : list of str, optional
        The parameters ``H`` is taken over (default: all trainable).
    mode : {"rev-fwd", "rev-rev"}
        ``"rev-fwd"``: ``torch.func.jvp`` of the reverse-mode gradient
        (forward-over-reverse, the cheaper one); ``"rev-rev"``:
        ``torch.func.vjp`` of the gradient (reverse-over-reverse, for
        operators without forward-mode rules). Both give the same values to
        rounding. With data of a single batch and ``"rev-rev"``, that batch's
        vjp pullback is kept between calls instead of being rebuilt by every
        pass (streamed data never keeps a batch's graph). The path depends only
        on the data and the mode, never on elapsed time or machine load (API
        section 9): ``"rev-fwd"`` rebuilds its jvp in every pass. (An earlier
        version switched to ``torch.func.linearize`` once plain passes had taken
        0.2 s; that made the code path machine-dependent, and the linearised
        product crashed the process for ``loss="mse"``, so it was removed.)
    damping : float
        ``damping * v`` is added to the product (in float64).
    config : ComputeConfig
        ``batch_size`` for tuple/Dataset data and ``distributed``; progress
        bars of the passes are left to the caller.
    owner : str or estimator
        Named in error messages.

    Attributes
    ----------
    param_shapes : OrderedDict
        ``name -> shape`` of the selected parameters (model order).
    n_features : int
        Their total size ``p``.
    dtype, device
        The parameters' dtype and device, where the products are computed.
    n_samples : int or None
        The (all-reduced) example count, known after the first call; a later
        pass that sees another count raises ``ValueError``.
    max_rows : int or None
        At most this many rows of a block go through one vectorised product
        (``None``: all at once); a block of more rows is split into chunks
        within each batch, so a call is still one pass over the data.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data,
        *,
        loss="cross_entropy",
        params=None,
        mode: str = "rev-fwd",
        damping: float = 0.0,
        config: ComputeConfig,
        owner="hvp",
    ):
        import dataclasses

        from ._distributed import reducer

        V.check_option(owner, "mode", mode, HVP_MODES)
        self.loss_fn = resolve_loss(loss, owner)
        if isinstance(data, Iterator):
            raise ValueError(
                f"{V._owner(owner)} passes over 'data' once per Hessian-vector product, so "
                f"'data' must be re-iterable. Got a one-shot iterator ({type(data).__name__}); "
                "pass a DataLoader, a Dataset, a tuple (inputs, targets) or a list of batches."
            )
        selected = select_params(model, params, owner)
        self.model, self.data, self.mode, self.owner = model, data, mode, owner
        self.damping = float(damping)
        self.param_shapes = param_shapes(selected)
        self.n_features = sum(p.numel() for p in selected.values())
        self._sel = OrderedDict((n, p.detach()) for n, p in selected.items())
        frozen = {n: p.detach() for n, p in model.named_parameters() if n not in self._sel}
        frozen.update(dict(model.named_buffers()))
        self._frozen = frozen
        self.device = next(iter(self._sel.values())).device
        self.dtype = next(iter(self._sel.values())).dtype
        # One bar for the caller's iterations, not one per pass over the data.
        self._config = dataclasses.replace(config, progress=False)
        self._reducer = reducer(config, V._owner(owner))
        self._checked = False
        self.n_samples: int | None = None
        # Data of one batch with rev-rev: that batch's vjp pullback and size, kept
        # between calls, as every pass would rebuild the same one.
        self._kept = None
        self.max_rows: int | None = None

    def _batch_gradient(self, inputs, targets) -> Callable:
        """``sel -> gradient of one batch's summed loss`` (a ``torch.func.grad``)."""
        model, frozen, loss_fn = self.model, self._frozen, self.loss_fn
        builtin_ce = loss_fn is _cross_entropy

        def batch_loss(sel):
            outputs = _call(model, {**frozen, **sel}, inputs)
            if builtin_ce and outputs.ndim == 2:
                # The same sum of per-example losses; forward-mode AD through
                # reduction="none" is several times slower than through "sum".
                return F.cross_entropy(outputs, targets, reduction="sum")
            return loss_fn(outputs, targets).sum()

        return grad(batch_loss)

    def _batch_hvp(
        self, inputs, targets, tangents: dict, batched: bool
    ) -> tuple[dict, Callable | None]:
        """``H_b v`` for the summed loss of one batch, and the vjp pullback (rev-rev).

        ``tangents`` maps each parameter to ``(k, *shape)`` rows when
        ``batched`` (the products are ``(k, *shape)``), else to ``shape``.
        Subclasses with another curvature override this method alone.
        """
        gradient = self._batch_gradient(inputs, targets)
        if self.mode == "rev-fwd":
            from torch.func import jvp

            def product(t):
                return jvp(gradient, (self._sel,), (t,))[1]

            return (vmap(product)(tangents) if batched else product(tangents)), None
        from torch.func import vjp

        _, pullback = vjp(gradient, self._sel)
        return _pull(pullback, tangents, batched), pullback

    def _forward_mode_error(self, exc: Exception) -> RuntimeError:
        """The error for a model whose operators lack forward-mode rules."""
        return RuntimeError(
            f"{V._owner(self.owner)}: the forward-over-reverse Hessian-vector "
            f"product (mode='rev-fwd') failed with {type(exc).__name__}: {exc}\n"
            "Some operators have no forward-mode rule; use mode='rev-rev'."
        )

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """``(H + damping I) v`` in float64 on ``v``'s device.

        ``v`` is one flat vector ``(p,)`` or a block ``(k, p)`` of them; the
        result has ``v``'s shape. A block costs one pass over the data too.
        """
        return self.product_and_sum(v)[0]

    def product_and_sum(
        self, v: torch.Tensor, extra: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The product of ``v``, and ``extra`` summed over the ranks in the same all-reduce.

        ``extra`` (any float64 tensor) rides along with the products, so an
        iterative solver can agree on its own state across ranks without a
        second collective per iteration. In one process it comes back as is.
        """
        p = self.n_features
        if v.ndim not in (1, 2) or v.shape[-1] != p:
            raise ValueError(
                f"{V._owner(self.owner)}: a Hessian-vector product takes a flat vector of "
                f"shape ({p},) or a block (k, {p}). Got {tuple(v.shape)}."
            )
        batched = v.ndim == 2
        rows = v.reshape(-1, p)
        k = rows.shape[0]
        vec = rows.detach().to(device=self.device, dtype=self.dtype)
        tangents, start = OrderedDict(), 0
        for name, shape in self.param_shapes.items():
            size = math.prod(shape)
            block = vec[:, start : start + size]
            tangents[name] = block.reshape(k, *shape) if batched else block.reshape(shape)
            start += size
        # The weighted sum, the count and a failure flag travel in one tensor:
        # one all-reduce. Distributed, an empty shard on one rank is fine (an
        # empty union is not), and a rank that fails makes every rank raise
        # instead of leaving the others waiting in the all-reduce.
        size = 0 if extra is None else extra.numel()
        total = torch.zeros(k * p + size + 2, dtype=torch.float64, device=self.device)
        if extra is not None:
            total[k * p : k * p + size] = extra.reshape(-1)
        red, error = self._reducer, None
        try:
            self._pass(total, tangents, k if batched else 0)
        except EmptyDataError:
            if not red.active:
                raise
        except Exception as exc:
            if not red.active:
                raise
            error, total[-1] = exc, 1.0
        red.sum_(total)
        if error is not None:
            raise error
        if float(total[-1]) > 0:
            raise RuntimeError(
                f"{V._owner(self.owner)}: a Hessian-vector product failed on "
                f"{round(float(total[-1]))} other rank(s) of the process group (see their "
                f"error), so it stops on every rank (this is rank {red.rank})."
            )
        count = round(float(total[-2]))
        if count == 0:
            raise EmptyDataError(f"{EMPTY_DATA_MESSAGE} It was empty on every rank.")
        if self.n_samples is None:
            self.n_samples = count
        elif count != self.n_samples:
            raise ValueError(
                f"{V._owner(self.owner)}: 'data' yielded {count} examples in one pass and "
                f"{self.n_samples} in the first; every pass must see the same data."
            )
        out = total[: k * p].div_(count).reshape(v.shape)
        if self.damping:
            out.add_(v.detach().to(device=self.device, dtype=torch.float64), alpha=self.damping)
        if extra is not None:
            extra = total[k * p : k * p + size].reshape(extra.shape).to(extra.device)
        return out.to(v.device), extra

    def _pass(self, total: torch.Tensor, tangents: dict, k: int) -> None:
        """Add this rank's ``sum_b H_b v`` to ``total[:k p]`` and its count to ``total[-2]``.

        ``k`` is the number of rows of a block (0 for a single vector).
        """
        if self._kept is not None:
            pullback, size = self._kept
            for lo, chunk in self._chunks(tangents, k):
                self._add(total, _pull(pullback, chunk, k > 0), lo, k)
            total[-2] += size
            return
        batches = iter_batches(self.data, self._config, device=self.device, dtype=self.dtype)
        seen, pullback = 0, None
        with _EvalMode(self.model):
            for inputs, targets in batches:
                if not self._checked:
                    state = {**self._frozen, **self._sel}
                    with torch.no_grad():
                        outputs = _first_call(self.model, state, inputs, targets, self.owner)
                    _check_loss_output(self.loss_fn, outputs, targets, self.owner)
                    self._checked = True
                pullback = None  # a second batch's HVP never holds the first one's graph
                for lo, chunk in self._chunks(tangents, k):
                    try:
                        hv, pullback = self._batch_hvp(inputs, targets, chunk, k > 0)
                    except (RuntimeError, NotImplementedError) as exc:
                        if self.mode != "rev-fwd":
                            raise
                        raise self._forward_mode_error(exc) from exc
                    self._add(total, hv, lo, k)
                total[-2] += batch_len(inputs)
                seen += 1
        if seen == 1 and pullback is not None:
            self._kept = (pullback, float(total[-2]))

    def _chunks(self, tangents: dict, k: int):
        """``(first row, tangents)`` chunks of at most ``max_rows`` rows (one if ``k == 0``)."""
        step = k if not self.max_rows else min(k, int(self.max_rows))
        if k == 0 or step >= k:
            yield 0, tangents
            return
        for lo in range(0, k, step):
            yield lo, OrderedDict((n, t[lo : lo + step]) for n, t in tangents.items())

    def _add(self, total: torch.Tensor, hv: dict, lo: int = 0, k: int = 0) -> None:
        """``total[:p] += flat(hv)`` in float64 (rows ``lo:`` of the ``(k, p)`` block)."""
        p = self.n_features
        rows = next(iter(hv.values())).shape[0] if k else 1
        out = total[lo * p : (lo + rows) * p].view(rows, p)
        offset = 0
        for name in self.param_shapes:
            block = hv[name].reshape(rows, -1)
            out[:, offset : offset + block.shape[1]] += block.to(torch.float64)
            offset += block.shape[1]


def _pull(pullback, cotangents: dict, batched: bool) -> dict:
    """A vjp ``pullback`` applied to one cotangent, or vectorised over a block of rows."""
    if batched:
        return vmap(pullback)(cotangents)[0]
    return pullback(cotangents)[0]

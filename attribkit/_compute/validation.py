"""Parameter checks with scikit-learn style messages, for estimators and functions alike.

Every message names the parameter, the owner (an estimator, whose class name
is used, or a function name), what was expected and what was given:
``"The 'damping' parameter of DataInfIFVP must be a float >= 0 or 'auto'.
Got -1 instead."``
"""

from __future__ import annotations

import math
import numbers

from ..config import ComputeConfig

__all__ = [
    "BUILTIN_LOSS_NAMES",
    "FISHERS",
    "check_callable",
    "check_config",
    "check_damping",
    "check_fisher",
    "check_fisher_loss",
    "check_float",
    "check_int",
    "check_loss",
    "check_option",
    "check_params",
    "is_int",
    "is_real",
    "owner_name",
    "param_error",
]

#: The losses attribkit knows by name (and can sample targets from).
BUILTIN_LOSS_NAMES = ("cross_entropy", "mse", "causal_lm")
FISHERS = ("empirical", "true", "expected")


def owner_name(owner) -> str:
    """The name an error message gives ``owner``: itself if a string, else its class name."""
    return owner if isinstance(owner, str) else type(owner).__name__


def is_real(value) -> bool:
    """A real number that is not a bool (numpy scalars included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def param_error(owner, name: str, expected: str, value) -> ValueError:
    """The ``ValueError`` for a bad hyper-parameter value."""
    return ValueError(
        f"The {name!r} parameter of {owner_name(owner)} must be {expected}. Got {value!r} instead."
    )


def check_int(owner, name: str, value, *, minimum: int | None = None) -> int:
    """An int (not a bool), optionally ``>= minimum``."""
    expected = "an int" if minimum is None else f"an int >= {minimum}"
    if not is_int(value) or (minimum is not None and value < minimum):
        raise param_error(owner, name, expected, value)
    return int(value)


def check_float(
    owner, name: str, value, *, minimum: float | None = None, strict: bool = False
) -> float:
    """A finite real number, optionally ``>= minimum`` (``> minimum`` if strict)."""
    bound = "" if minimum is None else (f" > {minimum:g}" if strict else f" >= {minimum:g}")
    if not _is_finite_at_least(value, minimum, strict):
        raise param_error(owner, name, f"a float{bound}", value)
    return float(value)


def _is_finite_at_least(value, minimum: float | None, strict: bool) -> bool:
    if not is_real(value) or not math.isfinite(float(value)):
        return False
    if minimum is None:
        return True
    return float(value) > minimum if strict else float(value) >= minimum


def check_damping(
    owner,
    value,
    *,
    name: str = "damping",
    auto: bool = True,
    positive: bool = False,
    per_layer: bool = False,
    expected: str | None = None,
):
    """A damping: a finite float ``>= 0`` (``> 0`` with ``positive``) or ``"auto"``.

    ``auto=False`` refuses ``"auto"``; ``per_layer=True`` also accepts a
    non-empty list (or tuple) of such floats, one per layer. Returns
    ``"auto"``, the number as a float, or the list unchanged; ``expected``
    replaces the default wording of the error (the owner's own options).
    """
    if auto and isinstance(value, str) and value == "auto":
        return value
    ok = _is_finite_at_least(value, 0.0, positive)
    if not ok and per_layer and isinstance(value, (list, tuple)):
        ok = bool(value) and all(_is_finite_at_least(v, 0.0, positive) for v in value)
    if not ok:
        if expected is None:
            expected = "a float > 0" if positive else "a float >= 0"
            if per_layer:
                expected += ", a non-empty list of them (one per layer)"
            if auto:
                expected += " or 'auto'"
        raise param_error(owner, name, expected, value)
    return value if isinstance(value, (list, tuple)) else float(value)


def check_option(owner, name: str, value, options) -> str:
    """One of the strings ``options``."""
    if not isinstance(value, str) or value not in options:
        expected = "one of " + ", ".join(repr(o) for o in options)
        raise param_error(owner, name, expected, value)
    return value


def check_callable(owner, name: str, value):
    """A callable; anything else is a ``TypeError``."""
    if not callable(value):
        raise TypeError(
            f"The {name!r} parameter of {owner_name(owner)} must be a callable. "
            f"Got {type(value).__name__} {value!r} instead."
        )
    return value


def check_config(owner, config) -> ComputeConfig:
    """Resolve ``config=None`` to the defaults; reject anything but a ComputeConfig."""
    if config is None:
        return ComputeConfig()
    if not isinstance(config, ComputeConfig):
        raise param_error(owner, "config", "an attribkit.ComputeConfig or None", config)
    return config


def check_loss(owner, loss):
    """A built-in loss name or a callable ``(outputs, targets) -> losses``."""
    if callable(loss) or (isinstance(loss, str) and loss in BUILTIN_LOSS_NAMES):
        return loss
    raise param_error(
        owner,
        "loss",
        "'cross_entropy', 'mse', 'causal_lm' or a callable (outputs, targets) -> losses",
        loss,
    )


def check_fisher(owner, fisher, options=FISHERS) -> str:
    """``fisher`` among ``options`` (estimators without ``"expected"`` pass fewer)."""
    return check_option(owner, "fisher", fisher, options)


def check_fisher_loss(owner, fisher: str, loss) -> None:
    """``fisher="true"`` and ``"expected"`` need a built-in loss; raise otherwise.

    Both take targets from the model's predictive distribution, which is
    known only for the built-in losses (a categorical for cross-entropy and
    ``"causal_lm"``, a Gaussian for MSE). ``"expected"`` with ``"causal_lm"``
    (always a sequence) raises here, naming ``"true"``; cross-entropy on
    sequence outputs raises once the outputs are seen.
    """
    if fisher in ("true", "expected") and loss not in BUILTIN_LOSS_NAMES:
        how = "samples targets from" if fisher == "true" else "takes the expectation over"
        raise ValueError(
            f"The 'fisher' parameter of {owner_name(owner)} is {fisher!r}, which {how} the "
            "model's predictive distribution and is supported for the built-in losses "
            "('cross_entropy', 'mse', 'causal_lm') only. Got the custom loss "
            f"{loss!r}; use fisher='empirical'."
        )
    if fisher == "expected" and isinstance(loss, str) and loss == "causal_lm":
        raise ValueError(
            f"The 'fisher' parameter of {owner_name(owner)} is 'expected', which needs one "
            "gradient per token and vocabulary entry with loss='causal_lm' (a sequence loss). "
            "Use fisher='true' (one label sampled per token) or 'empirical'."
        )


def check_params(owner, params):
    """``None`` or a list of parameter names (validated against the model at fit)."""
    if params is None:
        return None
    if isinstance(params, str) or not all(isinstance(p, str) for p in params):
        raise param_error(owner, "params", "None or a list of parameter names", params)
    params = list(params)
    if not params:
        raise param_error(owner, "params", "None or a non-empty list of parameter names", params)
    return params

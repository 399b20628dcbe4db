"""Parameter checks with scikit-learn style messages.

Every message names the parameter, the owner, what was expected and what was
given: ``"The 'damping' parameter of DataInfIFVP must be a float >= 0 or
'auto'. Got -1 instead."``
"""

from __future__ import annotations

import numbers

from .config import ComputeConfig


def _owner(estimator) -> str:
    return estimator if isinstance(estimator, str) else type(estimator).__name__


def param_error(estimator, name: str, expected: str, value) -> ValueError:
    """The ``ValueError`` for a bad hyper-parameter value."""
    return ValueError(
        f"The {name!r} parameter of {_owner(estimator)} must be {expected}. Got {value!r} instead."
    )


def check_int(estimator, name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise param_error(estimator, name, _int_expectation(minimum), value)
    if minimum is not None and value < minimum:
        raise param_error(estimator, name, _int_expectation(minimum), value)
    return int(value)


def _int_expectation(minimum):
    return "an int" if minimum is None else f"an int >= {minimum}"


def check_float(
    estimator, name: str, value, *, minimum: float | None = None, strict: bool = False
) -> float:
    """A finite real number, optionally ``>= minimum`` (``> minimum`` if strict)."""
    bound = "" if minimum is None else (f" > {minimum:g}" if strict else f" >= {minimum:g}")
    expected = f"a float{bound}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise param_error(estimator, name, expected, value)
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise param_error(estimator, name, expected, value)
    if minimum is not None and (number <= minimum if strict else number < minimum):
        raise param_error(estimator, name, expected, value)
    return number


def check_option(estimator, name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        expected = "one of " + ", ".join(repr(o) for o in options)
        raise param_error(estimator, name, expected, value)
    return value


def check_config(estimator, config) -> ComputeConfig:
    """Resolve ``config=None`` to the defaults; reject anything but a ComputeConfig."""
    if config is None:
        return ComputeConfig()
    if not isinstance(config, ComputeConfig):
        raise param_error(estimator, "config", "an attribkit.ComputeConfig or None", config)
    return config


def check_loss(estimator, loss):
    if callable(loss) or loss in ("cross_entropy", "mse"):
        return loss
    raise param_error(
        estimator,
        "loss",
        "'cross_entropy', 'mse' or a callable (outputs, targets) -> losses",
        loss,
    )


def check_fisher(estimator, fisher, options=("empirical", "true", "expected")) -> str:
    """``fisher`` among ``options`` (estimators without ``"expected"`` pass fewer)."""
    return check_option(estimator, "fisher", fisher, options)


def check_params(estimator, params):
    """``None`` or a list of parameter names (validated against the model at fit)."""
    if params is None:
        return None
    if isinstance(params, str) or not all(isinstance(p, str) for p in params):
        raise param_error(estimator, "params", "None or a list of parameter names", params)
    params = list(params)
    if not params:
        raise param_error(
            estimator, "params", "None or a non-empty list of parameter names", params
        )
    return params

"""The seed's signatures, transcribed from its documents, against attribkit.functional."""

from __future__ import annotations

import inspect

import pytest
import torch

import attribkit.functional as F
from attribkit.functional import fisher, projection

P, K, VAR = (
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    inspect.Parameter.KEYWORD_ONLY,
    inspect.Parameter.VAR_POSITIONAL,
)
REQUIRED = inspect.Parameter.empty

#: function -> (module, [(name, kind, default)]), from design/seed/*.txt.
SEED = {
    "random_project": (
        projection,
        [
            ("feature", P, REQUIRED),
            ("feature_batch_size", P, REQUIRED),
            ("proj_dim", P, REQUIRED),
            ("proj_max_batch_size", P, REQUIRED),
            ("device", P, REQUIRED),
            ("proj_seed", P, 0),
            ("use_half_precision", K, True),
        ],
    ),
    "arnoldi_project": (
        projection,
        [
            ("feature_dim", P, REQUIRED),
            ("func", P, REQUIRED),
            ("x", P, REQUIRED),
            ("argnums", P, 0),
            ("proj_dim", P, 100),
            ("max_iter", P, 100),
            ("norm_constant", P, 1.0),
            ("tol", P, 1e-07),
            ("mode", P, "rev-fwd"),
            ("regularization", P, 0.0),
            ("seed", P, 0),
            ("device", P, "cpu"),
        ],
    ),
    "ifvp_explicit": (
        fisher,
        [("func", P, REQUIRED), ("argnums", P, 0), ("regularization", P, 0.0)],
    ),
    "ifvp_at_x_explicit": (
        fisher,
        [
            ("func", P, REQUIRED),
            ("x", VAR, REQUIRED),
            ("argnums", K, 0),
            ("regularization", K, 0.0),
        ],
    ),
    "ifvp_datainf": (
        fisher,
        [
            ("func", P, REQUIRED),
            ("argnums", P, REQUIRED),
            ("in_dims", P, REQUIRED),
            ("regularization", P, None),
            ("param_layer_map", P, None),
        ],
    ),
    "ifvp_at_x_datainf": (
        fisher,
        [
            ("func", P, REQUIRED),
            ("argnums", P, REQUIRED),
            ("in_dims", P, REQUIRED),
            ("regularization", P, None),
            ("x", VAR, REQUIRED),
            ("param_layer_map", K, None),
        ],
    ),
    "ifvp_at_x_ekfac": (
        fisher,
        [
            ("func", P, REQUIRED),
            ("x", VAR, REQUIRED),
            ("in_dims", K, None),
            ("batch_size", K, 1),
            ("max_iter", K, None),
            ("mlp_cache", K, REQUIRED),
            ("damping", K, 0.0),
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(SEED))
def test_signature_is_the_seeds(name):
    module, table = SEED[name]
    func = getattr(F, name)
    assert func is getattr(module, name)  # defined where the seed has it, re-exported
    params = list(inspect.signature(func).parameters.values())
    got = [(p.name, p.kind, p.default) for p in params]
    assert got == table
    for p, (_, _, default) in zip(params, table):
        assert type(p.default) is type(default)  # 0 is not 0.0, True is not 1
    assert func.__doc__ and "Parameters" in func.__doc__


def test_returned_functions_take_the_seeds_arguments():
    X = torch.randn(4, 6)
    project = F.random_project(X, 4, 8, 32, "cpu")
    assert list(inspect.signature(project).parameters) == ["feature", "ensemble_id"]
    assert inspect.signature(project).parameters["ensemble_id"].default == 0


def test_the_rest_of_the_seeds_names():
    expected = set(SEED) | {
        "MLPCache",
        "IFVPUsageError",
        "manual_cache_forward",
        "EKFAC_CACHE_KEY",
    }
    assert set(F.__all__) == expected
    assert F.EKFAC_CACHE_KEY == "__ekfac_cache"
    for name in ("MLPCache", "IFVPUsageError", "manual_cache_forward", "EKFAC_CACHE_KEY"):
        assert getattr(F, name) is getattr(fisher, name)
    assert {m for m in vars(F.MLPCache) if not m.startswith("_")} == {
        "clear",
        "zero_grad",
        "retain_grad",
        "check_type",
    }
    assert issubclass(F.IFVPUsageError, Exception)

"""Small seeded models and data sets shared by the tests (BackPACK-style case factories)."""

from __future__ import annotations

import torch
from torch import nn

import attribkit as ak


def classification_data(n=12, d=5, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return X, y


def regression_data(n=12, d=5, out=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, out, generator=g, dtype=dtype)
    return X, y


def mlp(d=5, hidden=4, out=3, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, out)).to(dtype)


def linear(d=5, out=3, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Linear(d, out).to(dtype)


def digits_model_and_gradients():
    """An MLP 64-64-64-10 trained briefly on sklearn's digits, and 200 per-example gradients.

    The setup whose JL distortion the KroneckerProjector docstring reports
    (``benchmarks/bench_scale.py`` measures it over 20 seeds with this code, and
    tests/projection/test_kronecker.py holds it to the bounds measured).
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster on a busy machine
    try:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
        )
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[:1000]), y[:1000]).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model = model.double()
    idx = torch.arange(0, 1797, 9)[:200]
    cfg = ak.ComputeConfig(dtype="float64", batch_size=100)
    return model, ak.per_example_gradients(model, (X[idx], y[idx]), config=cfg)


#: name -> (model factory, data factory, loss)
CASES = {
    "mlp-ce": (lambda: mlp(), lambda: classification_data(), "cross_entropy"),
    "linear-ce": (lambda: linear(), lambda: classification_data(), "cross_entropy"),
    "mlp-mse": (lambda: mlp(out=2), lambda: regression_data(), "mse"),
}

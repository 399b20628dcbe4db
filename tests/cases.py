"""Small seeded models and data sets shared by the tests (BackPACK-style case factories)."""

from __future__ import annotations

import torch
from torch import nn


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


#: name -> (model factory, data factory, loss)
CASES = {
    "mlp-ce": (lambda: mlp(), lambda: classification_data(), "cross_entropy"),
    "linear-ce": (lambda: linear(), lambda: classification_data(), "cross_entropy"),
    "mlp-mse": (lambda: mlp(out=2), lambda: regression_data(), "mse"),
}

"""Every model and data set the tests share: seeded case factories (BackPACK-style).

A case is a model factory, a data factory and a loss (:data:`CASES`); each
factory seeds what it draws, so a case is the same numbers whenever and
wherever it is built. The models cover what the estimators must handle: an
MLP (classification and regression), convolutions with padding and stride
(and string padding, reflect padding, dilation), Linear layers on tokens
(pooled, or with per-token targets), a weight shared by two calls, and a
BatchNorm layer with non-trivial running statistics (eval mode matters).
Test modules draw from here instead of defining their own models; a model
that exists for one test only (one that raises on purpose, say) stays with
that test.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import attribkit as ak

D64 = torch.float64


# --------------------------------------------------------------------------- data
def classification_data(n=12, d=5, classes=3, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return X, y


def regression_data(n=12, d=5, out=2, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, out, generator=g, dtype=dtype)
    return X, y


def image_data(n=13, shape=(2, 7, 7), classes=3, seed=1):
    """``(n, *shape)`` float64 images and labels ``arange(n) % classes``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=D64), torch.arange(n) % classes


def token_data(n=13, tokens=4, d=5, classes=3, seed=1, per_token=False, target_seed=2):
    """``(n, tokens, d)`` float64 inputs; labels per example, or ``(n, tokens)`` per token."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, tokens, d, generator=g, dtype=D64)
    if not per_token:
        return X, torch.arange(n) % classes
    t = torch.Generator().manual_seed(target_seed)
    return X, torch.randint(0, classes, (n, tokens), generator=t)


# --------------------------------------------------------------------------- models
def mlp(d=5, hidden=4, out=3, seed=0, dtype=D64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, out)).to(dtype)


def linear(d=5, out=3, seed=0, dtype=D64):
    torch.manual_seed(seed)
    return nn.Linear(d, out).to(dtype)


def mlp_case(n=12, seed=0):
    """:func:`mlp` (seeded) and ``n`` examples drawn after it from torch's global generator."""
    model = mlp(seed=seed)
    X = torch.randn(n, 5, dtype=D64)
    y = torch.randint(0, 3, (n,))
    return model, X, y


def conv_net():
    """Two convolutions (padding, stride, a non-square kernel, no bias) and a Linear head."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.Tanh(),
        nn.Conv2d(3, 4, (2, 3), padding=(1, 0), stride=(1, 2), bias=False),
        nn.Flatten(),
        nn.Linear(4 * 5 * 1, 3),
    )


def conv_same():
    """String padding, reflect padding mode and dilation."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect", dilation=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 3),
    )


class StridedConv(nn.Module):
    """One conv (stride 2, padding 1) on (2, 8, 8) images and a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class PooledTokens(nn.Module):
    """A Linear on (batch, tokens, features), pooled over tokens, then a bias-free head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)).mean(1))


class TokenMLP(nn.Module):
    """Linear layers on (batch, tokens, features), pooled over tokens after the head."""

    def __init__(self, d=5, hidden=6, out=3):
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.norm = nn.LayerNorm(hidden)  # trainable, unsupported: skipped
        self.out = nn.Linear(hidden, out, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x)))).mean(1)


class PerToken(nn.Module):
    """Per-token outputs ``(batch, classes, tokens)``: cross-entropy averages over tokens.

    torch's ``CrossEntropyLoss`` convention (classes in dimension 1). With as
    many classes as tokens the outputs would also read as ``(batch, tokens,
    classes)``, which API section 7 makes win, so the case keeps 3 classes
    for its 4 tokens.
    """

    def __init__(self, d=5, hidden=6, classes=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x).transpose(1, 2)  # (N, C, T) for CrossEntropyLoss


class Shared(nn.Module):
    """One Linear applied twice (weight sharing): its gradient sums both calls."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class Zoo(nn.Module):
    """Conv paddings and modes, a bias-free dilated conv, an in-place ReLU, 2 token dims."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 4, (3, 2), padding="same", padding_mode="reflect", bias=False)
        self.c3 = nn.Conv2d(4, 2, 2, dilation=2, padding=(1, 0), padding_mode="circular")
        self.act = nn.ReLU(inplace=True)
        self.tok = nn.Linear(2, 3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x)))))  # (b, 2, 4, 2)
        h = self.act(self.tok(h.permute(0, 2, 3, 1)))  # Linear on (b, 3, 2, features)
        return self.fc(h.mean((1, 2)) + 0.5 * self.fc(h.mean((1, 2))))  # fc called twice


def batchnorm_mlp(seed=0):
    """Linear - BatchNorm1d - Tanh - Linear (float64) with running statistics of 3 batches.

    The running statistics differ from a batch's own, so a result computed in
    train mode (batch statistics) differs from the eval-mode one attribkit takes.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _ in range(3):
            model(2.0 + 3.0 * torch.randn(16, 5, generator=g, dtype=D64))
    return model


def seeded(factory, seed=0):
    """``factory()`` after ``torch.manual_seed(seed)``, in float64."""

    def make():
        torch.manual_seed(seed)
        return factory().double()

    return make


# --------------------------------------------------------------------------- cases
class Case(NamedTuple):
    """A model factory, a data factory (``data(n=...)``) and the loss."""

    model: object
    data: object
    loss: str = "cross_entropy"


#: name -> Case; every factory is seeded.
CASES = {
    "mlp-ce": Case(mlp, classification_data),
    "linear-ce": Case(linear, classification_data),
    "mlp-mse": Case(lambda: mlp(out=2), regression_data, "mse"),
    "conv": Case(seeded(conv_net), image_data),
    "conv-same": Case(seeded(conv_same), lambda n=13: image_data(n, shape=(2, 6, 6))),
    "tokens": Case(seeded(TokenMLP), token_data),
    "per-token": Case(seeded(PerToken), lambda n=13: token_data(n, classes=3, per_token=True)),
    "shared": Case(seeded(Shared), classification_data),
    "batchnorm": Case(batchnorm_mlp, classification_data),
}


def case(name, n=None):
    """``(model, X, y)`` of the case ``name`` (``n`` examples: the data factory's default)."""
    make_model, make_data, _ = CASES[name]
    model = make_model()
    X, y = make_data() if n is None else make_data(n=n)
    return model, X, y


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

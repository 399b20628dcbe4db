"""Per-example gradients, losses, the data normaliser and true-Fisher targets."""

import math

import numpy as np
import pytest
import torch
from cases import CASES, classification_data, mlp, regression_data
from reference import assert_close, loop_per_example_gradients
from torch.utils.data import DataLoader, TensorDataset

import attribkit as ak
from attribkit._compute.targets import resolve_loss, sample_targets

F64 = ak.ComputeConfig(dtype="float64", batch_size=5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_autograd_loop(case):
    make_model, make_data, loss = CASES[case]
    model, (X, y) = make_model(), make_data()
    got = ak.per_example_gradients(model, (X, y), loss=loss, config=F64)
    assert got.dtype == torch.float64 and got.shape[0] == X.shape[0]
    assert_close(got, loop_per_example_gradients(model, X, y, loss), rtol=1e-10)


def test_data_containers_agree():
    model, (X, y) = mlp(), classification_data()
    ref = ak.per_example_gradients(model, (X, y), config=F64)
    ds = TensorDataset(X, y)
    for data in (
        (X.numpy(), y.numpy()),
        ds,
        DataLoader(ds, batch_size=4),
        [(X[:7], y[:7]), (X[7:], y[7:])],
        ((X[i : i + 3], y[i : i + 3]) for i in range(0, 12, 3)),
    ):
        assert_close(ak.per_example_gradients(model, data, config=F64), ref, rtol=1e-12)


def test_dict_output_and_params_subset():
    model, (X, y) = mlp(), classification_data()
    full = ak.per_example_gradients(model, (X, y), config=F64, flatten=False)
    assert list(full) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert full["0.weight"].shape == (12, 4, 5)
    sub = ak.per_example_gradients(model, (X, y), params=["2.bias", "0.weight"], config=F64)
    expected = torch.cat([full["0.weight"].reshape(12, -1), full["2.bias"]], 1)  # model order
    assert_close(sub, expected, rtol=1e-12)
    assert_close(sub, loop_per_example_gradients(model, X, y, params=["0.weight", "2.bias"]))


def test_callable_loss_and_dtype_device():
    model, (X, y) = mlp(out=2), regression_data()

    def l1(outputs, targets):
        return (outputs - targets).abs().sum(1)

    got = ak.per_example_gradients(model, (X, y), loss=l1)
    assert got.dtype == torch.float32  # default config dtype
    assert_close(got, loop_per_example_gradients(model, X, y, l1), rtol=1e-6)


def test_builtin_losses_average_to_torch_losses():
    out = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    assert_close(resolve_loss("cross_entropy")(out, y).mean(), torch.nn.CrossEntropyLoss()(out, y))
    t = torch.randn(6, 4, dtype=torch.float64)
    assert_close(resolve_loss("mse")(out, t).mean(), torch.nn.MSELoss()(out, t))
    seq = torch.randn(3, 5, 7, dtype=torch.float64)  # (N, C, T)
    ys = torch.randint(0, 5, (3, 7))
    assert_close(
        resolve_loss("cross_entropy")(seq, ys).mean(), torch.nn.CrossEntropyLoss()(seq, ys)
    )


def test_model_mode_is_restored():
    model = mlp()
    model.train()
    ak.per_example_gradients(model, classification_data())
    assert model.training


@pytest.mark.parametrize(
    "use",
    [
        lambda m, d: ak.per_example_gradients(m, d),
        lambda m, d: ak.ExplicitIFVP(damping=0.1).fit(m, d),
        lambda m, d: ak.EKFACIFVP().fit(m, d),
        lambda m, d: ak.ArnoldiProjector(proj_dim=2, max_iter=3, damping=1.0).fit(m, d),
        lambda m, d: ak.per_example_gradients(m, d, projector=ak.KroneckerProjector().fit(m)),
    ],
    ids=["per_example_gradients", "explicit", "ekfac", "arnoldi", "kronecker"],
)
def test_mixed_train_eval_modes_are_restored_per_module(use):
    # A training model with one part in eval mode (e.g. a frozen backbone)
    # gets every submodule's own mode back, not the root's.
    model = mlp()
    model.train()
    frozen = next(m for m in model.modules() if m is not model)
    frozen.eval()
    before = [m.training for m in model.modules()]
    use(model, classification_data())
    assert [m.training for m in model.modules()] == before


def test_errors():
    model, (X, y) = mlp(), classification_data()
    with pytest.raises(ValueError, match="'data' argument is required"):
        ak.per_example_gradients(model, None)
    with pytest.raises(ValueError, match="empty"):
        ak.per_example_gradients(model, (X[:0], y[:0]))
    with pytest.raises(ValueError, match="empty"):
        ak.per_example_gradients(model, [])
    with pytest.raises(ValueError, match="as many targets"):
        ak.per_example_gradients(model, (X, y[:3]))
    with pytest.raises(ValueError, match="'loss' parameter"):
        ak.per_example_gradients(model, (X, y), loss="hinge")
    with pytest.raises(ValueError, match="not have"):
        ak.per_example_gradients(model, (X, y), params=["nope"])
    with pytest.raises(ValueError, match="per-example losses"):
        ak.per_example_gradients(model, (X, y), loss=lambda o, t: o.sum())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ak.per_example_gradients(np.ones((3, 3)), (X, y))
    with pytest.raises(ValueError, match="pair"):
        ak.per_example_gradients(model, [X])


def test_true_fisher_targets_follow_the_model():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0]]).repeat(20000, 1)
    draws = sample_targets(logits, "cross_entropy")
    freq = torch.bincount(draws, minlength=3).double() / draws.numel()
    probs = torch.softmax(logits[0].double(), 0)
    assert torch.all((freq - probs).abs() < 5 * torch.sqrt(probs * (1 - probs) / draws.numel()))
    out = torch.zeros(20000, 4)
    t = sample_targets(out, "mse")
    assert abs(t.var().item() - 2.0) < 5 * 2.0 * math.sqrt(2 / t.numel())  # D/2 = 2
    torch.manual_seed(1)
    a = sample_targets(logits[:50], "cross_entropy")
    torch.manual_seed(1)
    assert torch.equal(a, sample_targets(logits[:50], "cross_entropy"))
    with pytest.raises(ValueError, match="fisher='empirical'"):
        sample_targets(logits, lambda o, t: o.sum(1))


@pytest.mark.parametrize("announced", [None, 5, 9])
@pytest.mark.parametrize("flat", [True, False])
def test_gather_concatenates_each_row_once_whatever_the_count(announced, flat):
    """Unknown counts (a list of batches) and counts exceeded give the plain concatenation."""
    from attribkit.gradients import _Gather

    g = torch.Generator().manual_seed(0)
    batches = [
        [torch.randn(b, 3, generator=g), torch.randn(b, 2, generator=g, dtype=torch.float32)]
        for b in (2, 3, 4)
    ]
    gather = _Gather(announced, torch.device("cpu"), torch.float64)
    for parts in batches:
        gather.add(parts if flat else parts[:1])
    got = gather.result()
    expected = torch.cat([torch.cat(p if flat else p[:1], dim=1) for p in batches]).double()
    assert got.dtype == torch.float64 and torch.equal(got, expected)

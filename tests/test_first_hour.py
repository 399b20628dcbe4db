"""A new user's first hour (issue 7): errors naming their cause, data in the forms users have."""

import numpy as np
import pytest
import torch
from cases import classification_data, mlp
from reference import assert_close, damped_fisher, loop_per_example_gradients
from sklearn.pipeline import make_pipeline
from torch.utils.data import DataLoader

import attribkit as ak

F64 = ak.ComputeConfig(dtype="float64", batch_size=5)


# ---------------------------------------------------------- 1. NaN gradients name themselves
def test_nan_input_names_batch_and_example():
    model, (X, y) = mlp(), classification_data()
    X = X.clone()
    X[7, 2] = float("nan")  # batch 1 (batch_size 5), example 2 of that batch
    with pytest.raises(ValueError, match=r"batch 1 at example 2 .*example 7 of the data.*inputs"):
        ak.per_example_gradients(model, (X, y), config=F64)
    with pytest.raises(ValueError, match=r"ExplicitIFVP.*example 7 of the data"):
        ak.ExplicitIFVP(damping=1e-3, config=F64).fit(model, (X, y))
    with pytest.raises(ValueError, match=r"DataInfIFVP.*example 7 of the data"):
        ak.DataInfIFVP(config=F64).fit(model, (X, y))


def test_non_finite_loss_and_gradient_named():
    model, (X, y) = mlp(), classification_data()

    def log_loss(outputs, targets):  # log of 0 for the example whose first output is 0
        return torch.log(outputs[:, 0] ** 2)

    X = X.clone()
    X[3] = 0.0
    with torch.no_grad():
        model[2].bias.zero_()
        model[0].bias.zero_()
    with pytest.raises(ValueError, match=r"example 3 of the data.*loss is -inf"):
        ak.per_example_gradients(model, (X, y), loss=log_loss, config=F64)

    def sqrt_loss(outputs, targets):  # finite at 0, infinite derivative
        return outputs[:, 0].abs().sqrt()

    with pytest.raises(ValueError, match=r"example 3 of the data.*derivative"):
        ak.per_example_gradients(model, (X, y), loss=sqrt_loss, config=F64)


def test_finite_gradients_whose_sum_overflows_pass():
    model = torch.nn.Linear(2, 1, bias=False).float()
    with torch.no_grad():
        model.weight.fill_(1.0)
    X = torch.full((4, 2), 3e37)  # per-entry gradients ~1e38, their sum overflows float32

    def linear_loss(outputs, targets):
        return outputs[:, 0]

    g = ak.per_example_gradients(model, (X, torch.zeros(4)), loss=linear_loss)
    assert torch.isfinite(g).all()


# ----------------------------------------------------------------- 7. data in the forms users have
def test_float64_numpy_into_float32_model():
    model, (X, y) = mlp(dtype=torch.float32), classification_data()
    got = ak.per_example_gradients(model, (X.numpy(), y.numpy()))
    ref = loop_per_example_gradients(model, X.float(), y)
    assert got.dtype == torch.float32
    assert_close(got, ref, rtol=1e-5)
    ifvp = ak.ExplicitIFVP(damping=0.1).fit(model, (X.numpy(), y.numpy()))
    assert ifvp.n_features_in_ == got.shape[1]


def test_targets_as_a_list():
    model, (X, y) = mlp(), classification_data()
    ref = ak.per_example_gradients(model, (X, y), config=F64)
    assert_close(ak.per_example_gradients(model, (X, y.tolist()), config=F64), ref, rtol=1e-12)
    batches = [(X[:7], y[:7].tolist()), (X[7:], y[7:].tolist())]
    assert_close(ak.per_example_gradients(model, batches, config=F64), ref, rtol=1e-12)


def test_model_failing_on_first_batch_gives_shapes_and_hint():
    model, (_, y) = mlp(), classification_data()
    with pytest.raises(ValueError, match=r"(?s)first batch.*\(5, 6\).*\(5,\).*DataLoader"):
        ak.per_example_gradients(model, (torch.randn(12, 6, dtype=torch.float64), y), config=F64)


def test_list_of_single_examples_wants_a_dataloader():
    model, (X, y) = mlp(), classification_data()
    examples = [(X[i], int(y[i])) for i in range(len(y))]
    with pytest.raises(ValueError, match="single target.*DataLoader"):
        ak.per_example_gradients(model, examples, config=F64)
    ref = ak.per_example_gradients(model, (X, y), config=F64)
    got = ak.per_example_gradients(model, DataLoader(examples, batch_size=4), config=F64)
    assert_close(got, ref, rtol=1e-12)


def test_dict_batches_say_how_to_adapt():
    model, (X, y) = mlp(), classification_data()
    rows = [{"x": X[i], "y": y[i]} for i in range(len(y))]
    with pytest.raises(ValueError, match=r"dict with keys \['x', 'y'\].*collate_fn"):
        ak.per_example_gradients(model, DataLoader(rows, batch_size=4), config=F64)


# ----------------------------------------------------------------- 3. damping="auto"
@pytest.mark.parametrize("solver", ["cholesky", "woodbury", "auto"])
@pytest.mark.parametrize("n", [30, 4])
def test_explicit_auto_damping_is_a_tenth_of_mean_fisher_diagonal(solver, n):
    g = torch.Generator().manual_seed(n)
    G = torch.randn(n, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7)
    V = torch.randn(3, 6, generator=g, dtype=torch.float64)
    ifvp = ak.ExplicitIFVP(damping="auto", solver=solver, config=F64).fit(G)
    F = G.T @ G / n
    expected = 0.1 * float(F.diagonal().mean())
    assert ifvp.damping_ == pytest.approx(expected, rel=1e-12)
    A = F + expected * torch.eye(6, dtype=torch.float64)
    assert_close(ifvp.transform(V), torch.linalg.solve(A, V.T).T, rtol=1e-10)
    assert_close(ifvp.inverse_transform(V), V @ A, rtol=1e-12)
    fixed = ak.ExplicitIFVP(damping=0.25, solver=solver, config=F64).fit(G)
    assert fixed.damping_ == 0.25


def test_explicit_auto_damping_in_model_mode():
    model, (X, y) = mlp(), classification_data()
    G = loop_per_example_gradients(model, X, y)
    ifvp = ak.ExplicitIFVP(damping="auto", config=F64).fit(model, (X, y))
    assert ifvp.solver_ == "woodbury"  # n = 12 < p = 39
    expected = 0.1 * float(G.square().sum(1).mean()) / G.shape[1]
    assert ifvp.damping_ == pytest.approx(expected, rel=1e-12)
    assert_close(ifvp.transform(G[:2]), torch.linalg.solve(damped_fisher(G, expected), G[:2].T).T)


def test_explicit_auto_damping_refuses_zero_gradients():
    with pytest.raises(ValueError, match="damping='auto'.*every per-example gradient is zero"):
        ak.ExplicitIFVP(damping="auto", config=F64).fit(torch.zeros(5, 3))


def test_singular_message_suggests_auto_not_the_damping_in_use():
    with pytest.raises(ValueError, match=r"Use damping > 0: damping='auto'.*weight decay"):
        ak.ExplicitIFVP(config=F64).fit(torch.randn(3, 5, dtype=torch.float64))


# ----------------------------------------------------------------- 9. scikit-learn citizenship
def test_feature_names_out():
    G = torch.randn(10, 7, dtype=torch.float64)
    proj = ak.RandomProjector(proj_dim=3).fit(G)
    assert list(proj.get_feature_names_out()) == [f"randomprojector{i}" for i in range(3)]
    ifvp = ak.ExplicitIFVP(damping=0.1).fit(G)
    assert list(ifvp.get_feature_names_out()) == [f"x{i}" for i in range(7)]
    names = [f"g{i}" for i in range(7)]
    assert list(ifvp.get_feature_names_out(names)) == names  # passed through
    with pytest.raises(ValueError, match="input_features"):
        ifvp.get_feature_names_out(names[:3])
    with pytest.raises(ValueError, match="input_features"):
        proj.get_feature_names_out(names[:3])
    model = torch.nn.Linear(2, 2)
    datainf = ak.DataInfIFVP().fit(model, (torch.randn(4, 2), torch.tensor([0, 1, 1, 0])))
    assert list(datainf.get_feature_names_out()) == [
        "weight[0]",
        "weight[1]",
        "weight[2]",
        "weight[3]",
        "bias[0]",
        "bias[1]",
    ]
    pipe = make_pipeline(ak.RandomProjector(proj_dim=3), ak.DataInfIFVP()).fit(G)
    assert list(pipe.get_feature_names_out()) == [f"randomprojector{i}" for i in range(3)]


def test_set_output_pandas_in_a_pipeline():
    pd = pytest.importorskip("pandas")
    G = np.random.default_rng(0).normal(size=(12, 9))
    pipe = make_pipeline(ak.RandomProjector(proj_dim=4), ak.ExplicitIFVP(damping=0.1)).set_output(
        transform="pandas"
    )
    out = pipe.fit(G).transform(G[:3])
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == [f"randomprojector{i}" for i in range(4)]
    plain = make_pipeline(ak.RandomProjector(proj_dim=4), ak.ExplicitIFVP(damping=0.1))
    np.testing.assert_allclose(out.to_numpy(), plain.fit(G).transform(G[:3]), rtol=1e-6)
    # A DataFrame's column names are recorded and passed through by an IFVP.
    frame = pd.DataFrame(G, columns=[f"c{i}" for i in range(9)])
    ifvp = ak.ExplicitIFVP(damping=0.1).fit(frame)
    assert list(ifvp.feature_names_in_) == list(frame.columns)
    assert list(ifvp.get_feature_names_out()) == list(frame.columns)
    # influence takes the pandas-output Pipeline too.
    scores = ak.influence(pipe, G, G[:3])
    assert scores.shape == (3, 12)


def test_set_output_default_is_unchanged():
    G = np.random.default_rng(0).normal(size=(12, 9))
    pipe = make_pipeline(ak.RandomProjector(proj_dim=4), ak.ExplicitIFVP(damping=0.1))
    assert isinstance(pipe.set_output(transform="default").fit(G).transform(G), np.ndarray)


def test_array_mode_memory_error_does_not_suggest_params(monkeypatch):
    from attribkit._compute import budget

    monkeypatch.setattr(budget, "available_bytes", lambda device: 0)
    tiny = ak.ComputeConfig(memory_budget=1000)
    with pytest.raises(ValueError, match="cannot fit in memory") as info:
        ak.ExplicitIFVP(config=tiny).fit(torch.randn(30, 20))
    assert "params=" not in str(info.value) and "fewer features" in str(info.value)
    model, (X, y) = mlp(), classification_data()
    with pytest.raises(ValueError, match=r"cannot fit in memory.*params=\[\.\.\.\]"):
        ak.ExplicitIFVP(config=tiny).fit(model, (X, y))


# ----------------------------------------------------------------- 8. progress where work is long
def test_progress_for_array_mode_factorisation(capsys):
    cfg = ak.ComputeConfig(dtype="float64", progress=True, memory_budget=3_000)
    ak.ExplicitIFVP(damping=0.1, solver="cholesky", config=cfg).fit(torch.randn(40, 12))
    err = capsys.readouterr().err
    assert "ExplicitIFVP Fisher" in err and "Cholesky of the 12 x 12 Fisher" in err
    ak.ExplicitIFVP(damping=0.1, solver="woodbury", config=cfg).fit(torch.randn(5, 12))
    assert "Cholesky of the 5 x 5 kernel" in capsys.readouterr().err
    quiet = ak.ComputeConfig(dtype="float64", progress=False, memory_budget=3_000)
    ak.ExplicitIFVP(damping=0.1, config=quiet).fit(torch.randn(40, 12))
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------- the trial, end to end
def test_cnn_on_digits_as_a_new_user_would():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X[:40] / 16.0).reshape(-1, 1, 8, 8)  # float64 numpy, as sklearn gives it
    y = y[:40].tolist()  # targets as a list
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(72, 10)
    )  # float32
    G = ak.per_example_gradients(model, (X, y))
    assert G.dtype == torch.float32 and G.shape == (40, 20 + 730)
    pipe = make_pipeline(ak.RandomProjector(proj_dim=32), ak.ExplicitIFVP(damping="auto"))
    pipe.fit(G.numpy())
    scores = ak.influence(pipe, G.numpy(), G[:5].numpy())
    proj, ifvp = pipe[0], pipe[-1]
    manual = ak.influence(ifvp, proj.transform(G.numpy()), proj.transform(G[:5].numpy()))
    np.testing.assert_allclose(scores, manual, rtol=1e-6)
    np.testing.assert_allclose(
        ak.self_influence(pipe, G[:5].numpy()), np.diag(scores[:, :5]), rtol=1e-4
    )
    last = ak.RandomProjector(proj_dim=16, params=["3.weight", "3.bias"]).fit(model)
    G_last = ak.per_example_gradients(model, (X, y), params=["3.weight", "3.bias"])
    assert last.transform(G_last).shape == (40, 16)
    X_nan = X.copy()
    X_nan[17, 0, 4, 4] = np.nan
    with pytest.raises(ValueError, match="example 17 of the data.*inputs of that example"):
        ak.ExplicitIFVP(damping=1e-3).fit(model, (X_nan, y))

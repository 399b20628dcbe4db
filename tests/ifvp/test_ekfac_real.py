"""EKFACIFVP on real models (API 7): Conv1D, tied weights, coverage, eigh, padding, LoRA."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from cases import (
    LMLogits,
    conv1d_as_linear,
    conv1d_net,
    lm_batch,
    mlp_case,
    padded_sequences,
    tiny_gpt2,
    tiny_resnet,
    token_data,
    token_sum_ce,
)
from reference import assert_close, ekfac_ifvp, ekfac_of_model
from torch import nn

import attribkit as ak
from attribkit._compute import capture
from attribkit.ifvp.ekfac import EKFACStatistics, eigh_psd

pytest.importorskip("transformers")

D64 = torch.float64
F64 = ak.ComputeConfig(dtype="float64", batch_size=5, progress=False)


# --------------------------------------------------------------------------- helpers
def clusters(w, rel=1e-4):
    """Index groups of eigenvalues closer than ``rel * max|w|`` (ascending ``w``)."""
    gap = rel * float(w.abs().max())
    groups, start = [], 0
    for i in range(1, len(w) + 1):
        if i == len(w) or float(w[i] - w[i - 1]) > gap:
            groups.append(list(range(start, i)))
            start = i
    return groups


def assert_same_basis(Q1, w1, Q2, w2, rtol=1e-10):
    """Same eigenvalues, and the same eigenvector (sign-free) or eigenspace per cluster."""
    assert_close(w1, w2, rtol=rtol)
    for group in clusters(w2):
        P1 = Q1[:, group] @ Q1[:, group].T
        P2 = Q2[:, group] @ Q2[:, group].T
        assert_close(P1, P2, rtol=rtol, atol=rtol)


def assert_same_factors(est, ref, rtol=1e-10):
    """A, S, their eigenbases and Λ of two fitted EKFACIFVPs, layer by layer."""
    assert est.layers_ == ref.layers_
    for name in est.layers_:
        for vals, vecs in [
            ("input_eigenvalues_", "input_eigenvectors_"),
            ("output_eigenvalues_", "output_eigenvectors_"),
        ]:
            w1, Q1 = getattr(est, vals)[name], getattr(est, vecs)[name]
            w2, Q2 = getattr(ref, vals)[name], getattr(ref, vecs)[name]
            # The factor itself (A or S), then its eigenbasis.
            assert_close(Q1 @ torch.diag(w1) @ Q1.T, Q2 @ torch.diag(w2) @ Q2.T, rtol=rtol)
            assert_same_basis(Q1, w1, Q2, w2, rtol=rtol)
        assert_close(est.lambdas_[name], ref.lambdas_[name], rtol=rtol)


def conv1d_weights(model):
    return {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}


def as_linear_layout(vectors, transposed):
    """Dict vectors of a Conv1D model in the layout of its nn.Linear twin (weights transposed)."""
    return {k: v.transpose(1, 2) if k in transposed else v for k, v in vectors.items()}


def random_vectors(est, m=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(m, *s, generator=g, dtype=D64) for k, s in est.param_shapes_.items()}


def no_coverage_warning(fit):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fit()
    assert not [w for w in caught if "of the model's trainable parameters" in str(w.message)]
    return out


# --------------------------------------------------------------------------- Conv1D
@pytest.mark.parametrize("fisher", ["empirical", "true", "expected"])
def test_conv1d_equals_equivalent_linear(fisher):
    model = conv1d_net()
    twin = conv1d_as_linear(model)
    X, y = token_data(n=13, tokens=4)
    fits = []
    for m in (model, twin):
        torch.manual_seed(5)  # fisher="true": the same draws for both
        fits.append(ak.EKFACIFVP(damping=0.1, fisher=fisher, config=F64).fit(m, (X, y)))
    est, ref = fits
    assert est.layers_ == ["up", "mid", "head"] and est.skipped_layers_ == []
    assert est.param_shapes_["up.weight"] == (5, 7)  # Conv1D: (in, out)
    assert ref.param_shapes_["up.weight"] == (7, 5)
    assert_same_factors(est, ref)
    transposed = conv1d_weights(model)
    V = random_vectors(est)
    for method in ("transform", "inverse_transform"):
        got = as_linear_layout(getattr(est, method)(V), transposed)
        expected = getattr(ref, method)(as_linear_layout(V, transposed))
        for k in expected:
            assert_close(got[k], expected[k], rtol=1e-10)
    # A flat vector in the Conv1D layout gives the dict result, flattened.
    flat = torch.cat([v.reshape(3, -1) for v in V.values()], 1)
    out = est.transform(V)
    assert_close(est.transform(flat), torch.cat([v.reshape(3, -1) for v in out.values()], 1))


def test_conv1d_transform_equals_dense_definition():
    """The Conv1D model's EK-FAC against the definition, on per-example gradients by autograd."""
    model = conv1d_net()
    X, y = token_data(n=13, tokens=4)
    est = ak.EKFACIFVP(damping=0.1, config=F64).fit(model, (X, y))
    truth = ekfac_of_model(conv1d_as_linear(model), X, y, ["up", "mid", "head"])
    V = random_vectors(est)
    out = est.transform(V)
    for name, (QS, QA, lam) in truth.items():
        assert_close(est.lambdas_[name], lam, rtol=1e-9)
        w, b = V[f"{name}.weight"], V[f"{name}.bias"]
        W = w.transpose(1, 2) if name != "mid" else w  # Conv1D: (in, out)
        expected = ekfac_ifvp(QS, QA, lam, 0.1, torch.cat([W, b[:, :, None]], dim=2))
        got_w = out[f"{name}.weight"]
        got_w = got_w.transpose(1, 2) if name != "mid" else got_w
        assert_close(got_w, expected[:, :, :-1], rtol=1e-9)
        assert_close(out[f"{name}.bias"], expected[:, :, -1], rtol=1e-9)


def test_gpt2_conv1d_equals_equivalent_linear():
    model = tiny_gpt2()  # raw: padded dict batches, loss="causal_lm"
    twin = conv1d_as_linear(model)
    ids, mask = padded_sequences([12, 9, 12, 5, 12, 10, 12, 7], seed=3)
    data = {"input_ids": ids, "attention_mask": mask}
    est = ak.EKFACIFVP(damping=0.1, loss="causal_lm", config=F64).fit(model, data)
    ref = ak.EKFACIFVP(damping=0.1, loss="causal_lm", config=F64).fit(twin, data)
    names = [f"transformer.h.{i}.{p}" for i in range(2) for p in
             ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]  # fmt: skip
    assert est.layers_ == names
    assert_same_factors(est, ref)
    transposed = conv1d_weights(model)
    V = random_vectors(est)
    got = as_linear_layout(est.transform(V), transposed)
    expected = ref.transform(as_linear_layout(V, transposed))
    for k in expected:
        assert_close(got[k], expected[k], rtol=1e-10)


def test_conv1d_state_round_trips_through_save_and_pickle(tmp_path):
    import pickle

    model = conv1d_net()
    X, y = token_data(n=13, tokens=4)
    est = ak.EKFACIFVP(damping=0.1, config=F64).fit(model, (X, y))
    V = torch.randn(2, est.n_features_in_, dtype=D64)
    path = tmp_path / "ekfac.safetensors"
    ak.save(est, path)
    for loaded in (ak.load(path), pickle.loads(pickle.dumps(est))):
        assert_close(loaded.transform(V), est.transform(V), rtol=0)


# --------------------------------------------------------------------------- tied weights
class TiedLM(nn.Module):
    """An embedding whose weight the output head reuses (GPT-2's tying), pooled over tokens."""

    def __init__(self, vocab=12, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.body = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.emb(ids)))).mean(1)


def tied_case(n=10):
    torch.manual_seed(0)
    model = TiedLM().double()
    g = torch.Generator().manual_seed(1)
    return (
        model,
        torch.randint(0, 12, (n, 3), generator=g),
        torch.randint(0, 12, (n,), generator=g),
    )


def test_tied_weight_is_skipped_by_default_and_named_under_its_first_name():
    model, X, y = tied_case()
    with pytest.warns(UserWarning, match="covers 29.4%"):  # body: 20 of 68
        est = ak.EKFACIFVP(config=F64).fit(model, (X, y))
    assert est.layers_ == ["body"] and est.skipped_layers_ == ["emb", "head"]
    assert "'emb.weight' is tied to" in est.skipped_reasons_["head"]
    assert "'emb'" in est.skipped_reasons_["head"]
    assert "Embedding" in est.skipped_reasons_["emb"]
    with pytest.warns(UserWarning, match=r"layer 'head', whose weight 'emb.weight' is tied"):
        both = ak.EKFACIFVP(layers=["head", "body"], damping=0.1, config=F64).fit(model, (X, y))
    # Named (and ordered) as model.named_parameters(): the head's weight is emb.weight.
    assert list(both.param_shapes_.items()) == [
        ("emb.weight", (12, 4)), ("body.weight", (4, 4)), ("body.bias", (4,))
    ]  # fmt: skip
    G = ak.per_example_gradients(model, (X, y), params=list(both.param_shapes_), config=F64)
    assert G.shape == (10, both.n_features_in_)
    # The head's factors (of its own use: the untied twin's) are applied to the
    # vector under emb.weight, as they are.
    untied = copy.deepcopy(model)
    untied.head.weight = nn.Parameter(model.emb.weight.detach().clone())
    truth = ekfac_of_model(untied, X, y, ["head", "body"])
    V = random_vectors(both)
    out = both.transform(V)
    QS, QA, lam = truth["head"]
    assert_close(both.lambdas_["head"], lam, rtol=1e-9)
    assert_close(out["emb.weight"], ekfac_ifvp(QS, QA, lam, 0.1, V["emb.weight"]), rtol=1e-9)
    flat = torch.cat([V[k].reshape(3, -1) for k in both.param_shapes_], 1)
    assert_close(both.transform(flat)[:, :48], out["emb.weight"].reshape(3, -1))


class TwinLinear(nn.Module):
    """Two nn.Linear modules holding one weight (an encoder and a decoder tied)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


def test_two_linear_layers_sharing_a_weight():
    torch.manual_seed(0)
    model = TwinLinear().double()
    X, y = torch.randn(10, 4, dtype=D64), torch.randint(0, 3, (10,))
    with pytest.warns(UserWarning, match=r"'enc' \(Linear, 20\), 'dec' \(Linear, 4\)"):
        est = ak.EKFACIFVP(config=F64).fit(model, (X, y))
    assert est.layers_ == ["out"] and est.skipped_layers_ == ["enc", "dec"]
    assert "module 'dec'" in est.skipped_reasons_["enc"]
    assert "'enc.weight'" in est.skipped_reasons_["dec"]
    with pytest.raises(ValueError, match=r"\['enc', 'dec'\] that hold the same \(tied\)"):
        ak.EKFACIFVP(layers=["enc", "dec"]).fit(model, (X, y))
    with pytest.warns(UserWarning, match="'dec', whose weight 'enc.weight'"):
        dec = ak.EKFACIFVP(layers=["dec"], config=F64).fit(model, (X, y))
    assert list(dec.param_shapes_) == ["enc.weight", "dec.bias"]


def test_gpt2_lm_head_is_tied_to_the_embedding():
    model = tiny_gpt2()  # raw
    ids, mask = padded_sequences([10, 4, 10, 7, 10, 9], seed=4)
    data = {"input_ids": ids, "attention_mask": mask}
    est = ak.EKFACIFVP(loss="causal_lm", config=F64).fit(model, data)
    assert "lm_head" in est.skipped_layers_
    assert "'transformer.wte.weight' is tied to" in est.skipped_reasons_["lm_head"]
    named = dict(model.named_parameters())
    assert all(named[k].shape == s for k, s in est.param_shapes_.items())
    # The README recipe works: param_shapes_ names parameters the model has.
    G = ak.per_example_gradients(
        model, data, loss="causal_lm", params=list(est.param_shapes_), config=F64
    )
    assert G.shape == (6, est.n_features_in_)
    with pytest.warns(UserWarning, match="'lm_head', whose weight 'transformer.wte.weight'"):
        head = ak.EKFACIFVP(layers=["lm_head"], loss="causal_lm", config=F64).fit(model, data)
    assert list(head.param_shapes_.items()) == [("transformer.wte.weight", (40, 16))]


# --------------------------------------------------------------------------- coverage
class Gain(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.g = nn.Parameter(torch.ones(size))


class Scaled(nn.Module):
    """A Linear(5, 3) (18 parameters) and an uncovered module holding ``size`` more."""

    def __init__(self, size):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.gain = Gain(size)

    def forward(self, x):
        return self.lin(x) * self.gain.g.mean()


@pytest.mark.parametrize("estimator", ["EKFACIFVP", "KroneckerProjector"])
def test_coverage_warning_on_both_sides_of_one_half(estimator):
    X, y = torch.randn(8, 5, dtype=D64), torch.randint(0, 3, (8,))

    def fit(model, **kwargs):
        est = getattr(ak, estimator)(config=F64, **kwargs)
        return est.fit(model, (X, y))

    torch.manual_seed(0)
    below = Scaled(19).double()  # 18 of 37: 48.6%
    with pytest.warns(UserWarning, match=r"covers 48.6% .* \(18 of 37\) with its 1 layer\. "
                      r"The largest modules left out .*: 'gain' \(Gain, 19\)"):  # fmt: skip
        fit(below)
    above = Scaled(17).double()  # 18 of 35: 51.4%
    assert no_coverage_warning(lambda: fit(above)).layers_ == ["lin"]
    # Named layers are the user's choice: no warning.
    no_coverage_warning(lambda: fit(below, layers=["lin"]))
    assert capture.coverage(below, capture.resolve_layers(below)[0])[:2] == (18, 37)


def test_coverage_counts_trainable_parameters_once():
    model, _, _ = tied_case()
    layers, _ = capture.resolve_layers(model, ["head", "body"])
    covered, total, left = capture.coverage(model, layers)
    assert (covered, total, left) == (68, 68, [])
    model.emb.weight.requires_grad_(False)
    covered, total, left = capture.coverage(model, capture.resolve_layers(model)[0])
    assert (covered, total, left) == (20, 20, [])


# --------------------------------------------------------------------------- eigendecompositions
def test_eigh_psd_handles_structurally_zero_rows_exactly():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 7, generator=g, dtype=D64)
    a[:, [1, 4, 5]] = 0
    cov = a.T @ a / 30
    w, Q = eigh_psd(cov)
    assert torch.equal(w[:3], torch.zeros(3, dtype=D64))  # the zero block, first
    assert torch.all(w[1:] >= w[:-1])
    for j, col in enumerate((1, 4, 5)):
        assert torch.equal(Q[:, j], torch.eye(7, dtype=D64)[col])
    assert_close(Q @ torch.diag(w) @ Q.T, cov, rtol=1e-13)
    assert_close(Q.T @ Q, torch.eye(7, dtype=D64), rtol=1e-13)
    keep = [0, 2, 3, 6]
    assert_close(w[3:], torch.linalg.eigh(cov[keep][:, keep])[0], rtol=1e-13)
    assert torch.equal(Q[[1, 4, 5]][:, 3:], torch.zeros(3, 4, dtype=D64))
    w0, Q0 = eigh_psd(torch.zeros(3, 3, dtype=D64))
    assert torch.equal(w0, torch.zeros(3, dtype=D64)) and torch.equal(Q0, torch.eye(3, dtype=D64))


def test_resnet_reaching_one_by_one_maps_equals_dense_definition():
    model = tiny_resnet()
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(16, 3, 8, 8, generator=g, dtype=D64), torch.arange(16) % 3
    est = ak.EKFACIFVP(damping=0.1, config=F64).fit(model, (X, y))
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert est.layers_ == convs
    assert all(type(model.get_submodule(n)).__name__ == "BatchNorm2d" for n in est.skipped_layers_)
    # layer3.conv2 sees 1 x 1 maps with padding 1: 8 of its 9 taps per channel are zero.
    w = est.input_eigenvalues_["layer3.conv2"]
    assert int((w == 0).sum()) == 5 * 8 and w.shape == (45,)
    truth = ekfac_of_model(model, X, y, convs)
    V = random_vectors(est)
    out = est.transform(V)
    for name, (QS, QA, lam) in truth.items():
        assert_close(est.lambdas_[name], lam, rtol=1e-9)
        module = model.get_submodule(name)
        v = V[f"{name}.weight"].reshape(3, module.weight.shape[0], -1)
        if module.bias is not None:
            v = torch.cat([v, V[f"{name}.bias"][:, :, None]], dim=2)
        expected = ekfac_ifvp(QS, QA, lam, 0.1, v)
        got = out[f"{name}.weight"].reshape(3, module.weight.shape[0], -1)
        assert_close(got, expected[:, :, : got.shape[2]], rtol=1e-9)


def failing(calls):
    def eigh(*args, **kwargs):
        calls.append(1)
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    return eigh


def scipy_fails(*args, **kwargs):
    import scipy.linalg

    raise scipy.linalg.LinAlgError("the eigenvalue algorithm did not converge")


def scipy_failing_with(driver, calls):
    """scipy.linalg.eigh that fails for one driver and counts every call by driver."""
    import scipy.linalg

    real = scipy.linalg.eigh

    def eigh(matrix, *args, **kwargs):
        calls.append(kwargs.get("driver"))
        if kwargs.get("driver") == driver:
            raise scipy.linalg.LinAlgError("the eigenvalue algorithm did not converge")
        return real(matrix, *args, **kwargs)

    return eigh


def test_failing_eigh_falls_back_to_scipy_then_names_the_layer(monkeypatch):
    import scipy.linalg

    from attribkit.ifvp import ekfac

    model, X, y = mlp_case()
    V = torch.randn(3, 39, dtype=D64)
    ref = ak.EKFACIFVP(damping=0.1, config=F64).fit(model, (X, y))
    # On the CPU: scipy's divide and conquer first; torch's eigh is never called.
    torch_calls, scipy_calls = [], []
    monkeypatch.setattr(torch.linalg, "eigh", failing(torch_calls))
    monkeypatch.setattr(scipy.linalg, "eigh", scipy_failing_with("evd", scipy_calls))
    est = ak.EKFACIFVP(damping=0.1, config=F64).fit(model, (X, y))
    assert torch_calls == [] and scipy_calls == ["evd", "evr"] * 4  # A and S of two layers
    assert_close(est.transform(V), ref.transform(V), rtol=1e-10)
    # Where torch decomposes first (a GPU), its failure falls back to scipy's MRRR.
    monkeypatch.setattr(ekfac, "_torch_first", lambda device: True)
    scipy_calls.clear()
    est = ak.EKFACIFVP(damping=0.1, config=F64).fit(model, (X, y))
    assert len(torch_calls) == 4 and scipy_calls == ["evr"] * 4
    assert_close(est.transform(V), ref.transform(V), rtol=1e-10)

    monkeypatch.setattr(scipy.linalg, "eigh", scipy_fails)
    match = r"input covariance A of layer '0' \(6 x 6\): torch.linalg.eigh failed .*'evr', 'ev'"
    with pytest.raises(ValueError, match=match):
        est.fit(model, (X, y))
    monkeypatch.setattr(ekfac, "_torch_first", lambda device: False)
    match = r"input covariance A of layer '0' \(6 x 6\): scipy.linalg.eigh failed .*'evd', 'evr'"
    with pytest.raises(ValueError, match=match):
        est.fit(model, (X, y))
    assert_close(est.transform(V), ref.transform(V), rtol=1e-10)  # the fit left it unchanged


def test_scipy_and_torch_decompositions_agree():
    """The CPU's scipy 'evd' and torch.linalg.eigh give the same decomposition to rounding."""
    from attribkit.ifvp.ekfac import eigh_psd

    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 40, generator=g, dtype=D64)
    cov = a.T @ a / 200
    w, Q = eigh_psd(cov)
    w_ref = torch.linalg.eigh(cov)[0]
    assert w.dtype == Q.dtype == D64 and Q.shape == (40, 40)
    assert_close(w, w_ref, rtol=1e-13, atol=1e-13 * float(w_ref.max()))
    assert_close(Q @ torch.diag(w) @ Q.T, cov, rtol=1e-13, atol=1e-13 * float(w_ref.max()))
    assert_close(Q.T @ Q, torch.eye(40, dtype=D64), rtol=0, atol=1e-13)
    w32, Q32 = eigh_psd(cov.float())
    assert w32.dtype == Q32.dtype == torch.float32
    assert_close(w32.double(), w_ref, rtol=1e-5, atol=1e-6 * float(w_ref.max()))


class TwoRanks:
    """A stand-in for the Reducer of rank ``rank`` of 2: sums are local, and a broadcast
    from the other rank delivers what ``remote`` makes of the buffer."""

    active, world_size = True, 2

    def __init__(self, rank, remote):
        self.rank, self.remote, self.broadcasts = rank, remote, []

    def sum_(self, *tensors):
        pass

    def broadcast_(self, flat, src):
        self.broadcasts.append(src)
        if src != self.rank:
            flat.copy_(self.remote(flat))


def two_layer_stats():
    g = torch.Generator().manual_seed(0)
    stats = EKFACStatistics([(3, 2), (4, 3)], ["first", "second"], device="cpu", dtype=D64)
    for k, (d_in, d_out) in enumerate(stats.dims):
        a = torch.randn(6, 2, d_in, generator=g, dtype=D64)
        stats.update_covariances(k, a, torch.randn(6, 2, d_out, generator=g, dtype=D64))
    return stats


def test_distributed_eigh_failure_raises_on_every_rank(monkeypatch):
    """Rank 0 decomposes layer 0, rank 1 layer 1: a failure reaches the broadcast first."""
    import scipy.linalg

    # Rank 1's layer failed there: its broadcast brings NaN eigenvalues.
    red = TwoRanks(0, lambda flat: torch.full_like(flat, float("nan")))
    with pytest.raises(ValueError, match="layer 'second' failed on rank 1"):
        two_layer_stats().finish_covariances(red)
    assert red.broadcasts == [0, 1]
    # This rank's own layer fails: it still joins both broadcasts, then raises its error.
    monkeypatch.setattr(torch.linalg, "eigh", failing([]))
    monkeypatch.setattr(scipy.linalg, "eigh", scipy_fails)
    red = TwoRanks(0, lambda flat: torch.zeros_like(flat))
    with pytest.raises(ValueError, match="input covariance A of layer 'first' .*'evr'"):
        two_layer_stats().finish_covariances(red)
    assert red.broadcasts == [0, 1]


def test_functional_ekfac_shares_the_eigh_fallbacks(monkeypatch):
    import scipy.linalg

    from attribkit.functional import EKFAC_CACHE_KEY, MLPCache, ifvp_at_x_ekfac

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2, bias=False)

        def forward(self, x):
            out = self.lin(x)
            getattr(self, EKFAC_CACHE_KEY).input_hidden_pairs.append((x, out))
            return out

    torch.manual_seed(0)
    net = Net().double()
    cache = MLPCache()
    setattr(net, EKFAC_CACHE_KEY, cache)
    X, Y = torch.randn(16, 4, dtype=D64), torch.randn(16, 2, dtype=D64)

    def losses(X, Y):
        cache.input_hidden_pairs.clear()
        return ((net(X) - Y) ** 2).sum(-1)

    monkeypatch.setattr(torch.linalg, "eigh", failing([]))
    v = torch.randn(2, 4, dtype=D64)
    ifvp_at_x_ekfac(losses, X, Y, batch_size=8, mlp_cache=cache, damping=0.1)([[v]])
    monkeypatch.setattr(scipy.linalg, "eigh", scipy_fails)
    with pytest.raises(ValueError, match="input covariance A of layer 'cache 0'"):
        ifvp_at_x_ekfac(losses, X, Y, batch_size=8, mlp_cache=cache, damping=0.1)


# --------------------------------------------------------------------------- padding
class MaskedTokens(nn.Module):
    """Linear layers on tokens with a masked mean over the real tokens, then a head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x, attention_mask):
        m = attention_mask.to(x.dtype)[..., None]
        h = torch.tanh(self.mix(torch.tanh(self.inp(x))))
        return self.out((h * m).sum(1) / m.sum(1))


def test_padded_tokens_enter_no_covariance():
    torch.manual_seed(0)
    model = MaskedTokens().double()
    lengths = [5, 3, 4, 2, 5, 1, 4, 3]
    g = torch.Generator().manual_seed(1)
    X = 3 * torch.randn(8, 5, 5, generator=g, dtype=D64)  # padding holds large garbage
    mask = (torch.arange(5)[None] < torch.tensor(lengths)[:, None]).long()
    y = torch.arange(8) % 3
    padded = ak.EKFACIFVP(damping=0.1, config=ak.ComputeConfig(dtype="float64", batch_size=3))
    padded.fit(model, ({"x": X, "attention_mask": mask}, y))
    alone = [
        ({"x": X[i : i + 1, :n], "attention_mask": mask[i : i + 1, :n]}, y[i : i + 1])
        for i, n in enumerate(lengths)
    ]
    ref = ak.EKFACIFVP(damping=0.1, config=F64).fit(model, alone)
    assert_same_factors(padded, ref)
    V = random_vectors(ref)
    for k, v in ref.transform(V).items():
        assert_close(padded.transform(V)[k], v, rtol=1e-10)


def test_gpt2_padded_batch_equals_the_sequences_unpadded():
    """A wrapped model and a callable loss: padding leaves the covariances through the mask.

    The wrapper stays on purpose (a user's own loss on ``(batch, vocab, T - 1)``
    outputs); the raw model with ``loss="causal_lm"`` is checked against the
    definition in tests/test_real_models_e2e.py.
    """
    model = LMLogits(tiny_gpt2(n_embd=8))
    lengths = [12, 7, 9, 4, 12, 10]
    ids, mask = padded_sequences(lengths, seed=5)
    cfg = ak.ComputeConfig(dtype="float64", batch_size=3, progress=False)
    padded = ak.EKFACIFVP(damping=0.1, loss=token_sum_ce, config=cfg)
    padded.fit(model, lm_batch(ids, mask))
    alone = [lm_batch(ids[i : i + 1, :n]) for i, n in enumerate(lengths)]
    ref = ak.EKFACIFVP(damping=0.1, loss=token_sum_ce, config=F64).fit(model, alone)
    assert_same_factors(padded, ref)
    V = random_vectors(ref)
    for k, v in ref.transform(V).items():
        assert_close(padded.transform(V)[k], v, rtol=1e-10)


# --------------------------------------------------------------------------- LoRA
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def lora(model, **config):
    """peft LoRA (rank 2) with random ``lora_B`` (peft starts it at 0: no gradient reaches A)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, **config))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def lora_modules(model):
    return [
        n for n, _ in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))
    ]


def test_lora_layers_are_exactly_the_default_layers():
    torch.manual_seed(0)
    model = lora(Small().double(), target_modules=["fc1", "fc2"])
    X, y = torch.randn(12, 5, dtype=D64), torch.randint(0, 3, (12,))
    est = no_coverage_warning(lambda: ak.EKFACIFVP(damping=0.1, config=F64).fit(model, (X, y)))
    assert est.layers_ == lora_modules(model) and len(est.layers_) == 4
    assert est.skipped_layers_ == []  # frozen base layers and the LoRA wrappers: not listed
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(est.param_shapes_) == trainable
    truth = ekfac_of_model(model, X, y, est.layers_)
    V = random_vectors(est)
    out = est.transform(V)
    for name, (QS, QA, lam) in truth.items():
        assert_close(est.lambdas_[name], lam, rtol=1e-9)
        expected = ekfac_ifvp(QS, QA, lam, 0.1, V[f"{name}.weight"])
        assert_close(out[f"{name}.weight"], expected, rtol=1e-9)


def test_lora_on_gpt2_conv1d_attention():
    model = lora(tiny_gpt2(), target_modules=["c_attn"], fan_in_fan_out=True)  # raw
    ids, mask = padded_sequences([10, 6, 8, 10], seed=6)
    data = {"input_ids": ids, "attention_mask": mask}
    est = no_coverage_warning(
        lambda: ak.EKFACIFVP(damping=0.1, loss="causal_lm", config=F64).fit(model, data)
    )
    assert est.layers_ == lora_modules(model) and len(est.layers_) == 4
    assert all(".attn.c_attn.lora_" in n for n in est.layers_)
    assert est.skipped_layers_ == []
    assert list(est.param_shapes_) == [n for n, p in model.named_parameters() if p.requires_grad]

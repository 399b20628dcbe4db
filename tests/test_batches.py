"""Batches and outputs as real models use them (API sections 7 and 9).

* Mapping batches (a Hugging Face batch): keyword arguments and ``"labels"``,
  in every container (a list of dicts, a DataLoader over a dataset of dicts,
  one mapping of stacked tensors), the causal-LM targets from ``input_ids``,
  non-tensor values passed to the model untouched;
* outputs a built-in loss reads: ``.logits``, a ``"logits"`` key, the first
  element of a tuple;
* every batch is checked, wherever in the data a problem is, in every
  model-mode entry point;
* every entry point works inside ``torch.inference_mode()``.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from cases import classification_data, mlp
from reference import assert_close
from torch import nn
from torch.utils.data import DataLoader

import attribkit as ak

F64 = ak.ComputeConfig(dtype="float64", batch_size=4, progress=False)


class KeywordMLP(nn.Module):
    """An MLP called with keyword arguments, as Hugging Face models are."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, features, scale=None, note=None, flag=False):
        out = self.net(features)
        if scale is not None:
            out = out * scale[:, None]
        return out


def keyword_model():
    torch.manual_seed(0)
    model = KeywordMLP().double()
    return model


def reference(model, X, y):
    return ak.per_example_gradients(model.net, (X, y), config=F64)


# --------------------------------------------------------------------------- mapping batches
def test_mapping_batches_in_every_container():
    model = keyword_model()
    X, y = classification_data()
    ref = reference(model, X, y)
    rows = [{"features": X[i], "labels": y[i]} for i in range(len(y))]
    for data in (
        [{"features": X[i : i + 5], "labels": y[i : i + 5]} for i in range(0, 12, 5)],
        DataLoader(rows, batch_size=5),  # collated into a dict of tensors
        {"features": X, "labels": y},  # one mapping of stacked tensors: batched here
        {"features": X.numpy(), "labels": y.numpy()},
    ):
        assert_close(ak.per_example_gradients(model, data, config=F64), ref, rtol=1e-12)


def test_whole_mapping_is_batched_by_config_batch_size():
    model = keyword_model()
    X, y = classification_data()
    seen = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(len(kw["features"])), with_kwargs=True
    )
    ak.per_example_gradients(model, {"features": X, "labels": y}, config=F64)
    assert seen == [4, 4, 4]


def test_values_that_are_not_tensors_reach_the_model_untouched():
    model = keyword_model()
    X, y = classification_data()
    note = ["a string", "the tokenizer", "kept"]
    seen = []

    def spy(module, args, kwargs):
        seen.append((kwargs["note"], kwargs["flag"]))

    model.register_forward_pre_hook(spy, with_kwargs=True)
    scale = torch.linspace(0.5, 2.0, 12, dtype=torch.float64)
    data = [
        {"features": X[:6], "scale": scale[:6], "note": note, "flag": True, "labels": y[:6]},
        {"features": X[6:], "scale": scale[6:], "note": note, "flag": True, "labels": y[6:]},
    ]
    got = ak.per_example_gradients(model, data, config=F64)
    assert seen and all(n is note and f is True for n, f in seen)

    class Scaled(nn.Module):  # the same model with the scale folded into the data
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x[:, :-1]) * x[:, -1:]

    wrapped = Scaled(model.net)
    expected = ak.per_example_gradients(
        wrapped, (torch.cat([X, scale[:, None]], 1), y), config=F64
    )
    assert_close(got, expected, rtol=1e-12)


def test_causal_lm_targets_are_the_input_ids_with_padding_ignored():
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(7, 5)
            self.head = nn.Linear(5, 7)

        def forward(self, input_ids, attention_mask=None):
            return self.head(torch.tanh(self.emb(input_ids)))

    model = TinyLM().double()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, -100, -100]])
    no_labels = ak.per_example_gradients(
        model, [{"input_ids": ids, "attention_mask": mask}], "causal_lm", config=F64
    )
    with_labels = ak.per_example_gradients(
        model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}], "causal_lm",
        config=F64,
    )  # fmt: skip
    assert_close(no_labels, with_labels, rtol=1e-12)
    alone = ak.per_example_gradients(model, [{"input_ids": ids[1:, :2]}], "causal_lm", config=F64)
    assert_close(no_labels[1], alone[0], rtol=1e-12)


@pytest.mark.parametrize(
    "batch, loss, match",
    [
        ({"features": "x"}, "cross_entropy", r"dict with keys \['features'\] and no 'labels'"),
        ({"input_ids": "x"}, "mse", r"no 'labels' key.*loss='causal_lm'"),
        ({"attention_mask": "m"}, "causal_lm", r"input_ids.*no 'input_ids' key"),
        ({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)},
         "causal_lm", r"attention_mask.*\(2, 4\)"),
        ({"features": torch.ones(2, 5), "labels": None}, "cross_entropy", "None"),
    ],
)  # fmt: skip
def test_mapping_batches_that_cannot_work_say_why(batch, loss, match):
    with pytest.raises(ValueError, match=match):
        ak.per_example_gradients(keyword_model(), [batch], loss=loss, config=F64)


# --------------------------------------------------------------------------- outputs
@dataclasses.dataclass
class Output:
    """A ModelOutput-like result: logits and something else."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    hidden: torch.Tensor


class Returns(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.net, self.kind = mlp(), kind

    def forward(self, x):
        out = self.net(x)
        if self.kind == "attribute":
            return Output(None, out, x)
        if self.kind == "key":
            return {"hidden": x, "logits": out}
        return (out, x)


@pytest.mark.parametrize("kind", ["attribute", "key", "tuple"])
def test_builtin_losses_read_the_logits_of_any_output(kind):
    torch.manual_seed(0)
    model = Returns(kind).double()
    X, y = classification_data()
    ref = ak.per_example_gradients(model.net, (X, y), config=F64)
    assert_close(ak.per_example_gradients(model, (X, y), config=F64), ref, rtol=1e-12)
    # The estimators too (ExplicitIFVP on a tuple output was an AttributeError).
    fisher = ak.ExplicitIFVP(damping=0.1, config=F64).fit(model, (X, y))
    direct = ak.ExplicitIFVP(damping=0.1, config=F64).fit(model.net, (X, y))
    assert_close(fisher.transform(ref), direct.transform(ref), rtol=1e-10)


def test_a_callable_loss_gets_the_raw_output():
    torch.manual_seed(0)
    model = Returns("attribute").double()
    X, y = classification_data()
    got = []

    def loss(outputs, targets):
        got.append(type(outputs))
        return torch.nn.functional.cross_entropy(outputs.logits, targets, reduction="none")

    G = ak.per_example_gradients(model, (X, y), loss=loss, config=F64)
    assert got and all(t is Output for t in got)
    assert_close(G, ak.per_example_gradients(model.net, (X, y), config=F64), rtol=1e-12)
    with pytest.raises(ValueError, match=r"per-example losses of shape \(batch,\)"):
        ak.per_example_gradients(model, (X, y), loss=lambda o, t: o.logits.sum(), config=F64)


def test_an_output_without_a_tensor_to_read_is_a_clear_error():
    class Words(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return {"words": "none"}

    with pytest.raises(ValueError, match=r"outputs.logits.*callable loss"):
        ak.per_example_gradients(Words().double(), classification_data(), config=F64)


# --------------------------------------------------------------------------- every batch checked
def bad_batches(problem):
    """Three batches of 4 from the mlp case, the third (or second) one broken."""
    X, y = classification_data()
    batches = [(X[i : i + 4], y[i : i + 4].clone()) for i in range(0, 12, 4)]
    if problem == "class 7":
        batches[2][1][1] = 7
    elif problem == "negative":
        batches[2][1][3] = -5
    elif problem == "length":
        batches[1] = (X[4:8], y[4:7])
    elif problem == "model":
        batches[2] = (X[8:12, :4], y[8:12])
    return batches


MESSAGES = {
    "class 7": r"batch 2 of 'data', example 1 of that batch \(example 9 of the data\) has the "
    r"target 7, out of range.*3 classes",
    "negative": r"batch 2 of 'data', example 3 .*\(example 11 of the data\) has the target -5",
    "length": r"Batch 1 of 'data' has 4 examples of inputs .* but 3 targets",
    "model": r"failed on batch 2 of 'data'.*mat1 and mat2",
}


def _fits():
    return {
        "per_example_gradients": lambda data: ak.per_example_gradients(mlp(), data, config=F64),
        "ExplicitIFVP": lambda data: ak.ExplicitIFVP(damping=0.1, config=F64).fit(mlp(), data),
        "DataInfIFVP": lambda data: ak.DataInfIFVP(config=F64).fit(mlp(), data),
        "EKFACIFVP": lambda data: ak.EKFACIFVP(config=F64).fit(mlp(), data),
        "ArnoldiProjector": lambda data: ak.ArnoldiProjector(
            proj_dim=2, max_iter=3, config=F64
        ).fit(mlp(), data),
        "KroneckerProjector": lambda data: ak.per_example_gradients(
            mlp(), data, projector=ak.KroneckerProjector(config=F64).fit(mlp())
        ),
        "RandomProjector": lambda data: ak.per_example_gradients(
            mlp(), data, projector=ak.RandomProjector(proj_dim=4, config=F64).fit(mlp())
        ),
    }


@pytest.mark.parametrize("problem", list(MESSAGES))
@pytest.mark.parametrize("entry", list(_fits()))
def test_every_batch_is_checked_in_every_entry_point(entry, problem):
    run = _fits()[entry]
    data = bad_batches(problem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Arnoldi's few-eigenpairs warning
        with pytest.raises(ValueError, match=MESSAGES[problem]):
            run(data)


def test_integer_features_say_to_convert_them():
    X, y = classification_data()
    data = (torch.randint(0, 3, X.shape), y)
    for run in (
        lambda: ak.EKFACIFVP(config=F64).fit(mlp(), data),
        lambda: ak.per_example_gradients(mlp(), data, config=F64),
    ):
        with pytest.raises(ValueError, match=r"(?s)same dtype.*integer tensors \(int64\).*float"):
            run()


# --------------------------------------------------------------------------- inference_mode
@pytest.mark.parametrize(
    "entry",
    ["per_example_gradients", "ExplicitIFVP", "DataInfIFVP", "EKFACIFVP", "ArnoldiProjector",
     "KroneckerProjector", "RandomProjector", "true Fisher"],
)  # fmt: skip
def test_every_entry_point_works_inside_inference_mode(entry):
    X, y = classification_data()
    V = torch.randn(2, 39, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(model, data):
        torch.manual_seed(0)
        if entry == "per_example_gradients":
            return ak.per_example_gradients(model, data, config=F64)
        if entry in ("KroneckerProjector", "RandomProjector"):
            proj = getattr(ak, entry)(config=F64).fit(model)
            return ak.per_example_gradients(model, data, projector=proj)
        if entry == "ArnoldiProjector":
            return (
                ak.ArnoldiProjector(proj_dim=3, max_iter=39, config=F64).fit(model, data).ihvp(V)
            )
        if entry == "true Fisher":
            return ak.EKFACIFVP(fisher="true", config=F64).fit(model, data).transform(V)
        kwargs = {"damping": 0.1} if entry == "ExplicitIFVP" else {}
        return getattr(ak, entry)(config=F64, **kwargs).fit(model, data).transform(V)

    model = mlp()
    outside = run(model, (X, y))
    with torch.inference_mode():
        Xi, yi = X.clone(), y.clone()  # inference tensors
        assert Xi.is_inference()
        inside = run(model, (Xi, yi))
    assert_close(inside, outside, rtol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_a_model_made_in_inference_mode_is_a_clear_error():
    with torch.inference_mode():
        model = mlp()
    with pytest.raises(ValueError, match=r"inference_mode\(\).*deepcopy"):
        ak.per_example_gradients(model, classification_data(), config=F64)

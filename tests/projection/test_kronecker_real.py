"""KroneckerProjector on real models (API 7): Conv1D, tied weights, LoRA, padded batches."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from cases import (
    conv1d_as_linear,
    conv1d_net,
    padded_sequences,
    tiny_gpt2,
    token_data,
)
from reference import assert_close, kronecker_projection
from torch import nn

import attribkit as ak
from attribkit._compute import capture

pytest.importorskip("transformers")

D64 = torch.float64
F64 = ak.ComputeConfig(dtype="float64", batch_size=4, progress=False)


def conv1d_weights(model):
    return {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}


def twin_vectors(kp, twin_kp, transposed, m=3, seed=1):
    """Random dict vectors in ``kp``'s layout and the same in the nn.Linear twin's layout."""
    g = torch.Generator().manual_seed(seed)
    V = {k: torch.randn(m, *s, generator=g, dtype=D64) for k, s in kp.param_shapes_.items()}
    W = {k: v.transpose(1, 2) if k in transposed else v for k, v in V.items()}
    assert {k: tuple(v.shape[1:]) for k, v in W.items()} == dict(twin_kp.param_shapes_)
    return V, W


def test_conv1d_equals_equivalent_linear_and_the_definition():
    model = conv1d_net()
    twin = conv1d_as_linear(model)
    kp = ak.KroneckerProjector(in_dim=3, out_dim=4, seed=2, config=F64).fit(model)
    ref = ak.KroneckerProjector(in_dim=3, out_dim=4, seed=2, config=F64).fit(twin)
    assert kp.layers_ == ref.layers_ == ["up", "mid", "head"]
    assert kp.layer_dims_ == ref.layer_dims_ and kp.proj_dim_ == ref.proj_dim_
    V, W = twin_vectors(kp, ref, conv1d_weights(model))
    assert_close(kp.transform(V), ref.transform(W), rtol=1e-12)
    covered, _ = capture.resolve_layers(model, kp.layers_)
    flat = torch.cat([v.reshape(3, -1) for v in V.values()], 1)
    assert_close(kp.transform(flat), kronecker_projection(kp, covered, flat), rtol=1e-12)
    # The hook path: the same projections as the twin's, and as the transform of
    # the per-example gradients.
    X, y = token_data(n=9, tokens=4)
    got = ak.per_example_gradients(model, (X, y), projector=kp, config=F64)
    assert_close(got, ak.per_example_gradients(twin, (X, y), projector=ref, config=F64))
    G = ak.per_example_gradients(model, (X, y), params=list(kp.param_shapes_), config=F64)
    assert_close(got, kp.transform(G), rtol=1e-10)


def test_gpt2_conv1d_equals_equivalent_linear():
    model = tiny_gpt2()  # raw: padded dict batches, loss="causal_lm"
    twin = conv1d_as_linear(model)
    kp = ak.KroneckerProjector(in_dim=4, out_dim=4, config=F64).fit(model)
    ref = ak.KroneckerProjector(in_dim=4, out_dim=4, config=F64).fit(twin)
    assert len(kp.layers_) == 8 and "lm_head" in kp.skipped_layers_  # tied
    V, W = twin_vectors(kp, ref, conv1d_weights(model))
    assert_close(kp.transform(V), ref.transform(W), rtol=1e-12)
    ids, mask = padded_sequences([10, 6, 9, 3, 10], seed=2)
    data = {"input_ids": ids, "attention_mask": mask}
    got = ak.per_example_gradients(model, data, loss="causal_lm", projector=kp, config=F64)
    expected = ak.per_example_gradients(twin, data, loss="causal_lm", projector=ref, config=F64)
    assert_close(got, expected, rtol=1e-10)
    # ... and the transform of the per-example gradients of the same padded batches.
    G = ak.per_example_gradients(
        model, data, loss="causal_lm", params=list(kp.param_shapes_), config=F64
    )
    assert_close(got, kp.transform(G), rtol=1e-10)


def test_conv1d_projector_round_trips_through_save(tmp_path):
    model = conv1d_net()
    kp = ak.KroneckerProjector(in_dim=3, out_dim=2, config=F64).fit(model)
    V = torch.randn(2, kp.n_features_in_, dtype=D64)
    ak.save(kp, tmp_path / "kp.safetensors")
    assert_close(ak.load(tmp_path / "kp.safetensors").transform(V), kp.transform(V), rtol=0)


class TiedLM(nn.Module):
    def __init__(self, vocab=12, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.body = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.emb(ids)))).mean(1)


def test_tied_weight_skipped_or_named_with_a_warning():
    torch.manual_seed(0)
    model = TiedLM().double()
    with pytest.warns(UserWarning, match="covers 29.4%"):
        kp = ak.KroneckerProjector(in_dim=3, out_dim=3, config=F64).fit(model)
    assert kp.layers_ == ["body"] and kp.skipped_layers_ == ["emb", "head"]
    assert "'emb.weight' is tied" in kp.skipped_reasons_["head"]
    with pytest.warns(UserWarning, match="projector=kp\\) projects the gradient of this use"):
        named = ak.KroneckerProjector(in_dim=3, out_dim=3, layers=["head"], config=F64)
        named.fit(model)
    assert list(named.param_shapes_.items()) == [("emb.weight", (12, 4))]
    g = torch.Generator().manual_seed(1)
    X, y = torch.randint(0, 12, (6, 3), generator=g), torch.randint(0, 12, (6,), generator=g)
    # The hook path projects the head's use: the untied twin's head gradient.
    untied = copy.deepcopy(model)
    untied.head.weight = nn.Parameter(model.emb.weight.detach().clone())
    G_head = ak.per_example_gradients(untied, (X, y), params=["head.weight"], config=F64)
    got = ak.per_example_gradients(model, (X, y), projector=named, config=F64)
    assert_close(got, named.transform(G_head), rtol=1e-10)
    # transform of the tied parameter's gradient (both uses) is another thing: it differs.
    G_tied = ak.per_example_gradients(model, (X, y), params=["emb.weight"], config=F64)
    assert not torch.allclose(named.transform(G_tied), got)


def test_lora_modules_are_the_default_layers():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kp = ak.KroneckerProjector(in_dim=2, out_dim=2, config=F64).fit(model)
    assert not [w for w in caught if "trainable parameters" in str(w.message)]
    assert kp.layers_ == [
        n for n, _ in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))
    ]
    assert kp.skipped_layers_ == []
    X, y = torch.randn(7, 5, dtype=D64), torch.randint(0, 3, (7,))
    G = ak.per_example_gradients(model, (X, y), params=list(kp.param_shapes_), config=F64)
    got = ak.per_example_gradients(model, (X, y), projector=kp, config=F64)
    assert_close(got, kp.transform(G), rtol=1e-10)

"""Per-example gradients from layer hooks: every rule, every fallback, the model left alone.

Each model is compared, in float64 to 1e-10, with one autograd call per
example (:func:`reference.loop_gradients`), and the test also says which
parameters must come from hooks and which must fall back (``vmap``, or the
per-example loop where ``vmap`` cannot run the model), since a fallback that
silently took over would still give the right numbers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import assert_close, loop_gradients
from torch import nn

import attribkit as ak
from attribkit._compute import gradients as hooks
from attribkit._compute.model import select_params

F64 = ak.ComputeConfig(dtype="float64", batch_size=4, progress=False)
D64 = torch.float64

# vmap over nn.MultiheadAttention (a fallback below) runs torch's slow batching fallback.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def loop(model, X, y, loss=F.cross_entropy, params=None):
    def one(i):
        return loss(model(X[i : i + 1]), y[i : i + 1])

    return loop_gradients(model, [lambda i=i: one(i) for i in range(len(y))], params=params)


@pytest.fixture
def fallbacks(monkeypatch):
    """The parameter names each batch's fallback differentiated, and how (vmap or loop)."""
    seen: list = []
    original = hooks._Fallback.__call__

    def spy(self, names, inputs, targets, index):
        out = original(self, names, inputs, targets, index)
        if names:
            seen.append((tuple(names), "loop" if self.loop else "vmap"))
        return out

    monkeypatch.setattr(hooks._Fallback, "__call__", spy)
    return seen


def ids(n=9, tokens=5, vocab=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, tokens), generator=g), torch.arange(n) % 3


def images(n=9, shape=(4, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=D64), torch.arange(n) % 3


# --------------------------------------------------------------------------- models
class Bag(nn.Module):
    """Token embeddings (with a padding row), a broadcast position embedding, a head."""

    def __init__(self, in_place=False):
        super().__init__()
        self.tok = nn.Embedding(7, 6, padding_idx=0)
        self.pos = nn.Embedding(5, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)
        self.in_place = in_place

    def forward(self, x):
        h = self.tok(x)
        positions = self.pos(torch.arange(x.shape[1])[None])  # (1, T, 6): shared by the batch
        if self.in_place:
            h += positions  # BERT adds them in place
        else:
            h = h + positions.to(h.dtype)  # GPT-2 moves/casts them first
        return self.head(torch.tanh(self.norm(h)).mean(1))


class Convs(nn.Module):
    """Grouped and depthwise convolutions, 1-D and 2-D, with padding modes; GroupNorm."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, 3, padding="same", padding_mode="circular", groups=2)
        self.dw = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6)
        self.gn = nn.GroupNorm(3, 6)
        self.c1d = nn.Conv1d(6, 4, 2, dilation=2, padding=1, padding_mode="reflect", bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.gn(self.dw(torch.tanh(self.c1(x))))  # (b, 6, 3, 3)
        h = self.c1d(torch.tanh(h.flatten(2)))  # (b, 4, L)
        return self.head(h.mean(2))


class Norms(nn.Module):
    """LayerNorm without bias and without affine, RMSNorm, BatchNorm2d in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.ln = nn.LayerNorm((3, 4, 4), bias=False)
        self.plain = nn.LayerNorm(5, elementwise_affine=False)
        self.rms = nn.RMSNorm(5, eps=None)
        self.lin = nn.Linear(48, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.ln(self.bn(self.conv(x)))
        h = self.rms(self.plain(self.lin(torch.tanh(h).flatten(1))))
        return self.head(torch.tanh(h))


def norms_model():
    torch.manual_seed(0)
    model = Norms().double()
    with torch.no_grad():  # running statistics unlike any batch's own
        model(2.0 + images(16, seed=7)[0])
    return model.eval()


class Tied(nn.Module):
    """An output layer tied to the embedding (GPT-2's lm_head), per-token logits."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.mix(self.emb(x))))


# --------------------------------------------------------------------------- rules
def test_embeddings_padding_row_and_broadcast_positions_come_from_hooks(fallbacks):
    for in_place in (False, True):
        torch.manual_seed(0)
        model = Bag(in_place).double()
        X, y = ids()
        X[:, -2:] = 0  # padding tokens: their row gets no gradient
        G = ak.per_example_gradients(model, (X, y), config=F64)
        assert_close(G, loop(model, X, y), rtol=1e-10)
    assert fallbacks == []
    assert G[:, :6].abs().max() == 0  # the padding row of tok.weight


def test_grouped_depthwise_1d_convolutions_and_group_norm_come_from_hooks(fallbacks):
    torch.manual_seed(0)
    model = Convs().double()
    X, y = images()
    assert_close(ak.per_example_gradients(model, (X, y), config=F64), loop(model, X, y))
    assert fallbacks == []


def test_layer_rms_and_eval_batch_norms_come_from_hooks(fallbacks):
    model = norms_model()
    X, y = images()
    assert_close(ak.per_example_gradients(model, (X, y), config=F64), loop(model, X, y))
    assert fallbacks == []


def test_tied_weight_is_named_once_and_sums_its_uses(fallbacks):
    torch.manual_seed(0)
    model = Tied().double()
    X, _ = ids()
    y = torch.roll(X, 1, dims=1)  # per-token targets (N, T), logits (N, T, 7)

    def seq_loss(out, t):
        return F.cross_entropy(out.transpose(1, 2), t, reduction="sum")

    G = ak.per_example_gradients(model, (X, y), config=F64, flatten=False)
    assert list(G) == ["emb.weight", "mix.weight", "mix.bias"]
    flat = torch.cat([g.flatten(1) for g in G.values()], 1)
    assert_close(flat, loop(model, X, y, seq_loss), rtol=1e-10)
    assert fallbacks == []


def test_frozen_parameters_asked_for_are_differentiated(fallbacks):
    torch.manual_seed(0)
    model = Bag().double()
    for p in model.parameters():
        p.requires_grad_(False)
    X, y = ids()
    names = ["tok.weight", "norm.weight", "head.bias"]
    G = ak.per_example_gradients(model, (X, y), params=names, config=F64)
    assert_close(G, loop(model, X, y, params=names), rtol=1e-10)
    assert not any(p.requires_grad for p in model.parameters())
    assert fallbacks == []


def test_a_users_hook_that_changes_an_output_is_differentiated_through():
    torch.manual_seed(0)
    model = Bag().double()
    model.head.register_forward_hook(lambda m, a, out: 2.0 * out + 1.0)
    model.norm.register_forward_pre_hook(lambda m, a: (a[0] * 3.0,))
    X, y = ids()
    assert_close(ak.per_example_gradients(model, (X, y), config=F64), loop(model, X, y))


# --------------------------------------------------------------------------- fallbacks
class Outside(nn.Module):
    """Parameters used outside the modules that hold them, and one no module holds."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        h = self.emb(x)
        h = torch.cat([self.cls.expand(len(x), 1, 6), h], 1)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = torch.tanh(self.lin(h))[:, 0]
        return F.linear(h, self.emb.weight[:3])  # the embedding again, as a head


def test_parameters_used_outside_their_modules_fall_back_to_vmap(fallbacks):
    torch.manual_seed(0)
    model = Outside().double()
    X, y = ids()
    assert_close(ak.per_example_gradients(model, (X, y), config=F64), loop(model, X, y))
    plan = hooks.GradientPlan(model, select_params(model, None, "test"))
    assert plan.fallback == ["cls", "attn.in_proj_weight", "attn.in_proj_bias"]
    names, how = fallbacks[0]
    # out_proj is an nn.Linear whose forward MultiheadAttention never calls; the
    # embedding's weight is also read by F.linear in the parent: both fall back.
    assert set(names) == {
        "cls", "emb.weight", "attn.in_proj_weight", "attn.in_proj_bias",
        "attn.out_proj.weight", "attn.out_proj.bias",
    }  # fmt: skip
    assert how == "vmap"


class Flattens(nn.Module):
    """A Linear called on rows of several examples flattened together."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.lin = nn.Linear(6, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(self.emb(x).reshape(-1, 6)).reshape(len(x), -1, 4)
        return self.head(torch.tanh(h).mean(1))


def test_a_module_that_is_not_batch_first_falls_back(fallbacks):
    torch.manual_seed(0)
    model = Flattens().double()
    X, y = ids()
    assert_close(ak.per_example_gradients(model, (X, y), config=F64), loop(model, X, y))
    assert {names for names, _ in fallbacks} == {("lin.weight", "lin.bias")}


class Branches(nn.Module):
    """Data-dependent control flow (vmap cannot run it) and a parameter no rule covers."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0, 1.0]))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        if bool((h.abs() > 100).any()):  # a padding-mask style check: fine on a batch
            h = h.clamp(-100, 100)
        return self.head(torch.tanh(h * self.scale))


def test_where_vmap_cannot_run_the_model_the_fallback_loops(fallbacks):
    torch.manual_seed(0)
    model = Branches().double()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(9, 4, generator=g, dtype=D64), torch.arange(9) % 3
    assert_close(ak.per_example_gradients(model, (X, y), config=F64), loop(model, X, y))
    assert fallbacks == [(("scale",), "loop")] * 3  # three batches, vmap tried once


# --------------------------------------------------------------------------- model state
@pytest.mark.parametrize("fisher", ["empirical", "true", "expected"])
def test_the_model_is_left_exactly_as_it_was_even_on_error(fisher):
    torch.manual_seed(0)
    model = Outside().double().train()
    model.lin.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    X, y = ids()
    y[7] = 5  # batch 1 (of 4, 4, 1) has a target out of range
    est = ak.ExplicitIFVP(damping=0.1, fisher=fisher, config=F64)
    with pytest.raises(ValueError, match="batch 1"):
        if fisher == "empirical":
            ak.per_example_gradients(model, (X, y), config=F64)
        else:
            est.fit(model, (X, y))  # "true"/"expected": the data's targets are checked too
    y[7] = 1
    torch.manual_seed(1)
    est.fit(model, (X, y))
    for module in model.modules():
        assert module.training
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_true_and_expected_fishers_from_hooks_match_their_definitions():
    """The hook path's weighted pseudo-gradients against the sampled / enumerated loops."""
    torch.manual_seed(0)
    model = Bag().double()
    X, y = ids()
    with torch.no_grad():
        probs = torch.softmax(model.eval()(X), 1)
    expected = ak.ExplicitIFVP(damping=0.1, fisher="expected", config=F64).fit(model, (X, y))
    rows = [probs[:, c, None].sqrt() * loop(model, X, torch.full_like(y, c)) for c in range(3)]
    G = torch.cat(rows)
    fisher = G.T @ G / len(y)
    V = torch.randn(2, fisher.shape[0], dtype=D64)
    assert_close(expected.inverse_transform(V), V @ fisher + 0.1 * V, rtol=1e-10)
    torch.manual_seed(4)
    true = ak.ExplicitIFVP(damping=0.1, fisher="true", config=F64).fit(model, (X, y))
    torch.manual_seed(4)  # the same draws, batch by batch of 4
    draws = torch.cat([torch.multinomial(probs[i : i + 4], 1)[:, 0] for i in range(0, 9, 4)])
    Gt = loop(model, X, draws)
    assert_close(true.inverse_transform(V), V @ (Gt.T @ Gt / len(y)) + 0.1 * V, rtol=1e-10)

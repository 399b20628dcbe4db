"""Real models, raw (API section 7): GPT-2, a BERT classifier, peft LoRA and a BatchNorm CNN.

Every model is randomly initialised from a small configuration (nothing is
downloaded) and evaluated in float64, so that per-example gradients from
padded dict batches can be held to 1e-10 against one autograd call per
sequence, run on that sequence alone and unpadded.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import assert_close, loop_gradients
from torch import nn

import attribkit as ak

transformers = pytest.importorskip("transformers")

F64 = ak.ComputeConfig(dtype="float64", batch_size=3, progress=False)
VOCAB, PAD = 40, 0


# --------------------------------------------------------------------------- models, data
def gpt2(attn="eager", seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=12, n_layer=2, n_head=2,
        bos_token_id=PAD, eos_token_id=PAD, attn_implementation=attn,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double().eval()


def bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=12, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=16, num_labels=3, pad_token_id=PAD,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).double().eval()


LENGTHS = [9, 6, 9, 4, 7, 9, 5]


def sequences(lengths=LENGTHS, width=9, seed=1):
    """Token ids ``(n, width)`` right-padded with ``PAD``, and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def dict_batches(ids, mask, size=3, **extra):
    """Padded dict batches as a collator makes them (extra keys sliced alike)."""
    return [
        {"input_ids": ids[i : i + size], "attention_mask": mask[i : i + size]}
        | {k: v[i : i + size] for k, v in extra.items()}
        for i in range(0, len(ids), size)
    ]


def causal_lm_loops(model, ids, lengths):
    """One zero-argument loss per sequence: the LM loss of the sequence alone, unpadded."""

    def loss(i):
        x = ids[i : i + 1, : lengths[i]]
        logits = model(input_ids=x).logits[0, :-1]
        return F.cross_entropy(logits, x[0, 1:], reduction="sum")

    return [lambda i=i: loss(i) for i in range(len(lengths))]


# --------------------------------------------------------------------------- GPT-2
@pytest.mark.parametrize("with_labels", [False, True])
def test_gpt2_padded_dict_batches_equal_the_loop_on_unpadded_sequences(with_labels):
    model = gpt2()
    ids, mask = sequences()
    extra = {"labels": ids.masked_fill(mask == 0, -100)} if with_labels else {}
    G = ak.per_example_gradients(model, dict_batches(ids, mask, **extra), "causal_lm", config=F64)
    # Padding invariance: each row is the gradient of its sequence alone, unpadded.
    assert_close(G, loop_gradients(model, causal_lm_loops(model, ids, LENGTHS)), rtol=1e-10)
    assert not any(p.grad is not None for p in model.parameters())


def test_gpt2_tied_head_is_one_parameter_summing_both_uses():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and names[0] == "transformer.wte.weight"
    ids, mask = sequences()
    data = dict_batches(ids, mask)
    G = ak.per_example_gradients(model, data, "causal_lm", config=F64, flatten=False)
    assert list(G) == names
    ref = loop_gradients(
        model, causal_lm_loops(model, ids, LENGTHS), params=["transformer.wte.weight"]
    )
    assert_close(G["transformer.wte.weight"].flatten(1), ref, rtol=1e-10)
    # The head's use alone would differ: the embedding's rows of unseen tokens get head
    # gradient only, and the rows of seen tokens both.
    assert G["transformer.wte.weight"].abs().sum(2).gt(0).all()


def test_gpt2_true_fisher_leaves_padding_out():
    """fisher="true" samples one token per position; padded positions stay ignored.

    Whatever the ids at padded positions, the fit is the same: the samples at
    real positions do not depend on them (causal attention, same draws) and
    the padded ones are ignored.
    """
    model = gpt2()
    ids, mask = sequences()
    noise = torch.randint(1, VOCAB, ids.shape, generator=torch.Generator().manual_seed(9))
    params = ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    fits = []
    for padded in (ids, torch.where(mask == 1, ids, noise)):
        torch.manual_seed(3)
        est = ak.ExplicitIFVP(
            damping="auto", fisher="true", loss="causal_lm", params=params, config=F64
        )
        fits.append(est.fit(model, dict_batches(padded, mask)))
    V = torch.randn(3, 24, dtype=torch.float64)
    assert_close(fits[0].inverse_transform(V), fits[1].inverse_transform(V), rtol=1e-10)
    with pytest.raises(ValueError, match="fisher='true'"):
        ak.ExplicitIFVP(fisher="expected", loss="causal_lm").fit(model, dict_batches(ids, mask))


def test_gpt2_top_proponent_of_a_training_sequence_is_itself():
    model = gpt2()
    ids, mask = sequences()
    data = dict_batches(ids, mask)
    G = ak.per_example_gradients(model, data, "causal_lm", config=F64)
    datainf = ak.DataInfIFVP(loss="causal_lm", config=F64).fit(model, data)
    _, top, _, _ = ak.influence(datainf, G, G, top_k=1)
    assert top[:, 0].tolist() == list(range(len(LENGTHS)))


def _dense_hessian_of_mean_lm_loss(model, ids, lengths, names):
    """The Hessian of the mean causal-LM loss over the unpadded sequences, in ``names``."""
    params = dict(model.named_parameters())
    base = {n: p.detach() for n, p in params.items()}
    shapes = [params[n].shape for n in names]
    theta = torch.cat([base[n].reshape(-1) for n in names])

    def mean_loss(v):
        state, i = dict(base), 0
        for n, s in zip(names, shapes):
            state[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        total = 0.0
        for j, L in enumerate(lengths):
            x = ids[j : j + 1, :L]
            logits = torch.func.functional_call(model, state, (), {"input_ids": x}).logits
            total = total + F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        return total / len(lengths)

    return torch.func.hessian(mean_loss)(theta)


@pytest.mark.parametrize("mode", ["rev-fwd", "rev-rev"])
def test_arnoldi_on_gpt2_with_eager_attention_matches_the_dense_hessian(mode):
    model = gpt2("eager")
    ids, mask = sequences(LENGTHS[:4])
    names = ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    est = ak.ArnoldiProjector(
        proj_dim=4, max_iter=24, mode=mode, loss="causal_lm", params=names, config=F64
    )
    with warnings.catch_warnings():  # an indefinite Hessian warns, whatever its spectrum
        warnings.simplefilter("ignore", UserWarning)
        est.fit(model, dict_batches(ids, mask))
    H = _dense_hessian_of_mean_lm_loss(model, ids, LENGTHS[:4], names)
    dense = torch.linalg.eigvalsh(H)
    top = dense[dense.abs().argsort(descending=True)[:4]]
    assert_close(est.eigenvalues_.sort().values, top.sort().values, rtol=1e-8)


@pytest.mark.parametrize("mode", ["rev-fwd", "rev-rev"])
def test_arnoldi_with_sdpa_attention_says_to_load_eager(mode):
    model = gpt2("sdpa")
    ids, mask = sequences(LENGTHS[:3])
    est = ak.ArnoldiProjector(proj_dim=2, max_iter=4, mode=mode, loss="causal_lm", config=F64)
    with pytest.raises(ValueError, match=r'(?s)batch 0.*attention.*attn_implementation="eager"'):
        est.fit(model, dict_batches(ids, mask))


def _dense_ggn_of_mean_lm_loss(model, ids, lengths, names):
    """The Gauss-Newton matrix of the mean causal-LM loss over the unpadded sequences.

    ``(1/n) sum_j J_j^T H_j J_j``: ``J_j`` the Jacobian of sequence ``j``'s shifted
    logits in ``names`` (``jacrev``), ``H_j`` the Hessian of its summed token cross
    entropies in those logits (``hessian``).
    """
    params = dict(model.named_parameters())
    base = {n: p.detach() for n, p in params.items()}
    shapes = [params[n].shape for n in names]
    theta = torch.cat([base[n].reshape(-1) for n in names])
    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for j, L in enumerate(lengths):
        x = ids[j : j + 1, :L]

        def logits(v, x=x):
            state, i = dict(base), 0
            for n, s in zip(names, shapes):
                state[n] = v[i : i + s.numel()].reshape(s)
                i += s.numel()
            return torch.func.functional_call(model, state, (), {"input_ids": x}).logits[0, :-1]

        out = logits(theta).detach()
        J = torch.func.jacrev(logits)(theta).reshape(out.numel(), -1)
        H = torch.func.hessian(lambda o, x=x: F.cross_entropy(o, x[0, 1:], reduction="sum"))(out)
        H = H.reshape(out.numel(), out.numel())
        total += J.T @ H @ J
    return total / len(lengths)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_iterative_ggn_on_gpt2_is_the_exact_inverse_over_the_unpadded_sequences(attn):
    """IterativeIFVP on the raw model and padded dict batches (API sections 7 and 8)."""
    model = gpt2(attn)
    ids, mask = sequences()
    names = [
        "transformer.ln_f.weight", "transformer.ln_f.bias", "transformer.h.1.attn.c_proj.weight",
    ]  # fmt: skip
    est = ak.IterativeIFVP(
        damping=0.1, loss="causal_lm", params=names, tol=1e-12, max_iter=300, config=F64
    ).fit(model, dict_batches(ids, mask))
    assert list(est.param_shapes_) == [names[2], names[0], names[1]]  # the model's order
    G = _dense_ggn_of_mean_lm_loss(model, ids, LENGTHS, list(est.param_shapes_))
    assert est.n_features_in_ == G.shape[0] == 144 + 12 + 12
    V = torch.randn(3, G.shape[0], generator=torch.Generator().manual_seed(4), dtype=G.dtype)
    X, info = est.solve(V)
    expected = torch.linalg.solve(G + 0.1 * torch.eye(G.shape[0], dtype=G.dtype), V.T).T
    assert_close(X, expected, rtol=1e-8)
    assert (info["residual"] <= 1e-12).all()
    assert all(p.grad is None for p in model.parameters()) and not model.training

    # A callable loss gets the raw output (with its past_key_values cache): the same.
    def causal_lm(out, targets):
        logits = out.logits[:, :-1].transpose(1, 2)
        return F.cross_entropy(logits, targets[:, 1:], reduction="none").sum(1)

    targets = ids.masked_fill(mask == 0, -100)
    pairs = [(b, targets[i : i + 3]) for i, b in zip(range(0, 7, 3), dict_batches(ids, mask))]
    own = ak.IterativeIFVP(
        damping=0.1, loss=causal_lm, params=names, tol=1e-12, max_iter=300, config=F64
    ).fit(model, pairs)
    assert_close(own.transform(V), expected, rtol=1e-8)


def test_iterative_ggn_with_sdpa_attention_says_to_load_eager():
    # Head dimension 8 selects PyTorch's CPU flash-attention kernel, which has no
    # forward-mode rule (with head dimension 6, as in gpt2() above, SDPA runs its
    # differentiable math kernel and the product works).
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
        bos_token_id=PAD, eos_token_id=PAD, attn_implementation="sdpa",
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids, mask = sequences(LENGTHS[:3])
    est = ak.IterativeIFVP(damping=0.1, max_iter=3, loss="causal_lm", config=F64)
    match = r'(?s)IterativeIFVP: the Gauss-Newton product .*batch 0.*attn_implementation="eager"'
    with pytest.raises(ValueError, match=match):
        est.fit(model, dict_batches(ids, mask))
    assert not model.training and all(p.grad is None for p in model.parameters())
    model.set_attn_implementation("eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3 iterations do not converge
        est.fit(model, dict_batches(ids, mask))
        V = torch.randn(1, est.n_features_in_, dtype=torch.float64)
        assert torch.isfinite(est.transform(V)).all()


# --------------------------------------------------------------------------- BERT
def test_bert_classifier_padded_batches_with_labels_equal_the_loop():
    model = bert()
    ids, mask = sequences()
    labels = torch.arange(len(LENGTHS)) % 3
    data = dict_batches(ids, mask, labels=labels)
    G = ak.per_example_gradients(model, data, config=F64)

    def loss(i):
        logits = model(input_ids=ids[i : i + 1, : LENGTHS[i]]).logits
        return F.cross_entropy(logits, labels[i : i + 1])

    ref = loop_gradients(model, [lambda i=i: loss(i) for i in range(len(LENGTHS))])
    assert_close(G, ref, rtol=1e-10)
    explicit = ak.ExplicitIFVP(damping="auto", params=["classifier.weight"], config=F64)
    explicit.fit(model, data)
    Gc = ak.per_example_gradients(model, data, params=["classifier.weight"], config=F64)
    assert_close(
        explicit.inverse_transform(explicit.transform(Gc)), Gc, rtol=1e-8
    )  # F and its inverse, on the fitted gradients


# --------------------------------------------------------------------------- LoRA
def test_lora_on_gpt2_covers_exactly_the_adapters():
    peft = pytest.importorskip("peft")
    base = gpt2()
    config = peft.LoraConfig(
        r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_dropout=0.0,
        init_lora_weights=False,  # random lora_B, as after fine-tuning
    )  # fmt: skip
    lora = peft.get_peft_model(base, config).double()
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids, mask = sequences()
    data = dict_batches(ids, mask)
    datainf = ak.DataInfIFVP(loss="causal_lm", config=F64).fit(lora, data)
    assert list(datainf.param_shapes_) == trainable
    G = ak.per_example_gradients(lora, data, "causal_lm", config=F64)
    ref = loop_gradients(lora, causal_lm_loops(lora, ids, LENGTHS))
    assert G.shape[1] == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert_close(G, ref, rtol=1e-10)
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == trainable


# --------------------------------------------------------------------------- CNN
class Block(nn.Module):
    """A ResNet basic block: two 3x3 conv-BN pairs and a (projected) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """8x8 images down to 1x1 maps in the last block (as ResNet18's layer4 at 32x32)."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4))
        self.blocks = nn.Sequential(Block(4, 4, 1), Block(4, 6, 2), Block(6, 6, 2), Block(6, 8, 2))
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        h = self.blocks(F.relu(self.stem(x)))  # (b, 8, 1, 1)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def resnet():
    torch.manual_seed(0)
    model = TinyResNet().double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # running statistics that differ from any batch's own
        for _ in range(3):
            model(1.0 + 2.0 * torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64))
    return model.eval()


def test_resnet_with_batchnorm_on_1x1_maps_equals_the_loop():
    model = resnet()
    g = torch.Generator().manual_seed(6)
    X, y = torch.randn(7, 3, 8, 8, generator=g, dtype=torch.float64), torch.arange(7) % 3
    G = ak.per_example_gradients(model, (X, y), config=F64)

    def loss(i):
        return F.cross_entropy(model(X[i : i + 1]), y[i : i + 1])

    assert_close(G, loop_gradients(model, [lambda i=i: loss(i) for i in range(7)]), rtol=1e-10)
    datainf = ak.DataInfIFVP(config=F64).fit(model, (X, y))
    assert datainf.n_features_in_ == G.shape[1]
    head = ["blocks.3.bn2.weight", "blocks.3.bn2.bias", "fc.weight", "fc.bias"]
    explicit = ak.ExplicitIFVP(damping=0.1, params=head, config=F64).fit(model, (X, y))
    Gh = ak.per_example_gradients(model, (X, y), params=head, config=F64)
    F_dense = Gh.T @ Gh / 7 + 0.1 * torch.eye(Gh.shape[1], dtype=torch.float64)
    assert_close(explicit.transform(Gh), torch.linalg.solve(F_dense, Gh.T).T, rtol=1e-9)

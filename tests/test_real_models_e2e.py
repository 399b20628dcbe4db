"""Real models end to end, raw, as a user meets them (API section 7, issue 18).

Each test takes a model the way the README and ``docs/guide/transformers.rst``
say, with no wrapper, and goes from ``fit`` to scores: a random-init GPT-2
(``Conv1D`` layers, ``lm_head`` tied to ``wte``) on padded dict batches with
``loss="causal_lm"``, with and without ``"labels"``; a BERT classifier on
padded batches with ``"labels"``; peft LoRA on GPT-2; a ResNet-style CNN with
BatchNorm whose last stage sees 1 x 1 maps; and a torchrun-style two-process
gloo fit of EK-FAC on BERT.

The references are independent of attribkit's capture and computed on every
sequence *alone and unpadded*, one autograd call each (float64): the EK-FAC
factors from the definition (plain forward hooks on the covered modules, the
covariances over all real tokens), per-example gradients from
:func:`reference.loop_gradients`, Kronecker projections as ``transform`` of
those gradients. So every comparison is also a padding-invariance check.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import traceback
import warnings

import pytest
import torch
import torch.nn.functional as F
from cases import lora_gpt2, padded_sequences, tiny_bert, tiny_gpt2, tiny_resnet
from reference import assert_close, ekfac_factors, ekfac_ifvp, loop_gradients

import attribkit as ak

pytest.importorskip("transformers")

D64 = torch.float64
F64 = ak.ComputeConfig(dtype="float64", batch_size=3, progress=False)
LENGTHS = [9, 6, 9, 4, 7, 9, 5]
DAMPING = 0.1


# --------------------------------------------------------------------------- data
def padded(lengths=LENGTHS, seed=1):
    """Token ids right-padded with 0 to the longest length, and the attention mask."""
    return padded_sequences(lengths, seed=seed)


def dict_batches(ids, mask, size=3, **extra):
    """Padded dict batches as a collator makes them (``extra`` keys sliced alike)."""
    return [
        {"input_ids": ids[i : i + size], "attention_mask": mask[i : i + size]}
        | {k: v[i : i + size] for k, v in extra.items()}
        for i in range(0, len(ids), size)
    ]


def lm_examples(ids, lengths):
    """Per sequence, alone and unpadded: ``(kwargs, loss(outputs))`` of the causal-LM loss."""
    out = []
    for i, n in enumerate(lengths):
        x = ids[i : i + 1, :n]
        out.append(
            (
                {"input_ids": x},
                lambda o, x=x: F.cross_entropy(o.logits[0, :-1], x[0, 1:], reduction="sum"),
            )
        )
    return out


def classifier_examples(ids, lengths, labels):
    """Per sequence, alone and unpadded: ``(kwargs, loss(outputs))`` of the cross entropy."""
    return [
        (
            {"input_ids": ids[i : i + 1, :n]},
            lambda o, t=labels[i : i + 1]: F.cross_entropy(o.logits, t),
        )
        for i, n in enumerate(lengths)
    ]


def loop(model, examples, params=None):
    """Per-example gradients, one autograd call per example alone (the reference)."""
    calls = [lambda kw=kw, loss=loss: loss(model(**kw)) for kw, loss in examples]
    return loop_gradients(model, calls, params=params)


# --------------------------------------------------------------------------- EK-FAC definition
def is_conv1d(module):
    return type(module).__name__ == "Conv1D"


def gradient_matrix(module, weight_grad, bias_grad):
    """One example's layer gradient ``(d_out, d_in)`` (``Conv1D`` weights are ``(in, out)``)."""
    G = weight_grad.T if is_conv1d(module) else weight_grad
    return G if bias_grad is None else torch.cat([G, bias_grad[:, None]], dim=1)


def ekfac_definition(model, examples, layers):
    """``name -> (Q_S, Q_A, Λ, A, S)`` of the named layers, from the definition.

    Every example runs alone (a batch of one, unpadded): plain forward hooks
    record each layer's input rows ``a`` (ones appended for a bias) and output
    ``o``; ``s`` is the gradient of the example's loss at ``o``; the example's
    gradient of the layer's weight and bias comes from the same autograd call.
    ``A`` and ``S`` average over all rows of all examples, ``Λ`` over examples.
    """
    modules = dict(model.named_modules())
    rows = {n: ([], []) for n in layers}
    grads = {n: [] for n in layers}
    seen = {}

    def hook(name):
        def record(module, args, output):
            seen[name] = (args[0].detach(), output)

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        for kwargs, loss in examples:
            value = loss(model(**kwargs))
            params = [
                p for n in layers for p in (modules[n].weight, modules[n].bias) if p is not None
            ]
            outs = [seen[n][1] for n in layers]
            got = list(torch.autograd.grad(value, outs + params))
            s_all, flat = got[: len(layers)], got[len(layers) :]
            for n, s in zip(layers, s_all):
                module, x = modules[n], seen[n][0]
                a = x.reshape(-1, x.shape[-1])
                if module.bias is not None:
                    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
                rows[n][0].append(a)
                rows[n][1].append(s.reshape(-1, s.shape[-1]))
                w = flat.pop(0)
                b = flat.pop(0) if module.bias is not None else None
                grads[n].append(gradient_matrix(module, w, b))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in layers:
        a, s = torch.cat(rows[n][0]), torch.cat(rows[n][1])
        QS, QA, lam = ekfac_factors(a, [s], [torch.stack(grads[n])])
        out[n] = (QS, QA, lam, a.T @ a / a.shape[0], s.T @ s / s.shape[0])
    return out


def random_vectors(est, m=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(m, *s, generator=g, dtype=D64) for k, s in est.param_shapes_.items()}


def as_matrix(module, weight, bias):
    """Vectors of a layer's weight and bias as ``(m, d_out, d_in)`` (bias last)."""
    M = weight.transpose(1, 2) if is_conv1d(module) else weight
    return M if bias is None else torch.cat([M, bias[:, :, None]], dim=2)


def assert_ekfac_is_the_definition(est, model, truth):
    """Covariances, and ``transform`` of random vectors, against :func:`ekfac_definition`.

    ``transform`` is compared rather than ``Λ`` itself: where ``A`` has a
    repeated (zero) eigenvalue the basis, and so ``Λ``, is not unique, while
    ``(F + damping I)^{-1}`` is.
    """
    assert list(truth) == est.layers_
    V = random_vectors(est)
    out = est.transform(V)
    for name, (QS, QA, lam, A, S) in truth.items():
        for side, C in (("input", A), ("output", S)):
            w = getattr(est, f"{side}_eigenvalues_")[name]
            Q = getattr(est, f"{side}_eigenvectors_")[name]
            assert_close((Q * w) @ Q.T, C, rtol=1e-10, atol=1e-13 * float(C.abs().max()))
        module = model.get_submodule(name)
        bias = f"{name}.bias" if module.bias is not None else None
        expected = ekfac_ifvp(
            QS, QA, lam, DAMPING, as_matrix(module, V[f"{name}.weight"], V.get(bias))
        )
        got = as_matrix(module, out[f"{name}.weight"], out.get(bias))
        assert_close(got, expected, rtol=1e-9)


# --------------------------------------------------------------------------- the model, untouched
def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def assert_untouched(model, before):
    """Weights and buffers (BatchNorm statistics) equal, modes and flags restored, no hook left."""
    state, modes, flags = before
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


@contextlib.contextmanager
def first_try():
    """attribkit's warnings are errors: a documented use needs no fixing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


def conv1d_layers(model):
    return [n for n, m in model.named_modules() if is_conv1d(m)]


def top_proponents(ifvp, train, test):
    _, top, _, _ = ak.influence(ifvp, train, test, top_k=1)
    return top[:, 0].tolist()


# --------------------------------------------------------------------------- GPT-2
def lm_data(with_labels):
    """Padded dict batches of :data:`LENGTHS` sequences; ``"labels"``: ids, ``-100`` at padding."""
    ids, mask = padded()
    extra = {"labels": ids.masked_fill(mask == 0, -100)} if with_labels else {}
    return ids, dict_batches(ids, mask, **extra)


@pytest.mark.parametrize("with_labels", [False, True], ids=["input_ids", "labels"])
def test_gpt2_ekfac_is_the_definition_on_the_sequences_alone(with_labels):
    model = tiny_gpt2()
    ids, data = lm_data(with_labels)
    before = snapshot(model)
    with first_try():
        est = ak.EKFACIFVP(damping=DAMPING, loss="causal_lm", config=F64).fit(model, data)
    assert_untouched(model, before)
    assert est.layers_ == conv1d_layers(model) and len(est.layers_) == 8  # attention and MLP
    assert est.param_shapes_["transformer.h.0.attn.c_attn.weight"] == (16, 48)  # Conv1D: (in, out)
    # The tied head is left out (its factors would describe one use of wte.weight).
    assert est.skipped_layers_[-1] == "lm_head"
    assert "'transformer.wte.weight' is tied to" in est.skipped_reasons_["lm_head"]
    truth = ekfac_definition(model, lm_examples(ids, LENGTHS), est.layers_)
    assert_ekfac_is_the_definition(est, model, truth)


@pytest.mark.parametrize("with_labels", [False, True], ids=["input_ids", "labels"])
def test_gpt2_kronecker_projection_of_padded_batches(with_labels):
    model = tiny_gpt2()
    ids, data = lm_data(with_labels)
    with first_try():
        kp = ak.KroneckerProjector(in_dim=4, out_dim=4, config=F64).fit(model)
    assert kp.layers_ == conv1d_layers(model) and "lm_head" in kp.skipped_layers_
    before = snapshot(model)
    got = ak.per_example_gradients(model, data, loss="causal_lm", projector=kp, config=F64)
    assert_untouched(model, before)
    G = loop(model, lm_examples(ids, LENGTHS), params=list(kp.param_shapes_))
    assert_close(got, kp.transform(G), rtol=1e-10)


def test_gpt2_readme_recipe_and_the_tied_head():
    model = tiny_gpt2()
    ids, data = lm_data(with_labels=False)
    ekfac = ak.EKFACIFVP(damping="auto", loss="causal_lm", config=F64).fit(model, data)
    # The README recipe: param_shapes_ names parameters the model has.
    params = list(ekfac.param_shapes_)
    assert "lm_head.weight" not in params
    G = ak.per_example_gradients(model, data, loss="causal_lm", params=params, config=F64)
    assert_close(G, loop(model, lm_examples(ids, LENGTHS), params=params), rtol=1e-10)
    # Named, the head is covered under the embedding's name, with a warning.
    with pytest.warns(
        UserWarning, match="'lm_head', whose weight 'transformer.wte.weight' is tied"
    ):
        head = ak.EKFACIFVP(layers=["lm_head"], loss="causal_lm", config=F64).fit(model, data)
    assert list(head.param_shapes_.items()) == [("transformer.wte.weight", (40, 16))]
    # With a vocabulary of realistic weight the embedding dominates, and fit says so.
    big = tiny_gpt2(vocab=2000)
    coverage = r"covers 16\.6% .* \(6,432 of 38,848\) .*'transformer\.wte' \(Embedding, 32,000\)"
    with pytest.warns(UserWarning, match=coverage):
        ak.EKFACIFVP(loss="causal_lm", config=F64).fit(big, data)


def test_gpt2_training_sequence_is_its_own_top_proponent():
    model = tiny_gpt2()
    ids, train = lm_data(with_labels=False)
    picked = [1, 3, 5]
    # The test sequences alone, unpadded, without a mask: the same gradients.
    test = [{"input_ids": ids[i : i + 1, : LENGTHS[i]]} for i in picked]
    ekfac = ak.EKFACIFVP(damping="auto", loss="causal_lm", config=F64).fit(model, train)
    params = list(ekfac.param_shapes_)
    G_train = ak.per_example_gradients(model, train, "causal_lm", params=params, config=F64)
    G_test = ak.per_example_gradients(model, test, "causal_lm", params=params, config=F64)
    assert_close(G_test, G_train[picked], rtol=1e-10)
    assert top_proponents(ekfac, G_train, G_test) == picked
    # Kronecker projection (hooks: no per-example gradient formed), then the exact inverse.
    kp = ak.KroneckerProjector(in_dim=4, out_dim=4, config=F64).fit(model)
    P_train = ak.per_example_gradients(model, train, "causal_lm", projector=kp, config=F64)
    P_test = ak.per_example_gradients(model, test, "causal_lm", projector=kp, config=F64)
    explicit = ak.ExplicitIFVP(damping="auto", config=F64).fit(P_train)
    assert top_proponents(explicit, P_train, P_test) == picked


# --------------------------------------------------------------------------- BERT
def bert_data():
    ids, mask = padded()
    labels = torch.arange(len(LENGTHS)) % 3
    return ids, labels, dict_batches(ids, mask, labels=labels)


def test_bert_classifier_ekfac_is_the_definition_and_scores():
    model = tiny_bert()
    ids, labels, data = bert_data()
    before = snapshot(model)
    with first_try():
        est = ak.EKFACIFVP(damping=DAMPING, config=F64).fit(model, data)
    assert_untouched(model, before)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert est.layers_ == linears and est.layers_[-2:] == ["bert.pooler.dense", "classifier"]
    # Token layers: covariances over the real tokens; pooler and head: one row per example.
    truth = ekfac_definition(model, classifier_examples(ids, LENGTHS, labels), est.layers_)
    assert_ekfac_is_the_definition(est, model, truth)
    params = list(est.param_shapes_)
    G = ak.per_example_gradients(model, data, params=params, config=F64)
    assert_close(G, loop(model, classifier_examples(ids, LENGTHS, labels), params), rtol=1e-10)
    assert top_proponents(est, G, G[[0, 4]]) == [0, 4]


def test_bert_kronecker_projection_of_padded_batches():
    model = tiny_bert()
    ids, labels, data = bert_data()
    with first_try():
        kp = ak.KroneckerProjector(in_dim=3, out_dim=3, config=F64).fit(model)
    got = ak.per_example_gradients(model, data, projector=kp, config=F64)
    G = loop(model, classifier_examples(ids, LENGTHS, labels), params=list(kp.param_shapes_))
    assert_close(got, kp.transform(G), rtol=1e-10)


# --------------------------------------------------------------------------- LoRA
def test_lora_on_gpt2_every_estimator_covers_exactly_the_adapters():
    pytest.importorskip("peft")
    model = lora_gpt2()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapters = [
        n for n, _ in model.named_modules() if n.endswith((".lora_A.default", ".lora_B.default"))
    ]
    assert len(adapters) == 8 and all("lora_" in n for n in trainable)  # c_attn and c_fc, 2 blocks
    ids, data = lm_data(with_labels=False)
    before = snapshot(model)
    with first_try():
        ekfac = ak.EKFACIFVP(damping=DAMPING, loss="causal_lm", config=F64).fit(model, data)
        datainf = ak.DataInfIFVP(loss="causal_lm", config=F64).fit(model, data)
        kp = ak.KroneckerProjector(in_dim=2, out_dim=2, config=F64).fit(model)
    assert_untouched(model, before)
    assert ekfac.layers_ == kp.layers_ == adapters
    assert ekfac.skipped_layers_ == kp.skipped_layers_ == []  # frozen base layers: not listed
    assert list(ekfac.param_shapes_) == list(datainf.param_shapes_) == trainable
    assert list(kp.param_shapes_) == trainable
    assert_ekfac_is_the_definition(
        ekfac, model, ekfac_definition(model, lm_examples(ids, LENGTHS), adapters)
    )
    G = ak.per_example_gradients(model, data, "causal_lm", config=F64)  # the LoRA parameters
    assert_close(G, loop(model, lm_examples(ids, LENGTHS)), rtol=1e-10)
    P = ak.per_example_gradients(model, data, "causal_lm", projector=kp, config=F64)
    assert_close(P, kp.transform(G), rtol=1e-10)
    for ifvp in (ekfac, datainf):
        assert top_proponents(ifvp, G, G[[2, 6]]) == [2, 6]


# --------------------------------------------------------------------------- CNN
def test_resnet_with_batchnorm_reaching_one_by_one_maps():
    model = tiny_resnet().train()  # as a user holds it mid-training: evaluated in eval mode
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(12, 3, 8, 8, generator=g, dtype=D64), torch.arange(12) % 3
    before = snapshot(model)
    with first_try():
        ekfac = ak.EKFACIFVP(damping=DAMPING, config=F64).fit(model, (X, y))
        kp = ak.KroneckerProjector(in_dim=4, out_dim=3, config=F64).fit(model)
    assert_untouched(model, before)  # train mode and the running statistics kept
    convs = [
        n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    assert ekfac.layers_ == kp.layers_ == convs
    # layer3.conv2 sees 1 x 1 maps with padding 1: 8 of the 9 taps of each channel are zero.
    assert int((ekfac.input_eigenvalues_["layer3.conv2"] == 0).sum()) == 5 * 8

    def loss(i):
        return lambda: F.cross_entropy(model(X[i : i + 1]), y[i : i + 1])

    G = loop_gradients(model, [loss(i) for i in range(12)], params=list(ekfac.param_shapes_))
    assert_close(
        ak.per_example_gradients(model, (X, y), params=list(ekfac.param_shapes_), config=F64),
        G,
        rtol=1e-10,
    )
    P = ak.per_example_gradients(model, (X, y), projector=kp, config=F64)
    assert_close(P, kp.transform(G), rtol=1e-10)
    assert_untouched(model, before)
    picked = [0, 7, 11]
    assert top_proponents(ekfac, G, G[picked]) == picked
    explicit = ak.ExplicitIFVP(damping="auto", config=F64).fit(P)
    assert top_proponents(explicit, P, P[picked]) == picked


# --------------------------------------------------------------------------- torchrun, gloo
def _bert_fit(rank, sizes):
    """EK-FAC on BERT fitted on ``rank``'s shard of the padded batches (``sizes``: per rank)."""
    model = tiny_bert()
    ids, mask = padded()
    labels = torch.arange(len(LENGTHS)) % 3
    start = sum(sizes[:rank])
    shard = slice(start, start + sizes[rank])
    data = dict_batches(ids[shard], mask[shard], labels=labels[shard])
    est = ak.EKFACIFVP(damping=DAMPING, config=F64).fit(model, data)
    V = torch.randn(3, est.n_features_in_, generator=torch.Generator().manual_seed(7), dtype=D64)
    out = {"n": est.n_samples_, "T": est.transform(V)}
    for layer in est.layers_:
        for side in ("input", "output"):
            w = getattr(est, f"{side}_eigenvalues_")[layer]
            Q = getattr(est, f"{side}_eigenvectors_")[layer]
            out[f"{layer}/{side}-covariance"] = (Q * w) @ Q.T
            out[f"{layer}/{side}-basis"] = Q
        out[f"{layer}/lambda"] = est.lambdas_[layer]
    return out


def _torchrun_worker(rank, plan, out_dir):
    """One rank as torchrun starts it: the env:// variables set, then ``init_process_group``."""
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    torch.set_num_threads(1)
    import torch.distributed as dist

    for name, world, port, pg_timeout, _, sizes in plan:
        if rank >= world:
            continue
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
            LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        )  # fmt: skip
        try:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=pg_timeout))
            result = ("ok", _bert_fit(rank, sizes))
        except BaseException:
            result = ("error", traceback.format_exc())
        with open(os.path.join(out_dir, f"{name}-rank{rank}.pkl"), "wb") as fh:
            pickle.dump(result, fh)
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_torchrun_style_two_process_ekfac_on_bert_equals_one_process(tmp_path):
    from test_distributed import PG_TIMEOUT, ok, run_phases

    sizes = (5, 2)  # uneven shards: 2 batches and 1
    results = run_phases(
        [("bert", 2, PG_TIMEOUT, "bert", sizes)], tmp_path, target=_torchrun_worker
    )
    ranks = ok(results["bert"])
    single = _bert_fit(0, (len(LENGTHS),))
    for got in ranks:
        assert got["n"] == single["n"] == len(LENGTHS)
        for key, value in single.items():
            if not key.endswith("-basis") and key != "n":
                assert_close(got[key], value, rtol=1e-10, atol=1e-14)
    for key in ranks[0]:  # each basis decomposed once and broadcast: bitwise equal
        if key.endswith("-basis"):
            assert torch.equal(ranks[0][key], ranks[1][key])

"""The built-in losses on sequences (API section 7) and the targets a Fisher is taken at.

* ``"cross_entropy"``: ``(N, C)`` as before; ``(N, T, C)`` logits with
  ``(N, T)`` targets sum the token losses over tokens not ``-100``; torch's
  ``(N, C, d1, ...)`` convention keeps its mean; ``(N, C, T)`` with ``C == T``
  reads as ``(N, T, C)``;
* ``"causal_lm"``: the same on shifted pairs;
* ``fisher="true"`` samples per token and leaves ignored positions ignored;
  ``"expected"`` on sequences raises naming ``"true"``;
* ``"causal_lm"`` is accepted wherever a loss is.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import assert_close
from torch import nn

import attribkit as ak
from attribkit._compute.targets import (
    check_batch,
    expected_targets,
    logits_of,
    resolve_loss,
    sample_targets,
)

D64 = torch.float64
F64 = ak.ComputeConfig(dtype="float64", batch_size=4, progress=False)


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


def labels(shape, classes, seed=1, ignore=()):
    t = torch.randint(0, classes, shape, generator=torch.Generator().manual_seed(seed))
    for index in ignore:
        t[index] = -100
    return t


# --------------------------------------------------------------------------- values
def test_sequence_cross_entropy_sums_the_counted_tokens():
    out = logits(3, 5, 4)  # (N, T, C)
    y = labels((3, 5), 4, ignore=[(0, 4), (2, 0), (2, 1)])
    got = resolve_loss("cross_entropy")(out, y)
    expected = torch.stack(
        [
            sum(
                F.cross_entropy(out[i, t], y[i, t], reduction="sum")
                for t in range(5)
                if y[i, t] != -100
            )
            for i in range(3)
        ]
    )
    assert_close(got, expected, rtol=1e-12)
    # Hugging Face's mean over the batch's counted tokens, from the sums:
    hf = F.cross_entropy(out.reshape(-1, 4), y.reshape(-1))
    assert_close(got.sum() / (y != -100).sum(), hf, rtol=1e-12)


def test_torch_convention_keeps_its_mean_and_the_ambiguous_shape_reads_classes_last():
    out, y = logits(3, 4, 6), labels((3, 6), 4)  # (N, C, T), C != T: torch's
    assert_close(resolve_loss("cross_entropy")(out, y).mean(), F.cross_entropy(out, y), rtol=1e-12)
    square, ys = logits(3, 4, 4), labels((3, 4), 4)  # (N, 4, 4): classes last wins
    tokens = F.cross_entropy(square.reshape(-1, 4), ys.reshape(-1), reduction="none")
    assert_close(resolve_loss("cross_entropy")(square, ys), tokens.reshape(3, 4).sum(1))


def test_causal_lm_is_the_shifted_sum():
    out = logits(2, 6, 5)
    y = labels((2, 6), 5, ignore=[(1, 5)])
    got = resolve_loss("causal_lm")(out, y)
    expected = torch.stack(
        [F.cross_entropy(out[i, :-1], y[i, 1:], reduction="sum") for i in range(2)]
    )
    assert_close(got, expected, rtol=1e-12)
    # int32 targets (what some tokenizers give) are read as class indices
    assert_close(resolve_loss("causal_lm")(out, y.int()), got, rtol=1e-12)


def test_builtin_losses_read_logits_and_mse_too():
    class Out(dict):
        pass

    out = logits(4, 3)
    t = logits(4, 3, seed=2)
    assert logits_of(Out(logits=out)) is out
    assert logits_of((out, "rest")) is out
    assert_close(resolve_loss("mse")((out, 1), t), F.mse_loss(out, t, reduction="none").mean(1))


@pytest.mark.parametrize(
    "loss, out, y, match",
    [
        ("cross_entropy", logits(2, 3), labels((2,), 3)[:, None].repeat(1, 2),
         r"logits \(N, C\) with targets \(N,\)"),
        ("causal_lm", logits(2, 5), labels((2,), 5), r"logits \(batch, tokens, vocabulary\)"),
        ("causal_lm", logits(2, 4, 5), logits(2, 4), "integer targets"),
    ],
)  # fmt: skip
def test_shapes_a_loss_cannot_read_are_named(loss, out, y, match):
    with pytest.raises(ValueError, match=match):
        check_batch(loss, out, y, "test", index=3, offset=12)


def test_targets_out_of_range_name_batch_example_and_classes():
    out = logits(3, 5, 4)
    y = labels((3, 5), 4)
    y[2, 3] = 4
    with pytest.raises(ValueError, match=r"batch 3 .*example 2 .*\(example 14 .*target 4.*4 cl"):
        check_batch("cross_entropy", out, y, "test", index=3, offset=12)
    y[2, 3] = -100
    check_batch("cross_entropy", out, y, "test", index=3, offset=12)  # ignored is fine
    y[:, 0] = 99  # causal_lm never reads the first target
    check_batch("causal_lm", out, y, "test", index=0, offset=0)


# --------------------------------------------------------------------------- Fisher targets
def test_true_fisher_samples_per_token_and_leaves_ignored_positions_ignored():
    out = logits(200, 3, 4) * 2
    y = labels((200, 3), 4, ignore=[(slice(None), 1)])
    torch.manual_seed(0)
    draws = sample_targets(out, "cross_entropy", targets=y)
    assert draws.shape == (200, 3) and (draws[:, 1] == -100).all()
    # each token's draw follows its own softmax: pool the tokens' frequencies
    probs = torch.softmax(out, -1)
    for t in (0, 2):
        onehot = F.one_hot(draws[:, t], 4).to(D64)
        err = (onehot - probs[:, t]).mean(0).abs().max()
        assert err < 0.1  # 200 draws: a few standard errors of 0.035
    torch.manual_seed(0)
    lm = sample_targets(out, "causal_lm", targets=y)
    assert (lm[:, 0] == -100).all() and (lm[:, 1] == -100).all()  # position 0 is never a target
    assert ((lm[:, 2] >= 0) & (lm[:, 2] < 4)).all()


def test_expected_fisher_on_sequences_names_true():
    with pytest.raises(ValueError, match="fisher='true'"):
        expected_targets(logits(2, 3, 4), "cross_entropy")
    with pytest.raises(ValueError, match="fisher='true'"):
        ak.EKFACIFVP(fisher="expected", loss="causal_lm").fit(nn.Linear(3, 3), None)


# --------------------------------------------------------------------------- accepted everywhere
@pytest.mark.parametrize(
    "estimator",
    [ak.ExplicitIFVP, ak.DataInfIFVP, ak.EKFACIFVP, ak.ArnoldiProjector],
)
def test_causal_lm_is_accepted_wherever_a_loss_is(estimator):
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(6, 4)
            self.head = nn.Linear(4, 6)

        def forward(self, input_ids):
            return self.head(torch.tanh(self.emb(input_ids)))

    model = TinyLM().double()
    ids = torch.randint(0, 6, (5, 4), generator=torch.Generator().manual_seed(2))
    kwargs = {"damping": 0.1} if estimator is not ak.ArnoldiProjector else {"proj_dim": 2}
    est = estimator(loss="causal_lm", config=F64, **kwargs)
    est.fit(model, [{"input_ids": ids}])
    assert est.n_features_in_ == 6 * 4 + 4 * 6 + 6 or estimator is ak.EKFACIFVP
    with pytest.raises(ValueError, match=r"'cross_entropy', 'mse', 'causal_lm' or a callable"):
        estimator(loss="lm", config=F64).fit(model, [{"input_ids": ids}])

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


# --------------------------------------------------------------------------- real models
# Hugging Face pieces are imported inside the factories: transformers and peft are
# test extras, and the test modules that use them skip without them.
def conv1d(nf, nx):
    """transformers' GPT-style ``Conv1D(nf, nx)``: ``y = x @ W + b``, ``W`` ``(nx, nf)``."""
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


class Conv1DNet(nn.Module):
    """Conv1D on tokens (a GELU MLP), pooled; an nn.Linear between; a Conv1D head on (b, d)."""

    def __init__(self, d=5, hidden=7, out=3):
        super().__init__()
        self.up = conv1d(hidden, d)
        self.mid = nn.Linear(hidden, hidden)
        self.head = conv1d(out, hidden)

    def forward(self, x):
        h = torch.tanh(self.mid(nn.functional.gelu(self.up(x)))).mean(1)
        return self.head(h)


def conv1d_net(seed=0):
    """:class:`Conv1DNet` in float64 with random (not zero) biases."""
    torch.manual_seed(seed)
    model = Conv1DNet().double()
    with torch.no_grad():
        for module in (model.up, model.head):
            module.bias.normal_(0, 0.3)
            module.weight.normal_(0, 0.5)
    return model


def conv1d_as_linear(model):
    """A deep copy of ``model`` with every Conv1D replaced by the equivalent nn.Linear.

    Ties survive (``copy.deepcopy`` keeps shared parameters shared).
    """
    import copy

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D":
            continue
        nx, nf = module.weight.shape
        linear = nn.Linear(nx, nf, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
    return model


class LMLogits(nn.Module):
    """A causal LM called as ``model(input_ids, attention_mask)``, returning next-token logits.

    ``(batch, vocab, T - 1)``: the logits of positions ``0 .. T-2`` in torch's
    ``CrossEntropyLoss`` layout, to compare with ``input_ids[:, 1:]``: a
    user's own output layout and callable loss (:func:`token_sum_ce`). Models
    are taken raw; tests that need no callable loss use the raw GPT-2.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits[:, :-1].transpose(1, 2)


def token_sum_ce(outputs, targets):
    """Per-example loss: the sum of the per-token cross entropies, ``-100`` ignored."""
    return nn.functional.cross_entropy(outputs, targets, reduction="none").sum(1)


def tiny_gpt2(seed=0, n_layer=2, n_embd=16, vocab=40, positions=16, **config):
    """A random-init GPT-2 (float64) from a config: Conv1D layers, ``lm_head`` tied to ``wte``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer, n_head=2, n_embd=n_embd, vocab_size=vocab, n_positions=positions,
        bos_token_id=0, eos_token_id=0, **config,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).double().eval()


def lm_batch(ids, mask=None):
    """``(inputs, targets)`` of a causal-LM batch: targets ``ids[:, 1:]``, ``-100`` at padding."""
    if mask is None:
        mask = torch.ones_like(ids)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return {"input_ids": ids, "attention_mask": mask}, targets


def padded_sequences(lengths, length=None, vocab=40, seed=0):
    """Token sequences of the given lengths, right-padded with 0 to ``length``, and the mask."""
    g = torch.Generator().manual_seed(seed)
    length = max(lengths) if length is None else length
    ids = torch.zeros(len(lengths), length, dtype=torch.long)
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-BN-ReLU-conv-BN plus a (strided 1x1 conv-BN) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A ResNet18-style CNN whose last stage sees 1 x 1 maps (8 x 8 inputs, three stride-2 stages).

    Its 3 x 3 convs with padding 1 on 1 x 1 maps have 8 of every 9 unfolded
    input columns always zero (ResNet18's layer4 at 32 x 32 in miniature).
    """

    def __init__(self, classes=3, width=(4, 4, 6, 5)):
        super().__init__()
        c0, c1, c2, c3 = width
        self.stem = nn.Conv2d(3, c0, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c0)
        self.layer1 = BasicBlock(c0, c1, 2)  # 4 x 4
        self.layer2 = BasicBlock(c1, c2, 2)  # 2 x 2
        self.layer3 = BasicBlock(c2, c3, 2)  # 1 x 1
        self.fc = nn.Linear(c3, classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.fc(h.mean((2, 3)))


def tiny_resnet(seed=0):
    """:class:`TinyResNet` in float64, eval mode, with running statistics of 3 batches."""
    torch.manual_seed(seed)
    model = TinyResNet().double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _ in range(3):
            model(1.0 + 2.0 * torch.randn(16, 3, 8, 8, generator=g, dtype=D64))
    return model.eval()


def tiny_bert(seed=0, vocab=40, hidden=12, positions=16, num_labels=3):
    """A random-init ``BertForSequenceClassification`` (float64, eval) from a config."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=positions, num_labels=num_labels,
        pad_token_id=0,
    )  # fmt: skip
    return BertForSequenceClassification(cfg).double().eval()


def lora_gpt2(seed=0, target_modules=("c_attn", "c_fc"), r=2):
    """peft LoRA on :func:`tiny_gpt2` with random ``lora_B``, as after fine-tuning.

    ``init_lora_weights=False``: peft's default starts ``lora_B`` at zero, so
    before training every ``lora_A`` gradient is zero. ``fan_in_fan_out``:
    GPT-2's ``Conv1D`` weights are ``(in, out)``.
    """
    import peft

    config = peft.LoraConfig(
        r=r, target_modules=list(target_modules), fan_in_fan_out=True, lora_dropout=0.0,
        init_lora_weights=False,
    )  # fmt: skip
    base = tiny_gpt2(seed=seed)
    torch.manual_seed(seed + 1)
    return peft.get_peft_model(base, config).double().eval()

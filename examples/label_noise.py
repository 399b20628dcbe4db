"""Which training examples made my classifier do this?
===================================================

A story on a real data set shipped with scikit-learn (the UCI handwritten
digits, 1,797 8x8 images): train a small torch MLP on digits whose training
labels are partly corrupted, then use attribkit to

1. compute per-example gradients,
2. find the corrupted labels by self-influence ``g_iᵀ F⁻¹ g_i`` with the exact
   inverse Fisher (ExplicitIFVP) and with DataInf's closed form,
3. explain a test prediction by its most influential training examples,
4. compress all gradients with a JL RandomProjector inside a scikit-learn
   Pipeline and check that influence rankings survive the projection,
5. pickle the fitted pipeline and reuse it.

Run: ``python examples/label_noise.py``. Takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

import attribkit as ak

torch.manual_seed(0)
torch.set_num_threads(2)

# ----------------------------------------------------------------- data and model
digits = load_digits()
X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
rng = np.random.default_rng(0)
n_train = len(y_train)
flipped = rng.choice(n_train, size=n_train // 20, replace=False)  # corrupt 5% of the labels
y_noisy = y_train.clone()
y_noisy[flipped] = (y_train[flipped] + torch.tensor(rng.integers(1, 10, len(flipped)))) % 10

model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(150):  # full-batch training: a few seconds
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(X_train), y_noisy).backward()
    opt.step()
with torch.no_grad():
    accuracy = (model(X_test).argmax(1) == y_test).float().mean().item()
print(
    f"digits: {n_train} training examples ({len(flipped)} with a wrong label), "
    f"test accuracy {accuracy:.3f}"
)

# ----------------------------------------------------------------- 1. gradients
last = ["2.weight", "2.bias"]  # the last layer: 330 parameters
config = ak.ComputeConfig(dtype="float64", batch_size=256)
train = (X_train, y_noisy)
G = ak.per_example_gradients(model, train, params=last, config=config)
print(f"per-example gradients of the last layer: {tuple(G.shape)}")


# ----------------------------------------------------------------- 2. self-influence
def recall_at(scores: torch.Tensor, k: int) -> float:
    top = torch.topk(scores, k).indices.numpy()
    return np.isin(top, flipped).mean()


k = len(flipped)
explicit = ak.ExplicitIFVP(damping=1e-3, params=last, config=config).fit(model, train)
self_explicit = (explicit.transform(G) * G).sum(1)
datainf = ak.DataInfIFVP(params=last, config=config).fit(model, train)
self_datainf = (datainf.transform(G) * G).sum(1)
print(
    f"\nfraction of wrong labels among the top-{k} self-influence scores "
    f"(chance: {k / n_train:.2f}):"
)
print(f"  ExplicitIFVP ({explicit.solver_} solver)  {recall_at(self_explicit, k):.2f}")
print(f"  DataInfIFVP (auto damping)      {recall_at(self_datainf, k):.2f}")
print(f"  gradient norm alone             {recall_at(G.pow(2).sum(1), k):.2f}")

# ----------------------------------------------------------------- 3. explain a prediction
with torch.no_grad():
    pred = model(X_test).argmax(1)
wrong = int(torch.nonzero(pred != y_test)[0])
g_test = ak.per_example_gradients(
    model, (X_test[wrong : wrong + 1], pred[wrong : wrong + 1]), params=last, config=config
)
scores = ak.influence(explicit, G, g_test)[0]  # (n_train,)
top = torch.topk(scores, 5).indices
print(
    f"\ntest digit {wrong}: true {int(y_test[wrong])}, predicted {int(pred[wrong])}; "
    "training examples that pushed hardest for the prediction:"
)
for i in top.tolist():
    note = " (label corrupted)" if i in set(flipped.tolist()) else ""
    print(f"  train #{i:4d}: labelled {int(y_noisy[i])}, really {int(y_train[i])}{note}")

# ----------------------------------------------------------------- 4. projection in a Pipeline
G_all = ak.per_example_gradients(model, train, config=config).numpy()  # all 2,410 parameters
pipe = Pipeline(
    [
        ("project", ak.RandomProjector(proj_dim=512, seed=0, config=config)),
        ("ifvp", ak.ExplicitIFVP(damping=1e-3, config=config)),
    ]
)
pipe.fit(G_all)
P = pipe[0].transform(G_all)
self_projected = (pipe.transform(G_all) * P).sum(1)
print(f"\nall {G_all.shape[1]:,} parameters projected to 512 dimensions (JL), then ExplicitIFVP:")
print(
    f"  fraction of wrong labels among the top-{k}: "
    f"{recall_at(torch.as_tensor(self_projected), k):.2f}"
)
norms = np.linalg.norm(P, axis=1) ** 2 / np.linalg.norm(G_all, axis=1) ** 2
print(
    f"  squared-norm ratio after projection: median {np.median(norms):.3f}, "
    f"range [{norms.min():.3f}, {norms.max():.3f}]"
)

# ----------------------------------------------------------------- 5. pickle and reuse
buffer = io.BytesIO()
pickle.dump(pipe, buffer)
again = pickle.loads(buffer.getvalue())
assert np.allclose(again.transform(G_all[:10]), pipe.transform(G_all[:10]))
print(
    f"\npickled the fitted pipeline: {len(buffer.getvalue()) / 2**20:.1f} MiB "
    "(the projector holds no matrix); reloaded output identical."
)

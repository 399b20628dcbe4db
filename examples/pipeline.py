"""Gradients as features: attribkit estimators in a scikit-learn Pipeline.
=======================================================================

attribkit's estimators are scikit-learn transformers, so per-example gradients
can be treated like any other feature matrix:

1. compute the per-example gradients of a logistic-regression model trained
   on sklearn's digits (nothing is downloaded);
2. build ``Pipeline([RandomProjector, ExplicitIFVP])`` (a TRAK-style projected
   influence), fit it on the training gradients, and score every training
   example for a few test digits with ``ak.influence``;
3. change hyper-parameters with ``set_params`` (``project__proj_dim``,
   ``ifvp__damping``), refit, and see how the top proponents move;
4. save the fitted pipeline with joblib and reload it in a fresh Python
   process, which gives identical scores (the projector's matrix is not in the
   file: its entries are a pure function of the seed).

Run: ``python examples/pipeline.py`` (a few seconds).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import joblib
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

import attribkit as ak

LAMBDA = 1e-3  # weight decay of the model, and the damping of the IFVP


def train_model(X, y):
    """Logistic regression nn.Linear(64, 10), L-BFGS on mean CE + LAMBDA/2 ||theta||^2."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10).double()
    opt = torch.optim.LBFGS(
        model.parameters(), max_iter=500, tolerance_grad=1e-8, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        decay = sum(p.square().sum() for p in model.parameters())
        value = F.cross_entropy(model(X), y) + LAMBDA / 2 * decay
        value.backward()
        return value

    opt.step(closure)
    return model


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean fraction of shared top-k proponents between two score matrices."""
    ta = np.argsort(-a, axis=1)[:, :k]
    tb = np.argsort(-b, axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)]))


RELOAD = """
import sys, joblib, numpy as np, attribkit as ak
pipe = joblib.load(sys.argv[1])
G_train, G_test = np.load(sys.argv[2]), np.load(sys.argv[3])
np.save(sys.argv[4], ak.influence(pipe, G_train, G_test))
"""


def main():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    model = train_model(X_train, y_train)

    # 1. gradients as a feature matrix (numpy in, numpy out through the pipeline)
    cfg = ak.ComputeConfig(dtype="float64")
    G_train = ak.per_example_gradients(model, (X_train, y_train), config=cfg).numpy()
    G_test = ak.per_example_gradients(model, (X_test[:5], y_test[:5]), config=cfg).numpy()
    print(f"gradient features: train {G_train.shape}, test {G_test.shape}")

    # 2. a projected influence pipeline
    pipe = Pipeline(
        [
            ("project", ak.RandomProjector(proj_dim=256, seed=0, config=cfg)),
            ("ifvp", ak.ExplicitIFVP(damping=LAMBDA, config=cfg)),
        ]
    )
    pipe.fit(G_train)
    scores = ak.influence(pipe, G_train, G_test)
    print(f"pipeline steps: {[(name, type(step).__name__) for name, step in pipe.steps]}")
    print(f"scores {scores.shape}; solver {pipe['ifvp'].solver_!r}")
    exact = ak.ExplicitIFVP(damping=LAMBDA, config=cfg).fit(G_train)
    unprojected = ak.influence(exact, G_train, G_test)
    print(
        "top-10 proponents shared with the unprojected ExplicitIFVP: "
        f"{top_overlap(scores, unprojected):.2f}"
    )

    # 3. hyper-parameters through set_params, as in any sklearn pipeline
    for proj_dim, damping in ((64, LAMBDA), (512, LAMBDA), (256, 1e-1)):
        pipe.set_params(project__proj_dim=proj_dim, ifvp__damping=damping).fit(G_train)
        other = ak.influence(pipe, G_train, G_test)
        print(
            f"  proj_dim={proj_dim:4d}, damping={damping:g}: top-10 shared with the "
            f"unprojected ExplicitIFVP {top_overlap(other, unprojected):.2f}"
        )
    pipe.set_params(project__proj_dim=256, ifvp__damping=LAMBDA).fit(G_train)

    # 4. save, reload in a fresh process, compare
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, n) for n in ("pipe.joblib", "tr.npy", "te.npy", "out.npy")]
        joblib.dump(pipe, paths[0])
        np.save(paths[1], G_train)
        np.save(paths[2], G_test)
        subprocess.run([sys.executable, "-c", RELOAD, *paths], check=True)
        reloaded = np.load(paths[3])
        size = os.path.getsize(paths[0])
    diff = float(np.abs(reloaded - scores).max())
    print(
        f"saved the fitted pipeline with joblib ({size / 2**10:.0f} KiB), reloaded it in a "
        f"fresh process: max |score difference| = {diff:.3g}"
    )
    assert np.allclose(reloaded, scores, rtol=1e-12, atol=0), diff
    return scores


if __name__ == "__main__":
    main()

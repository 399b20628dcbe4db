"""EK-FAC influence scores from a fit spread over processes, equal to one process.
===============================================================================

Run it the way a data-parallel training job runs::

    torchrun --nproc_per_node 2 examples/distributed_ekfac.py

(or ``python examples/distributed_ekfac.py`` for one process). The story:

1. every rank builds the same small MLP 64-32-10 on scikit-learn's
   handwritten digits (nothing is downloaded); rank 0 trains it (float64,
   L-BFGS, weight decay 1e-3) and broadcasts the weights, as DDP does;
2. each rank holds its own, deliberately uneven, shard of the training set and
   fits ``ak.EKFACIFVP`` on it: with ``torch.distributed`` initialised the fit
   all-reduces the covariances, token counts and eigenvalue corrections once
   per pass, and every rank ends with the fitted state of the whole training
   set;
3. each rank scores the test digits against *its own* training examples with
   ``ak.influence`` (the training gradients never leave their rank), and the
   score columns are gathered on rank 0;
4. rank 0 repeats the fit in one process on the whole training set
   (``ComputeConfig(distributed=False)``) and prints both sets of scores for
   a few test digits and their largest difference.

The shards are plain slices. ``DistributedSampler`` would pad them to equal
length by repeating examples, so its union is not the training set unless
its size divides evenly.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

import attribkit as ak

N_TRAIN, N_TEST, DAMPING = 1200, 6, 1e-3


def setup():
    """Join torchrun's process group (gloo on the CPU), or run alone."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def trained_model(X, y, rank):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    ).double()
    if rank == 0:
        opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            decay = sum(p.square().sum() for p in model.parameters())
            loss = torch.nn.functional.cross_entropy(model(X), y) + DAMPING / 2 * decay
            loss.backward()
            return loss

        opt.step(closure)
    if dist.is_initialized():  # every rank starts from rank 0's weights, as DDP does
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
    return model


def main():
    rank, world = setup()
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target)
    X_train, y_train = X[:N_TRAIN], y[:N_TRAIN]
    X_test, y_test = X[N_TRAIN : N_TRAIN + N_TEST], y[N_TRAIN : N_TRAIN + N_TEST]
    model = trained_model(X_train, y_train, rank)

    # Uneven shards: rank r holds a share proportional to r + 2.
    weights = np.arange(world) + 2.0
    bounds = np.concatenate([[0], np.cumsum(weights / weights.sum() * N_TRAIN)]).round()
    lo, hi = int(bounds[rank]), int(bounds[rank + 1])
    shard = (X_train[lo:hi], y_train[lo:hi])

    cfg = ak.ComputeConfig(dtype="float64", batch_size=128, progress=False)
    ekfac = ak.EKFACIFVP(damping=DAMPING, config=cfg).fit(model, shard)
    test_grads = ak.per_example_gradients(model, (X_test, y_test), config=cfg)
    train_grads = ak.per_example_gradients(model, shard, config=cfg)
    scores = ak.influence(ekfac, train_grads, test_grads)  # (n_test, this shard)

    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, scores.numpy())
        scores = torch.as_tensor(np.concatenate(parts, axis=1))  # rank order = data order
    print(
        f"rank {rank} of {world}: fitted on examples {lo}:{hi} ({hi - lo} of {N_TRAIN}); "
        f"n_samples_ = {ekfac.n_samples_}",
        flush=True,
    )
    if world > 1:
        dist.barrier()

    if rank == 0:
        one = ak.ComputeConfig(dtype="float64", batch_size=128, progress=False, distributed=False)
        ref = ak.EKFACIFVP(damping=DAMPING, config=one).fit(model, (X_train, y_train))
        all_train = ak.per_example_gradients(model, (X_train, y_train), config=one)
        ref_scores = ak.influence(ref, all_train, test_grads)
        print(f"\nTop-3 proponents per test digit ({world} processes | one process):")
        for i in range(N_TEST):
            top = torch.topk(scores[i], 3)
            ref_top = torch.topk(ref_scores[i], 3)
            ours = ", ".join(f"#{j} {v:.5g}" for v, j in zip(top.values, top.indices))
            theirs = ", ".join(f"#{j} {v:.5g}" for v, j in zip(ref_top.values, ref_top.indices))
            print(f"  test digit {int(y_test[i])}: {ours} | {theirs}")
        diff = (scores - ref_scores).abs().max()
        scale = ref_scores.abs().max()
        print(
            f"\nmax |scores({world} processes) - scores(1 process)| = {diff:.3e} "
            f"(relative {diff / scale:.3e}) over {scores.numel()} scores"
        )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

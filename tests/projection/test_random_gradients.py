"""RandomProjector as the projector of per_example_gradients when its matrix streams.

A matrix larger than ``memory_budget`` used to be regenerated for every batch
of gradients; the gradient rows are now gathered up to the budget and
projected together, each block generated once per budget-full (issue 18
item 7), with the same values as projecting each batch.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from reference import assert_close

import attribkit as ak
from attribkit.projection import _generator

D64 = torch.float64


def model_and_batches(sizes=(2, 2, 2, 2, 2, 2, 2)):
    torch.manual_seed(0)
    model = torch.nn.Linear(30, 4).double()  # p = 124
    g = torch.Generator().manual_seed(1)
    n = sum(sizes)
    X, y = torch.randn(n, 30, generator=g, dtype=D64), torch.arange(n) % 4
    starts = [0, *np.cumsum(sizes).tolist()]
    return model, [(X[a:b], y[a:b]) for a, b in itertools.pairwise(starts)]


@pytest.fixture
def generated(monkeypatch):
    """Rows of the dense matrix generated since the fixture started."""
    count = [0]
    original = _generator.Projection._gen

    def counting(self, r0, r1, out=None):
        count[0] += r1 - r0
        return original(self, r0, r1, out)

    monkeypatch.setattr(_generator.Projection, "_gen", counting)
    return count


@pytest.mark.parametrize("proj_type, sparsity", [("rademacher", 1), ("normal", 1), ("sjlt", 3)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_streamed_projection_equals_projecting_each_batch(proj_type, sparsity, dtype):
    # Batches of 1 to 9 rows; the budget holds 3 to 6 rows at once.
    model, batches = model_and_batches((2, 2, 5, 9, 1, 2))
    config = ak.ComputeConfig(dtype=dtype, memory_budget=4000, progress=False)
    proj = ak.RandomProjector(16, proj_type=proj_type, sparsity=sparsity, config=config)
    proj.fit(model)
    assert proj._get_engine().streams()
    got = ak.per_example_gradients(model, batches, projector=proj)
    G = ak.per_example_gradients(model, batches, config=ak.ComputeConfig(dtype="float64"))
    assert got.dtype == config.torch_dtype and got.shape == (21, 16)
    assert_close(got, proj.transform(G))
    out = np.zeros((21, 16), dtype=dtype)
    assert ak.per_example_gradients(model, batches, projector=proj, out=out) is out
    assert_close(torch.from_numpy(out), got, rtol=0)


def test_each_block_is_generated_once_per_budget_full_of_rows(generated):
    model, batches = model_and_batches()  # 7 batches of 2 rows
    config = ak.ComputeConfig(dtype="float64", memory_budget=8000, progress=False)
    proj = ak.RandomProjector(16, config=config).fit(model)
    engine = proj._get_engine()
    # 8000 bytes: one block of 15 matrix rows (1920 bytes) and 6 gradient rows of 992.
    assert engine.block_bytes() == 1920
    ak.per_example_gradients(model, batches, projector=proj)
    assert generated[0] == 3 * 124  # 14 rows in 3 budget-fulls (6, 6, 2)
    generated[0] = 0
    batches_, _ = ak.BaseEstimator.project_gradients(proj, model, batches)  # one per batch
    list(batches_)
    assert generated[0] == 45 + 7 * (124 - 45)  # a cache of 45 rows, the rest per batch


def test_a_matrix_that_fits_is_cached_and_used_batch_by_batch(generated):
    model, batches = model_and_batches()
    proj = ak.RandomProjector(16, config=ak.ComputeConfig(dtype="float64")).fit(model)
    assert not proj._get_engine().streams()
    ak.per_example_gradients(model, batches, projector=proj)
    ak.per_example_gradients(model, batches, projector=proj)
    assert generated[0] == 124  # built once, kept

"""Counter-based random projection matrices built from plain torch ops.

This module is the engine behind :class:`~attribkit.projection.RandomProjector`.
It generates Johnson--Lindenstrauss projection matrices ``P`` of shape
``(n_features, proj_dim)`` on the fly from a keyed 64-bit hash, so that

* the matrix never has to be stored (it can be regenerated block by block
  when it does not fit in the memory budget),
* every entry is a *pure function* of its coordinates and the key: the
  result does not depend on ``n_features``, on block or batch sizes, on the
  order in which blocks are generated, or on the device;
* CPU and CUDA produce **bit-identical** matrices: only integer ops with
  well-defined wrap-around semantics (int64 add/mul/xor/and/shift) and table
  look-ups into tables that are always built on the CPU are used.

Purity contract
---------------
For the dense types (``"rademacher"`` and ``"normal"``) the *unscaled* entry
``U[i, j]`` (a sign for rademacher, a discretised standard normal for normal)
is a pure function of ``(seed, proj_type, i, j)``; the stored entry is
``U[i, j] / sqrt(proj_dim)`` rounded once to the requested dtype.  Hence the
``proj_dim=512`` matrix is, up to the scale factor, the first 512 columns of
the ``proj_dim=1024`` matrix, and any row range of the matrix equals the
corresponding rows of a larger matrix.

For ``"sjlt"`` the entry is a pure function of
``(seed, sparsity, proj_dim, i, j)``: it is independent of ``n_features``,
blocks and device, but it *cannot* be independent of ``proj_dim``.  Each row
must hold exactly ``sparsity`` nonzeros inside ``[0, proj_dim)``, so the rows
for ``proj_dim=512`` cannot be a column prefix of the rows for
``proj_dim=1024`` (those would hold up to ``2 * sparsity`` nonzeros in the
wider matrix, or none in the prefix).

Distributions
-------------
``"rademacher"``
    Entries ``+-1/sqrt(proj_dim)`` with independent fair signs; one 64-bit
    hash provides the signs of 64 consecutive columns.
``"normal"``
    Entries ``z/sqrt(proj_dim)`` where ``z`` is a **65,536-level
    discretisation of N(0, 1)**: 16 hash bits select one of the quantiles
    ``ndtri((u + 1/2) / 65536)``, ``u = 0..65535`` (antisymmetrised and
    rescaled to exactly zero mean and unit variance).  One 64-bit hash
    provides 4 entries.  The discretisation is invisible for projection
    purposes (it matches N(0, 1) up to ~4.3 sigma; kurtosis ~2.99).
``"sjlt"``
    Sparse JL transform.  ``[0, proj_dim)`` is split into ``sparsity``
    contiguous blocks with boundaries ``t * proj_dim // sparsity``; feature
    ``i`` gets one hashed coordinate in each block (so its ``sparsity``
    coordinates are distinct) with an independent random sign, and value
    ``+-1/sqrt(sparsity)``.  Requires ``1 <= sparsity <= proj_dim``.

All three preserve squared norms in expectation: ``E ||x P||^2 = ||x||^2``.

Hash
----
The counter for entry group ``(i, g)`` is ``c = i * 2**32 + g`` (``g`` is the
column group: ``j // 64`` for rademacher, ``j // 4`` for normal, the block
index ``t`` for sjlt).  The hashed value is
``splitmix64_finaliser(key + c * GOLDEN_GAMMA)`` with
``key = f(seed, proj_type, sparsity)``, i.e. the SplitMix64 output stream
indexed by the two-dimensional counter.  Both maps are bijections of
64-bit words, so distinct counters give distinct hashes as long as
``i < 2**32`` and ``g < 2**32``.  torch's int64 ``>>`` is arithmetic, so the
logical shifts of the finaliser are emulated with a mask; multiplications
wrap mod ``2**64`` identically on CPU and CUDA.  Bytes are read from the
hashes through little-endian dtype views (true on x86, ARM and CUDA).

Performance notes (2-core AVX2 CPU, float32)
-------------------------------------------
Drawing the random numbers, not the matmul, is the expensive part, so

* hashing runs on sub-blocks of ~2**18 words (~2 MiB) so the ~12 int64
  passes of the finaliser stay in L2/L3 cache, while each pass is still long
  enough to amortise torch's per-op overhead;
* rademacher turns each byte of hash into 8 floats with a single
  ``index_select`` on a ``(256, 8)`` table of sign patterns;
* normal reinterprets the hashes as ``uint16``, widens them to ``int32`` and
  does a single ``index_select`` into the 65,536-entry quantile table
  (benchmarked fastest among ``take``, ``gather``, advanced indexing and
  ``embedding``);
* fresh cache / block buffers are pre-faulted with a single ``zero_()`` and
  scratch buffers are reused: first-touch page faults inside the generation
  passes measured as expensive as the generation itself (the scratch is
  per thread, so concurrent projections never share it);
* sjlt never touches a dense matrix: signs are folded into the index of an
  ``index_add_`` over a doubled output ``(n, 2 * proj_dim)``, which was much
  faster on CPU than torch sparse CSR/COO products (and than index_add_ on
  the transposed output, which needs a transposed copy of X).
"""

from __future__ import annotations

import math
import sys
import threading

import torch

from .._compute.budget import rows_within
from .._compute.precision import FLOAT_DTYPES, itemsize, matmul_dtype
from .._compute.progress import bar as progress_bar

__all__ = [
    "GAMMA",
    "MASK64",
    "PROJ_TYPES",
    "Projection",
    "dense_block",
    "mix64",
    "sjlt_indices",
]

PROJ_TYPES = ("rademacher", "normal", "sjlt")

#: Words are 64-bit: Python ints are reduced with this mask.
MASK64 = (1 << 64) - 1

# Number of 64-bit words hashed per sub-block: 2**18 words = 2 MiB per int64
# buffer.  Measured sweet spot between cache residency and per-op overhead.
_HASH_WORDS = 1 << 18
# Soft upper bound on the size of one streamed matrix block (bytes).  Blocks
# of tens of MiB keep the BLAS call efficient; larger blocks buy nothing.
_MAX_BLOCK_BYTES = 64 << 20

if sys.byteorder != "little":  # pragma: no cover - no big-endian torch targets
    raise ImportError("attribkit.projection._generator assumes a little-endian host")


def _wrap(c: int) -> int:
    """Python int -> the signed int64 with the same low 64 bits."""
    c &= MASK64
    return c - (1 << 64) if c >= (1 << 63) else c


GAMMA = 0x9E3779B97F4A7C15  # SplitMix64 increment (odd => c -> c*GAMMA bijective)
_M1 = 0xBF58476D1CE4E5B9  # SplitMix64 finaliser multipliers (Stafford Mix13)
_M2 = 0x94D049BB133111EB
_GAMMA_S = _wrap(GAMMA)
_GAMMA_ROW_S = _wrap(GAMMA << 32)  # GAMMA * 2**32: row stride of the counter
_M1_S = _wrap(_M1)
_M2_S = _wrap(_M2)
_TYPE_CODES = {"rademacher": 1, "normal": 2, "sjlt": 3}


def mix64(z: int) -> int:
    """SplitMix64 finaliser on Python ints (keys and derived seeds; a bijection of words)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * _M1) & MASK64
    z = ((z ^ (z >> 27)) * _M2) & MASK64
    return z ^ (z >> 31)


def _key(seed: int, proj_type: str, sparsity: int) -> int:
    """Signed int64 key of the stream for (seed, proj_type, sparsity)."""
    if proj_type not in _TYPE_CODES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    # Dense matrices do not depend on sparsity: keep them identical whatever
    # sparsity value a caller passes along.
    s = int(sparsity) if proj_type == "sjlt" else 0
    k = mix64(int(seed) & MASK64)
    k = mix64(k + _TYPE_CODES[proj_type] * GAMMA)
    k = mix64(k + s * GAMMA)
    return _wrap(k)


def _mix64_(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """In-place SplitMix64 finaliser on an int64 tensor; ``t`` is scratch.

    torch's ``>>`` on int64 is arithmetic, so ``(z >> s) & (2**(64-s) - 1)``
    emulates the logical shift.  Everything is done in place / with ``out=``
    so a call is exactly 11 memory passes and no allocation.
    """
    for shift, mult in ((30, _M1_S), (27, _M2_S), (31, None)):
        torch.bitwise_right_shift(z, shift, out=t)
        t.bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(t)
        if mult is not None:
            z.mul_(mult)
    return z


def _hash_grid(
    key: int, r0: int, r1: int, g0: int, g1: int, out: torch.Tensor, tmp: torch.Tensor
) -> torch.Tensor:
    """Hashes of counters (i, g), i in [r0, r1), g in [g0, g1), into ``out``.

    ``out`` and ``tmp`` are contiguous int64 buffers with at least
    ``(r1-r0)*(g1-g0)`` elements; returns the ``(r1-r0, g1-g0)`` view.
    """
    dev = out.device
    nr, ng = r1 - r0, g1 - g0
    z = out[: nr * ng].view(nr, ng)
    # key + (i*2**32 + g)*GAMMA  ==  (key + i*GAMMA*2**32) + g*GAMMA (mod 2**64):
    # one broadcast add builds the whole counter grid.
    rows = torch.arange(r0, r1, dtype=torch.int64, device=dev).mul_(_GAMMA_ROW_S).add_(key)
    cols = torch.arange(g0, g1, dtype=torch.int64, device=dev).mul_(_GAMMA_S)
    torch.add(rows[:, None], cols[None, :], out=z)
    _mix64_(z.view(-1), tmp[: nr * ng])
    return z


# --------------------------------------------------------------------------
# Look-up tables (always built on the CPU in float64 so every device gets the
# same bits, then cast once).
# --------------------------------------------------------------------------
_NORMAL_Q: torch.Tensor | None = None


def _normal_quantiles() -> torch.Tensor:
    """65,536 N(0,1) quantiles at midpoints, exactly antisymmetric, unit variance."""
    global _NORMAL_Q
    if _NORMAL_Q is None:
        u = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536.0
        q = torch.special.ndtri(u)
        q = 0.5 * (q - q.flip(0))  # exact symmetry => exact zero mean
        # Exact unit variance of the discrete law; math.fsum makes the
        # normalisation independent of SIMD width / reduction order.
        q = q / math.sqrt(math.fsum(v * v for v in q.tolist()) / 65536.0)
        _NORMAL_Q = q
    return _NORMAL_Q


def _rademacher_unscaled() -> torch.Tensor:
    """(256, 8) table: row b holds the signs of the 8 bits of byte b (bit=1 -> -1)."""
    b = torch.arange(256, dtype=torch.int64)[:, None]
    bits = (b >> torch.arange(8, dtype=torch.int64)[None, :]) & 1
    return (1 - 2 * bits).to(torch.float64)


def _table(
    proj_type: str, proj_dim: int, dtype: torch.dtype, compute: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Scaled look-up table whose values are those of ``dtype``, stored as ``compute``."""
    base = _normal_quantiles() if proj_type == "normal" else _rademacher_unscaled()
    tab = (base / math.sqrt(proj_dim)).to(dtype)  # round once, in the target dtype
    return tab.to(compute).to(device)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")


class _Workspace:
    """Reusable integer scratch buffers for :func:`_fill_dense`.

    Allocating multi-MiB temporaries per sub-block costs page faults (glibc
    serves them with fresh ``mmap`` pages), which measured as large as the
    hashing itself, so buffers are allocated once and reused.
    """

    def __init__(self, words: int, entries: int, device: torch.device):
        self.z = torch.empty(words, dtype=torch.int64, device=device)
        self.t = torch.empty(words, dtype=torch.int64, device=device)
        # int32 indices: index_select is as fast with them as with int64 and
        # the widening pass writes half the bytes (measured ~10% overall).
        self.idx = torch.empty(entries, dtype=torch.int32, device=device)

    def fits(self, words: int, entries: int, device: torch.device) -> bool:
        return self.z.device == device and self.z.numel() >= words and self.idx.numel() >= entries


def _plan(proj_type: str, nr: int, k: int) -> tuple[int, int, int]:
    """(hashes per row, rows per sub-block, index entries per hash)."""
    if proj_type == "rademacher":
        ng, per_idx = -(-k // 64), 8  # 1 hash = 8 bytes = 8 table rows of 8 signs
    else:
        ng, per_idx = -(-k // 4), 4  # 1 hash = 4 x 16-bit quantile indices
    sub = rows_within(_HASH_WORDS, ng, nr)
    return ng, sub, per_idx


def _fill_dense(
    out: torch.Tensor,
    key: int,
    proj_type: str,
    r0: int,
    r1: int,
    table: torch.Tensor,
    ws: _Workspace | None = None,
) -> torch.Tensor:
    """Write rows [r0, r1) of the dense matrix into ``out`` (shape (r1-r0, k)).

    ``out`` must be contiguous.  Works in row sub-blocks of ~``_HASH_WORDS``
    hashes so the integer temporaries stay in cache.
    """
    nr, k = out.shape
    dev = out.device
    ng, sub, per_idx = _plan(proj_type, nr, k)
    if ws is None or not ws.fits(sub * ng, sub * ng * per_idx, dev):
        ws = _Workspace(sub * ng, sub * ng * per_idx, dev)
    per = 64 if proj_type == "rademacher" else 4  # entries per 64-bit hash
    kk = ng * per  # padded width: k rounded up to a whole number of hashes
    direct = kk == k  # write straight into `out` (the common case: k % per == 0)
    pad = None if direct else torch.empty(sub * kk, dtype=out.dtype, device=dev)
    on_cpu = dev.type == "cpu"
    for a in range(0, nr, sub):
        b = min(nr, a + sub)
        m = b - a
        h = _hash_grid(key, r0 + a, r0 + b, 0, ng, ws.z, ws.t)
        idx = ws.idx[: m * ng * per_idx]
        if proj_type == "rademacher":
            idx.copy_(h.view(torch.uint8).view(-1))  # each byte = 8 signs
            dst = out[a:b].view(-1, 8) if direct else pad[: m * kk].view(-1, 8)
        else:
            if on_cpu:
                # uint16 view -> int32 is one pass and yields indices 0..65535.
                idx.copy_(h.view(torch.uint16).view(-1))
            else:
                # uint16 kernels are sparse on accelerators: same indices via int16.
                idx.copy_(h.view(torch.int16).view(-1)).bitwise_and_(0xFFFF)
            dst = out[a:b].view(-1) if direct else pad[: m * kk]
        torch.index_select(table, 0, idx, out=dst)
        if not direct:
            out[a:b].copy_(pad[: m * kk].view(m, kk)[:, :k])
    return out


def _check_rows(rows: tuple[int, int]) -> tuple[int, int]:
    r0, r1 = int(rows[0]), int(rows[1])
    if not 0 <= r0 <= r1 or r1 > (1 << 32):
        raise ValueError(f"invalid row range {rows!r}")
    return r0, r1


def dense_block(
    seed: int,
    proj_type: str,
    rows: tuple[int, int],
    proj_dim: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Rows ``[r0, r1)`` of the dense ``(p, proj_dim)`` projection matrix.

    Parameters
    ----------
    seed : int
        Seed of the projection (any Python int; reduced mod 2**64).
    proj_type : {"rademacher", "normal"}
        Distribution of the entries.
    rows : tuple of int
        Half-open range ``(r0, r1)`` of input-feature indices.
    proj_dim : int
        Number of columns (output dimension).
    dtype : torch.dtype
        float32, float64, float16 or bfloat16.  Entries are rounded once to
        this dtype.
    device : torch.device
        Device of the result.  The values are bit-identical on every device.

    Returns
    -------
    torch.Tensor
        Shape ``(r1 - r0, proj_dim)``, already scaled by ``1/sqrt(proj_dim)``.
    """
    if proj_type not in ("rademacher", "normal"):
        raise ValueError(f"dense_block supports 'rademacher' and 'normal', got {proj_type!r}")
    _check_dtype(dtype)
    if proj_dim < 1:
        raise ValueError("proj_dim must be >= 1")
    r0, r1 = _check_rows(rows)
    device = torch.device(device)
    tab = _table(proj_type, proj_dim, dtype, dtype, device)
    out = torch.empty((r1 - r0, proj_dim), dtype=dtype, device=device)
    return _fill_dense(out, _key(seed, proj_type, 0), proj_type, r0, r1, tab)


def _sjlt_hash(key: int, sparsity: int, r0: int, r1: int, proj_dim: int, device):
    """Shared core of :func:`sjlt_indices`: (cols int64, negative-sign mask int64)."""
    n = (r1 - r0) * sparsity
    z = torch.empty(n, dtype=torch.int64, device=device)
    t = torch.empty_like(z)
    h = _hash_grid(key, r0, r1, 0, sparsity, z, t)  # (R, s): counter (i, block t)
    tt = torch.arange(sparsity + 1, dtype=torch.int64, device=device)
    bounds = tt * proj_dim // sparsity  # block boundaries t*k//s
    lo, size = bounds[:-1], bounds[1:] - bounds[:-1]
    # High 32 bits (logical) times block size, >> 32: an unbiased-enough
    # multiply-shift reduction into [0, size) that never overflows int64
    # (size <= 2**31 is enforced by the caller).
    hi = torch.bitwise_right_shift(h, 32).bitwise_and_(0xFFFFFFFF)
    cols = hi.mul_(size).bitwise_right_shift_(32).add_(lo)
    neg = h.bitwise_and_(1)  # low bit -> sign (1 means negative)
    return cols, neg


def sjlt_indices(
    seed: int, sparsity: int, rows: tuple[int, int], proj_dim: int, *, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output coordinates and signs of the sparse JL transform.

    Parameters
    ----------
    seed : int
        Seed of the projection.
    sparsity : int
        Number of nonzeros per input feature, ``1 <= sparsity <= proj_dim``.
    rows : tuple of int
        Half-open range ``(r0, r1)`` of input-feature indices.
    proj_dim : int
        Output dimension.
    device : torch.device
        Device of the results (bit-identical on every device).

    Returns
    -------
    cols : torch.Tensor
        ``(r1 - r0, sparsity)`` int64; column ``t`` lies in block
        ``[t*proj_dim//sparsity, (t+1)*proj_dim//sparsity)`` so the
        coordinates of a feature are distinct.
    signs : torch.Tensor
        ``(r1 - r0, sparsity)`` int8 of ``+1``/``-1``.  The matrix entry is
        ``signs / sqrt(sparsity)``.
    """
    _check_sjlt(sparsity, proj_dim)
    r0, r1 = _check_rows(rows)
    cols, neg = _sjlt_hash(
        _key(seed, "sjlt", sparsity), sparsity, r0, r1, proj_dim, torch.device(device)
    )
    signs = (1 - 2 * neg).to(torch.int8)
    return cols, signs


def _check_sjlt(sparsity: int, proj_dim: int) -> None:
    if not 1 <= int(sparsity) <= int(proj_dim):
        raise ValueError(f"sjlt needs 1 <= sparsity <= proj_dim, got {sparsity}, {proj_dim}")
    if proj_dim // sparsity + 1 > (1 << 31):
        raise ValueError("sjlt block size must be < 2**31")


def _blocks(steps: range, enabled: bool, desc: str):
    """``steps`` behind the progress bar, drawn when ``enabled`` and there are several."""
    return progress_bar(steps, enabled=enabled, desc=desc, several=True)


class Projection:
    """Random projection engine held by a fitted ``RandomProjector``.

    A plain picklable object.  Its pickle only stores the parameters
    ``(seed, proj_type, sparsity, n_features, proj_dim, dtype, device,
    memory_budget)``; cached matrices / indices are rebuilt on demand.

    Parameters
    ----------
    seed : int
        Seed of the matrix.
    proj_type : {"rademacher", "normal", "sjlt"}
        Type of projection (see the module docstring).
    sparsity : int
        Nonzeros per feature for ``"sjlt"`` (ignored for dense types).
    n_features : int
        Input dimension ``p``.
    proj_dim : int
        Output dimension ``k``.
    dtype : torch.dtype
        float32, float64, float16 or bfloat16: dtype of the matrix and the
        output.  For half types on CPU the product is computed in float32 on
        the half-rounded matrix and the result is cast.
    device : torch.device
        Device of the matrix, of the input and of the output.
    memory_budget : int
        Bytes the engine may use for cached matrices / temporaries.  Dense
        matrices that fit (``p*k*itemsize <= memory_budget``) are generated
        once and cached; of larger ones the leading rows that fit beside one
        streaming block are cached and the rest is regenerated block by block
        on every :meth:`project` call (the full matrix is never held).
    """

    #: Rows per streamed block; ``None`` = derived from the budget.  Private
    #: knob (tests force tiny blocks; results only change by rounding).
    _block_rows: int | None = None

    def __init__(
        self, seed, proj_type, sparsity, n_features, proj_dim, *, dtype, device, memory_budget: int
    ):
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
        _check_dtype(dtype)
        self.seed = int(seed)
        self.proj_type = proj_type
        self.sparsity = int(sparsity)
        self.n_features = int(n_features)
        self.proj_dim = int(proj_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.memory_budget = int(memory_budget)
        if self.n_features < 1 or self.proj_dim < 1:
            raise ValueError("n_features and proj_dim must be >= 1")
        if self.n_features > (1 << 32):
            raise ValueError("n_features must be <= 2**32")
        if proj_type == "sjlt":
            _check_sjlt(self.sparsity, self.proj_dim)
        self._reset()

    # -- pickling: parameters only ------------------------------------------
    _PARAMS = (
        "seed",
        "proj_type",
        "sparsity",
        "n_features",
        "proj_dim",
        "dtype",
        "device",
        "memory_budget",
    )

    def _reset(self) -> None:
        # Caches shared by every thread, filled once under the lock (read freely
        # once published; their contents never change afterwards).
        self._cache: torch.Tensor | None = None  # leading rows of the dense matrix
        self._table_c: torch.Tensor | None = None
        self._sj_index: torch.Tensor | None = None  # (s, p) folded sjlt indices
        self._lock = threading.Lock()
        # Scratch written by every projection, one set per thread: the hashing
        # buffers (``ws``) and the streamed-block buffer (``blockbuf``; a fresh
        # 64 MiB block per step costs page faults comparable to generating it).
        # Shared between threads, concurrent calls overwrote each other's blocks.
        self._scratch = threading.local()

    def __getstate__(self):
        state = {name: getattr(self, name) for name in self._PARAMS}
        if "_block_rows" in self.__dict__:
            state["_block_rows"] = self._block_rows
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._PARAMS)
        return f"Projection({args})"

    def to(self, device) -> Projection:
        """Return an equivalent engine on ``device`` (same matrix, bit for bit)."""
        new = Projection(
            self.seed,
            self.proj_type,
            self.sparsity,
            self.n_features,
            self.proj_dim,
            dtype=self.dtype,
            device=device,
            memory_budget=self.memory_budget,
        )
        if "_block_rows" in self.__dict__:
            new._block_rows = self._block_rows
        return new

    # -- internals -------------------------------------------------------------
    @property
    def _compute(self) -> torch.dtype:
        return matmul_dtype(self.dtype, self.device, stage="project")

    @property
    def _key(self) -> int:
        return _key(self.seed, self.proj_type, self.sparsity)

    def _table(self) -> torch.Tensor:
        table = self._table_c
        if table is None:  # small and pure: a thread that races here builds the same one
            table = _table(self.proj_type, self.proj_dim, self.dtype, self._compute, self.device)
            self._table_c = table
        return table

    def _rows_per_block(self) -> int:
        if self._block_rows is not None:
            return max(1, int(self._block_rows))
        cap = min(self.memory_budget // 4, _MAX_BLOCK_BYTES)
        return rows_within(cap, self.proj_dim * itemsize(self._compute))

    def _workspace(self, rows: int) -> _Workspace:
        ng, sub, per_idx = _plan(self.proj_type, rows, self.proj_dim)
        ws = getattr(self._scratch, "ws", None)
        if ws is None or not ws.fits(sub * ng, sub * ng * per_idx, self.device):
            ws = self._scratch.ws = _Workspace(sub * ng, sub * ng * per_idx, self.device)
        return ws

    def _gen(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [r0, r1) in the compute dtype (values rounded to self.dtype)."""
        if out is None:
            out = torch.empty((r1 - r0, self.proj_dim), dtype=self._compute, device=self.device)
        return _fill_dense(
            out, self._key, self.proj_type, r0, r1, self._table(), self._workspace(r1 - r0)
        )

    def _cached_rows(self) -> int:
        """Leading rows of the dense matrix kept in memory between calls.

        All of them when the matrix fits ``memory_budget``; otherwise as many
        whole streaming blocks as fit beside the block buffer, so a streamed
        projection regenerates only the rest (the budget is there to be used:
        at p=1e6, k=2048 a 2 GiB budget holds a quarter of the 8 GiB matrix).
        """
        row = self.proj_dim * itemsize(self._compute)
        if self.n_features * row <= self.memory_budget:
            return self.n_features
        step = self._rows_per_block()
        blocks = max(0, self.memory_budget - step * row) // (step * row)
        return min(self.n_features, blocks * step)

    def _prefix(self) -> torch.Tensor:
        """The cached leading rows (``_cached_rows()`` of them), built on first use.

        Built once under the lock: threads that ask meanwhile wait for it
        rather than each building a copy (which would exceed the budget).
        """
        cache = self._cache
        if cache is not None:
            return cache
        with self._lock:
            if self._cache is not None:
                return self._cache
            rows = self._cached_rows()
            out = torch.empty((rows, self.proj_dim), dtype=self._compute, device=self.device)
            if out.device.type == "cpu":
                # Pre-fault the fresh pages with one parallel fill: first-touch
                # page faults taken inside the index_select passes cost far more
                # (measured 2.7 s -> 1.7 s for a 1.6 GB normal matrix).
                out.zero_()
            step = self._rows_per_block()
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                self._gen(r0, r1, out[r0:r1])
            self._cache = out
            if rows == self.n_features:
                self._scratch.ws = None  # this thread's scratch is not needed any more
        return out

    def _sjlt_index(self) -> torch.Tensor:
        """(s, p) index into the doubled output: 2*col + (sign < 0)."""
        index = self._sj_index
        if index is not None:
            return index
        with self._lock:  # built once, as _prefix
            if self._sj_index is None:
                cols, neg = _sjlt_hash(
                    self._key, self.sparsity, 0, self.n_features, self.proj_dim, self.device
                )
                # int64 on purpose: CPU index_add_ with an int32 index falls off the
                # fast path (measured 16x slower).
                self._sj_index = cols.mul_(2).add_(neg).t().contiguous()
            return self._sj_index

    # -- public API ----------------------------------------------------------------
    def matrix(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Dense matrix (or rows ``[r0, r1)`` of it) in ``self.dtype``.

        Meant for tests and small problems; sjlt is densified.
        """
        r0, r1 = (0, self.n_features) if rows is None else _check_rows(rows)
        r1 = min(r1, self.n_features)
        if self.proj_type == "sjlt":
            cols, signs = sjlt_indices(
                self.seed, self.sparsity, (r0, r1), self.proj_dim, device=self.device
            )
            val = torch.tensor(1.0 / math.sqrt(self.sparsity), dtype=torch.float64)
            val = val.to(self.dtype).to(self.device)
            out = torch.zeros((r1 - r0, self.proj_dim), dtype=self.dtype, device=self.device)
            out.scatter_(1, cols, signs.to(self.dtype) * val)
            return out
        if self._cache is not None and r1 <= self._cache.shape[0]:
            return self._cache[r0:r1].to(self.dtype)
        return self._gen(r0, r1).to(self.dtype)

    def streams(self) -> bool:
        """Whether :meth:`project` regenerates part of the matrix on every call.

        Dense types: the matrix does not fit ``memory_budget`` whole. sjlt:
        its ``(sparsity, n_features)`` index does not fit half of it.
        """
        if self.proj_type == "sjlt":
            return self.n_features * self.sparsity * 8 > self.memory_budget // 2
        return self._cached_rows() < self.n_features

    def block_bytes(self) -> int:
        """Bytes of one regenerated block (dense) or feature chunk's temporaries (sjlt)."""
        if self.proj_type == "sjlt":
            return self.memory_budget // 4
        return self._rows_per_block() * self.proj_dim * itemsize(self._compute)

    def project(self, X: torch.Tensor, progress: bool = False, cache: bool = True) -> torch.Tensor:
        """Project ``X`` of shape ``(n, n_features)`` to ``(n, proj_dim)``.

        Parameters
        ----------
        X : torch.Tensor
            Floating tensor on ``self.device`` (any float dtype).
        progress : bool, default=False
            Show a progress bar over the blocks regenerated by this call
            (when there are several).
        cache : bool, default=True
            Use (and build on first use) the cached leading rows of the
            matrix, or the cached sjlt index. False regenerates every block
            in this call and caches nothing: a caller that projects many rows
            at once spends the budget on those rows instead (the same values,
            to rounding).

        Returns
        -------
        torch.Tensor
            ``X @ P`` in ``self.dtype``.
        """
        if X.dim() != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must have shape (n, {self.n_features}), got {tuple(X.shape)}")
        if X.device.type != self.device.type:
            raise ValueError(f"X is on {X.device}, projection on {self.device}")
        if self.proj_type == "sjlt":
            Y = self._project_sjlt(X, progress, cache)
        else:
            Y = self._project_dense(X, progress, cache)
        return Y if Y.dtype == self.dtype else Y.to(self.dtype)

    def _project_dense(
        self, X: torch.Tensor, progress: bool = False, cache: bool = True
    ) -> torch.Tensor:
        cd, n, p = self._compute, X.shape[0], self.n_features
        same = X.dtype == cd
        cached = self._cached_rows() if cache else 0
        if cached == p and same:
            return X @ self._prefix()  # steady state: a single matmul
        step = min(self._rows_per_block(), p)
        M = self._prefix() if cached else None
        if same and cached:
            Y = X[:, :cached] @ M  # the cached rows in one large product
            start = cached
        else:
            Y = torch.zeros((n, self.proj_dim), dtype=cd, device=self.device)
            start = 0
        if cached < p:
            buf = getattr(self._scratch, "blockbuf", None)
            if buf is None or buf.shape[0] != step or buf.dtype != cd:
                buf = torch.empty((step, self.proj_dim), dtype=cd, device=self.device)
                buf.zero_()  # pre-fault once (see _prefix)
                self._scratch.blockbuf = buf
        for r0 in _blocks(range(start, p, step), progress, "RandomProjector blocks"):
            r1 = min(p, r0 + step)
            # Blocks are whole multiples of step, so none straddles the cache end.
            blk = M[r0:r1] if r1 <= cached else self._gen(r0, r1, buf[: r1 - r0])
            xb = X[:, r0:r1]
            Y.addmm_(xb if same else xb.to(cd), blk)
        return Y

    def _project_sjlt(
        self, X: torch.Tensor, progress: bool = False, cache: bool = True
    ) -> torch.Tensor:
        cd, n, p, k, s = self._compute, X.shape[0], self.n_features, self.proj_dim, self.sparsity
        item = itemsize(cd)
        cacheable = cache and p * s * 8 <= self.memory_budget // 2
        idx_all = self._sjlt_index() if cacheable else None
        same = X.dtype == cd and X.stride(1) == 1
        if same and cacheable:
            fc = p  # no temporaries besides the (n, 2k) accumulator
        else:
            # Feature chunks: a converted slice of X (n*fc*item) plus, when the
            # index is not cached, its hashing temporaries (~3 int64 per entry).
            per_feature = (0 if same else n * item) + (0 if cacheable else 24 * s)
            fc = rows_within(self.memory_budget // 4, per_feature, p)
        key = self._key
        # Signs are folded into the index: column 2j accumulates +x, 2j+1
        # accumulates -x, so no signed copy of X is ever materialised.
        Y2 = torch.zeros((n, 2 * k), dtype=cd, device=self.device)
        for f0 in _blocks(range(0, p, fc), progress and idx_all is None, "RandomProjector blocks"):
            f1 = min(p, f0 + fc)
            if idx_all is not None:
                idx = idx_all[:, f0:f1]
            else:
                cols, neg = _sjlt_hash(key, s, f0, f1, k, self.device)
                idx = cols.mul_(2).add_(neg).t().contiguous()
            xs = X[:, f0:f1]
            if not same:
                xs = xs.to(cd).contiguous()
            for t in range(s):
                Y2.index_add_(1, idx[t], xs)
        scale = torch.tensor(1.0 / math.sqrt(s), dtype=torch.float64)
        scale = scale.to(self.dtype).item()  # entries are the dtype-rounded value
        Yv = Y2.view(n, k, 2)
        return torch.sub(Yv[..., 0], Yv[..., 1]).mul_(scale)

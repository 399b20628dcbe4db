"""Inverse-Fisher-vector products: ExplicitIFVP and DataInfIFVP against dattri 0.1.0's way.

One table, measured side by side in one run (medians; ratios):

* ExplicitIFVP, p=2000 n=5000 m=100 (dense form) and p=10,000 n=1000 m=100
  (kernel form): fit and transform time against a per-call
  ``torch.linalg.solve`` on the damped ``p x p`` matrix (what dattri
  0.1.0 does; see ``_ifvp_explicit.py``).
* DataInfIFVP, one layer p=50,000 n=1000 m=100: transform against dattri's
  per-example ``vmap`` formulation and the two-matmul limit (each method in a
  fresh process for its own peak memory; see ``_ifvp_datainf.py``).
* EKFACIFVP, MLP 784-512-256-10 on 10,000 examples: fit against one
  forward+backward epoch, kronfluence's EK-FAC and dattri's
  ``ifvp_at_x_ekfac``; transform of 100 gradients against its matrix
  products (a second table; see ``_ifvp_ekfac.py``).
* ArnoldiProjector, MLP of 9,610 parameters on 1000 examples, proj_dim=50,
  max_iter=100: fit time, peak memory, eigenvalue error against the dense
  Hessian and NaN count, against dattri's ``arnoldi_project`` (a third table;
  see ``_arnoldi.py``).

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_ifvp.py [--quick]`` (``make bench``).
"""

import sys

import _arnoldi
import _ifvp_datainf
import _ifvp_ekfac
import _ifvp_explicit
from _util import print_table


def main():
    quick = "--quick" in sys.argv[1:]
    table = _ifvp_explicit.rows(quick=quick)
    for row in _ifvp_datainf.rows(quick=quick):
        row["speedup"] = row.pop("ratio_vs_vmap")
        row["vs_limit"] = row.pop("ratio_vs_matmul_limit")
        table.append(row)
    print_table(
        "IFVP benchmarks, float32, 2 threads (speed-up: baseline time / this row's; "
        "x limit: this row's time / the two-matmul limit)",
        table,
        [
            ("case", "case", ""),
            ("method", "method", ""),
            ("fit_s", "fit s", "{:.3f}"),
            ("transform_s", "transform s", "{:.4f}"),
            ("speedup", "speed-up vs baseline", "{:.1f}x"),
            ("vs_limit", "x limit", "{:.2f}"),
            ("peak_mb", "peak MB", "{:.0f}"),
        ],
    )
    ekfac = _ifvp_ekfac.rows(quick=quick)
    print_table(
        f"EKFACIFVP, {ekfac[0]['case']}, 2 threads (x epoch: fit time / one forward+backward "
        "epoch; x GEMMs: transform time / its matrix products alone)",
        ekfac,
        _ifvp_ekfac.COLUMNS,
    )
    print_table(
        "ArnoldiProjector vs dattri arnoldi_project, 2 threads (rel err: against eigvalsh of "
        "the dense float64 Hessian; orth: max |U U^T - I|)",
        _arnoldi.rows(quick=quick),
        [("case", "case", ""), *_arnoldi.COLUMNS],
    )


if __name__ == "__main__":
    main()

"""The Hessian study runs end to end and its checks hold."""

from __future__ import annotations

import pytest

from woodfisher.fisher.study import analyze_hessian, print_hessian_table


def test_analyze_hessian_small(tmp_path):
    rows = analyze_hessian(out_png=tmp_path / "h.png", num_grads=(10, 200), block_sizes=(None, 20),
                           num_samples=200, steps=20, num_vectors=3)
    by = {(r["estimator"], r["num_grads"], r["block_size"]): r for r in rows}
    assert by[("exact Hessian (check)", None, None)]["rel_frobenius"] < 1e-10
    # WoodFisher with every sample and the full block is the exact damped empirical Fisher.
    ef = by[("exact empirical Fisher", 200, None)]
    wf = by[("WoodFisher", 200, None)]
    assert wf["rel_frobenius"] == pytest.approx(ef["rel_frobenius"], rel=1e-8)
    assert {"diagonal Fisher", "K-FAC"} <= {r["estimator"] for r in rows}
    assert (tmp_path / "h.png").stat().st_size > 1000
    print_hessian_table(rows)


def test_analyze_hessian_bad_layer():
    with pytest.raises(ValueError, match="layer"):
        analyze_hessian(layer=7, steps=1, num_samples=50, num_grads=(10,))

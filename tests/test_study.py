"""The Hessian study: its checks hold, its figures are written and show exactly its JSON numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import cli_bad as _bad
from conftest import cli_ok as _ok
from woodfisher.fisher.study import analyze_hessian, label
from woodfisher.fisher.study_plots import FIGURES, print_hessian_table, study_figures

SMALL = {"num_grads": (10, 50, 200), "block_sizes": (None, 20), "num_samples": 200,
         "steps": 30, "num_vectors": 3, "num_single": 8, "sparsities": (0.3, 0.7), "window": 24}


@pytest.fixture(scope="module")
def result():
    # Through JSON, as a saved study.json would come back.
    return json.loads(json.dumps(analyze_hessian(**SMALL)))


def test_checks_hold(result):
    by = {label(r): r for r in result["rows"]}
    assert by["exact Hessian (check)"]["rel_frobenius"] < 1e-10
    assert by["exact Hessian (check)"]["newton_cos"] == pytest.approx(1.0, abs=1e-10)
    # WoodFisher with every sample and one block is the exact damped empirical Fisher.
    ef, full = by["exact empirical Fisher"], by["WoodFisher m=200 B=full"]
    for key in ("rel_frobenius", "newton_cos", "loss_decrease_best"):
        assert full[key] == pytest.approx(ef[key], rel=1e-8)
    assert {"diagonal Fisher", "K-FAC", "gradient (no curvature)"} <= set(by)
    assert result["setup"]["layer"] == "2" and result["setup"]["d"] == 800
    # The exact Newton step along the exact direction decreases the loss at its best step.
    assert by["exact Hessian (check)"]["loss_decrease_best"] > 0
    for name, fid in result["fidelity"].items():
        assert len(fid["predicted"]) == 8 + 2, name
        assert -1 <= fid["spearman"] <= 1
    print_hessian_table(result)


def test_quadratic_model_is_exact_for_a_quadratic_loss():
    # Oracle: the squared error of a linear layer is exactly quadratic in its weights, and at
    # the least-squares solution its gradient is zero, so OBS with the exact Hessian predicts
    # the actual loss increase of pruning exactly, for single weights and for sets.
    torch.manual_seed(0)
    X = torch.randn(200, 6, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(6, 3, bias=False)).double()
    with torch.no_grad():
        Y = net(X)  # the current weights solve the least-squares problem exactly

    def mse(out, y):
        return ((out - y) ** 2).sum(-1).mean()

    res = analyze_hessian(net, (X, Y), layer=0, num_grads=(50, 200), block_sizes=(None,),
                          num_samples=200, num_single=5, sparsities=(0.5,), damp=1e-9,
                          window=6, num_vectors=2, loss_fn=mse)
    assert res["setup"]["layer"] == "0" and res["setup"]["grad_norm"] < 1e-12
    # The empirical Fisher is 0 at a zero-residual solution: a case where it fails utterly.
    by = {label(r): r for r in res["rows"]}
    assert by["exact empirical Fisher"]["rel_frobenius"] > 0.99
    exact = res["fidelity"]["exact Hessian (check)"]
    assert exact["kind"] == ["single"] * 5 + ["0.5"]
    assert min(exact["actual"]) > 0
    np.testing.assert_allclose(exact["actual"], exact["predicted"], rtol=1e-6)


def test_figures_plot_the_json_numbers(result):
    figs = study_figures(result)
    assert set(figs) == set(FIGURES)
    rows = {label(r): r for r in result["rows"]}
    # error vs m: one line per block size, then the references as horizontal lines.
    ax = figs["error"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    for b, name in ((None, "full"), (20, "20")):
        wf = sorted((r for r in result["rows"]
                     if r["estimator"] == "WoodFisher" and r["block_size"] == b),
                    key=lambda r: r["num_grads"])
        xy = lines[f"WoodFisher B = {name}"].get_xydata()
        np.testing.assert_array_equal(xy[:, 0], [r["num_grads"] for r in wf])
        np.testing.assert_array_equal(xy[:, 1], [r["rel_frobenius"] for r in wf])
    for ref in ("K-FAC", "diagonal Fisher", "exact empirical Fisher"):
        assert lines[ref].get_ydata()[0] == rows[ref]["rel_frobenius"]
    assert ax.get_yscale() == "linear" and ax.get_xscale() == "log"
    # heatmaps: the windows, on one colour scale.
    images = [a.images[0] for a in figs["heatmaps"].axes if a.images]
    assert len(images) == len(result["windows"])
    np.testing.assert_array_equal(images[0].get_array(),
                                  np.asarray(result["windows"]["exact Hessian (check)"]))
    assert len({(im.norm.vmin, im.norm.vmax) for im in images}) == 1
    # fidelity: scatter of (predicted, actual) for single weights, with ρ in the legend.
    ax = figs["fidelity"].axes[0]
    for coll, fid in zip(ax.collections, result["fidelity"].values(), strict=True):
        single = [k == "single" for k in fid["kind"]]
        expect = np.array([fid["predicted"], fid["actual"]]).T[single]
        np.testing.assert_allclose(coll.get_offsets(), expect)
        assert f"ρ={fid['spearman']:.2f}" in coll.get_label()
    # IHVP panel: cosine to the Newton direction per m.
    ax = figs["ihvp"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    full = sorted((r for r in result["rows"]
                   if r["estimator"] == "WoodFisher" and r["block_size"] is None),
                  key=lambda r: r["num_grads"])
    np.testing.assert_array_equal(lines["WoodFisher B = full"].get_ydata(),
                                  [r["newton_cos"] for r in full])
    import matplotlib.pyplot as plt

    for fig in figs.values():
        plt.close(fig)


def test_bad_layer_and_too_big_layer():
    with pytest.raises(ValueError, match="layer index 7 out of range"):
        analyze_hessian(layer=7, steps=1, num_samples=50, num_grads=(10,))
    net = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 3))
    X, Y = torch.randn(20, 100), torch.randint(0, 3, (20,))
    with pytest.raises(ValueError, match=r"'0' has 5000 weights.*from \['2'\]"):
        analyze_hessian(net, (X, Y), layer="0", num_samples=20)
    with pytest.raises(ValueError, match="needs its data"):
        analyze_hessian(net)


def test_cli_writes_figures_and_json(tmp_path):
    out = tmp_path / "study"
    args = ["analyze-hessian", "--out", str(out), "--samples", "150", "--num-grads", "10,150",
            "--block-sizes", "full,30", "-q"]
    printed = json.loads(_ok([*args, "--json"]).stdout)
    for name in FIGURES.values():
        assert (out / name).stat().st_size > 10_000, name
    assert json.loads((out / "study.json").read_text()) == printed
    assert printed["setup"]["num_grads"] == [10, 150]
    assert printed["setup"]["block_sizes"] == [None, 30]
    _bad(["analyze-hessian", "--out", str(tmp_path / "no" / "h.png")], "does not exist")
    _bad(["analyze-hessian", "--out", str(tmp_path / "no" / "dir")], "does not exist")
    _bad(["analyze-hessian", "--out", str(out), "--num-grads", "10,x"], "--num-grads")
    _bad(["analyze-hessian", "--out", str(out), "--block-sizes", "0"], "--block-sizes")


def test_cli_studies_a_checkpoint_layer(tmp_path):
    ckpt = tmp_path / "m.pt"
    _ok(["train", "--model", "mlpnet-small", "--dataset", "digits", "--epochs", "2",
         "--out", str(ckpt), "-q"])
    res = json.loads(_ok(["analyze-hessian", "--model", str(ckpt), "--layer", "fc3",
                          "--samples", "100", "--num-grads", "20,100", "--block-sizes", "full",
                          "--out", str(tmp_path / "h.png"), "--json", "-q"]).stdout)
    assert res["setup"]["layer"] == "fc3" and res["setup"]["d"] == 200
    assert res["setup"]["model"] == str(ckpt)
    # A .png name is a prefix: h-error_vs_m.png ... h.json beside it.
    assert json.loads((tmp_path / "h.json").read_text()) == res
    assert all((tmp_path / f"h-{name}").is_file() for name in FIGURES.values())
    _bad(["analyze-hessian", "--model", str(ckpt), "--layer", "nope", "--out",
          str(tmp_path / "s")], "unknown layer 'nope'")

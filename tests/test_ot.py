"""scPRAM's OT at scale (models/_ot.py): the bounded-memory pairing against the dense plan, its memory, and the
InputError of a dense plan that cannot fit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import SMALL, SMALL_ARGS

import perturbkit as pk
from perturbkit.cli import main
from perturbkit.errors import InputError
from perturbkit.models import ScPRAM, _ot, get
from perturbkit.models._ot import ot_pairing, ot_pairing_tiled, subsample_sizes


def _latents(n=300, m=320, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), (rng.normal(size=(m, d)) + 0.5).astype(np.float32)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_tiled_pairing_with_every_cell_in_the_subsample_is_the_dense_argmax(device):
    """Potentials of the whole problem, extended by the tiled c-transform: the dense plan's argmax partners
    (all 300 measured), through tiles smaller than a row of the problem."""
    zc, zp = _latents()
    dense, info_d = ot_pairing(zc, zp, tol=1e-6, device=device)
    tiled, info_t = ot_pairing_tiled(zc, zp, tol=1e-6, device=device, tile=100)
    assert "scheme" not in info_d and info_t["subsample_control"] == 300 and info_t["subsample_perturbed"] == 320
    assert info_t["converged"] and info_t["cost_median"] == info_d["cost_median"]
    assert np.mean(dense == tiled) >= 0.99


def test_size_threshold_chooses_the_path_and_the_seed_the_subsample():
    zc, zp = _latents(400, 500)
    small = 200 * 200 * 8 / 2**30  # a cost matrix of 200 x 200 float64
    dense, info = ot_pairing(zc, zp, dense_max_gb=400 * 500 * 8 / 2**30)  # exactly at the limit: dense
    assert "scheme" not in info
    a, info_a = ot_pairing(zc, zp, dense_max_gb=small, seed=1)
    b, _ = ot_pairing(zc, zp, dense_max_gb=small, seed=1)
    c, info_c = ot_pairing(zc, zp, dense_max_gb=small, seed=2)
    assert info_a["scheme"].startswith("Sinkhorn potentials") and info_a["subsample_control"] == 200
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0.3 < np.mean(a == dense) < 1.0  # an approximation, far better than chance (1 / 500)
    with pytest.raises(InputError, match="ot_dense_max_gb"):
        ot_pairing(zc, zp, dense_max_gb=small, return_plan=True)


def test_candidates_cap_the_search():
    zc, zp = _latents(200, 600)
    partner, info = ot_pairing_tiled(zc, zp, subsample_gb=100 * 100 * 8 / 2**30, max_candidates=50, seed=3)
    assert info["candidates"] == 50 and len(np.unique(partner)) <= 50 and partner.max() < 600


def test_subsample_sizes_fit_the_budget():
    gb = 1000 * 1000 * 8 / 2**30
    assert subsample_sizes(10**6, 10**6, gb) == (1000, 1000)
    assert subsample_sizes(500, 10**6, gb) == (500, 2000)  # a small side is taken whole
    assert subsample_sizes(10**6, 400, gb) == (2500, 400)
    for n, m in [(10**6, 10**6), (500, 10**6), (10**6, 400), (1234, 5678)]:
        s_c, s_p = subsample_sizes(n, m, gb)
        assert 8 * s_c * s_p <= gb * 2**30 and s_c <= n and s_p <= m


_PEAK = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from perturbkit.models._ot import ot_pairing

def rss(field):  # bytes; VmHWM is this process's own peak (ru_maxrss would carry pytest's across fork and exec)
    return next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith(field + ":"))

n, d = int(sys.argv[1]), 10
rng = np.random.default_rng(0)
zc = rng.normal(size=(n, d)).astype(np.float32)
zp = (rng.normal(size=(n, d)) + 0.5).astype(np.float32)
kw = dict(dense_max_gb=500 * 500 * 8 / 2**30, tile=2**20)
ot_pairing(zc[:2000], zp[:2000], **kw)  # warm up torch and POT: their first call allocates for good
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from the current RSS
before = rss("VmRSS")
partner, info = ot_pairing(zc, zp, **kw)
print(rss("VmHWM") - before, len(np.unique(partner)), info["subsample_control"])
"""


def test_bounded_memory_at_30k_x_30k():
    """30,000 x 30,000 latent points: the dense float64 cost matrix alone would take 7.2 GB; the tiled pairing
    (a 500 x 500 subsample, tiles of 2**20 pairs: 8 MiB) grows the peak RSS of a fresh process by less than
    128 MiB: a few tile-sized arrays and the allocator's slack (measured 41, 72 and 48 MiB at 10k, 30k and 60k
    cells a side: no growth with the cells)."""
    out = subprocess.run([sys.executable, "-c", _PEAK, "30000"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    grew, distinct, sub = map(int, out.stdout.split())
    assert grew < 128 * 2**20 and sub == 500 and distinct > 1000


def test_exact_plan_that_cannot_fit_stops_before_allocating():
    """100,000 x 100,000 cells: the exact plan would need ~447 GiB; the error comes before any of it."""
    zc, zp = _latents(100_000, 100_000, d=4)
    with pytest.raises(InputError, match=r"needs about 447\.0 GiB .* use ot='sinkhorn'") as err:
        ot_pairing(zc, zp, method="exact")
    assert err.value.params == ("ot",) and "\n" not in str(err.value)


def test_dense_sinkhorn_that_cannot_fit_names_the_threshold(monkeypatch):
    monkeypatch.setattr(_ot, "available_memory", lambda device=None: 2**20)
    zc, zp = _latents(400, 500)
    with pytest.raises(InputError, match=r"lower ot_dense_max_gb \(now 10; default 0\.25\)") as err:
        ot_pairing(zc, zp, dense_max_gb=10)
    assert err.value.params == ("ot_dense_max_gb",)
    with pytest.raises(InputError, match="ot='exact'"):
        ot_pairing(zc, zp, method="exact")


def test_scpram_above_the_threshold_pairs_in_bounded_memory(syn):
    spec = pk.PerturbSpec()
    train, source, _ = pk.split.holdout_cell_type(syn, spec, "ctx1").subsets(syn)
    model = get("scpram", **SMALL, epochs=2, ot_dense_max_gb=100 * 100 * 8 / 2**30).fit(train, spec, seed=0)
    ot = model.fit_info["ot"]
    assert ot["scheme"].startswith("Sinkhorn potentials") and ot["subsample_control"] == 100 and ot["seed"] == 0
    assert ot["n_control"] == 450 and np.isfinite(model.predict(source).X).all()
    json.dumps(model.fit_info)  # the record stays JSON


def test_cli_forced_exact_plan_out_of_memory_exits_2_with_one_line(syn_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_ot, "available_memory", lambda device=None: 2**20)
    argv = ["predict", "--data", str(syn_path), "--model", "scpram", "--holdout", "ctx2", "--epochs", "1",
            "--ot", "exact", "--device", "cpu", "--out", str(tmp_path / "o"), *SMALL_ARGS, "--n-boot", "0",
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "(--ot exact)" in err and "use --ot sinkhorn" in err and "1.0 MiB are available" in err
    assert not (tmp_path / "o" / "scores.csv").exists()


@pytest.mark.parametrize("key, value", [("ot_dense_max_gb", 0), ("ot_dense_max_gb", "big"),
                                        ("ot_max_candidates", 0), ("ot_max_candidates", 2.5)])
def test_bad_sizes_are_refused(key, value):
    with pytest.raises(InputError, match=key):
        ScPRAM(**{key: value})

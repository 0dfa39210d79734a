"""The metrics on a device (issue #19): the torch tile path of energy_distance / mmd_rbf, the execution keyword of
evaluate, and (where a GPU is present) GPU vs CPU agreement.

The torch path is run here on torch's CPU device, where it must equal the numpy path to rounding; the CUDA tests
skip on machines without one (this project's CI has none; benchmarks/bench_gpu.py runs on the lent GPU machine).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from perturbkit import execution, metrics
from perturbkit.errors import InputError
from perturbkit.metrics import evaldata
from perturbkit.metrics import functions as F

from conftest import synthetic

torch = pytest.importorskip("torch")

NO_CUDA = "no CUDA device on this machine: the GPU checks run in benchmarks/bench_gpu.py on the lent GPU machine"


def _data(n=700, m=550, d=12, seed=0):
    """Two Gaussian clouds with exact duplicates, near-identical rows (inside and across the sets): the pairs
    the product form cannot resolve."""
    rng = np.random.default_rng(seed)
    X, Y = rng.normal(size=(n, d)), rng.normal(0.2, 1.1, size=(m, d))
    X[5] = X[7]
    X[100] = X[3] + 1e-9
    X[600] = X[3] - 1e-12
    Y[10] = X[20]
    Y[11] = Y[12]
    Y[300] = Y[299] + 1e-8
    return X, Y


def _torch_ed(X, Y, block=None):
    xy, xx, yy = F._torch_three_means(X, Y, "sqrt", 0.0, block, torch.device("cpu"))
    return 2 * xy - xx - yy


def _torch_mmd(X, Y, gamma, block=None):
    xy, xx, yy = F._torch_three_means(X, Y, "rbf", gamma, block, torch.device("cpu"))
    return xx + yy - 2 * xy


@pytest.mark.parametrize("block", [None, 128, 333])
def test_torch_tiles_on_cpu_equal_numpy(block):
    X, Y = _data()
    ed = F.energy_distance(X, Y, block=block)
    assert _torch_ed(X, Y, block) == pytest.approx(ed, rel=1e-10, abs=0)
    for gamma in (1.0, 0.05):
        mm = F.mmd_rbf(X, Y, gamma, block=block)
        assert _torch_mmd(X, Y, gamma, block) == pytest.approx(mm, rel=1e-10, abs=1e-300)


def test_torch_tiles_identity_and_self_pairs():
    X, _ = _data()
    assert abs(_torch_ed(X, X.copy())) < 1e-12
    assert abs(_torch_mmd(X, X.copy(), 0.1)) < 1e-14
    # every cell duplicated: only the product form's rounding could make this non-zero
    D = np.vstack([X[:50], X[:50]])
    assert _torch_ed(D, X[:50]) == pytest.approx(F.energy_distance(D, X[:50]), rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("device", [None, "cpu", "CPU", "torch-cpu", "execution-cpu"])
def test_cpu_device_is_the_numpy_path(device):
    X, Y = _data(seed=1)
    dev = {"torch-cpu": torch.device("cpu"), "execution-cpu": execution.CPU}.get(device, device)
    assert F.energy_distance(X, Y, device=dev) == F.energy_distance(X, Y)
    assert F.mmd_rbf(X, Y, 0.3, device=dev) == F.mmd_rbf(X, Y, 0.3)


@pytest.mark.parametrize("device", ["mps", torch.device("mps"), "tpu", ""])
def test_devices_refused(device):
    X, Y = _data()
    with pytest.raises(ValueError, match="float64" if "mps" in str(device) else "device must be"):
        F.energy_distance(X, Y, device=device)


def test_mps_execution_scores_on_the_cpu():
    d = evaldata.EvalData(*_data(), np.zeros((30, 12)), None)
    d.execution = execution.Execution(device="mps")
    assert F._distance_device(d) is None


def test_evaluate_with_cpu_execution_is_identical():
    syn = synthetic(n_contexts=2, n_cells=80, n_genes=40, n_responsive=8)
    ctx, cond = syn.obs["cell_type"].astype(str), syn.obs["condition"].astype(str)
    c0 = ctx == ctx.iloc[0]
    truth = syn[c0 & (cond == "stimulated")].copy()
    source = syn[c0 & (cond == "control")].copy()
    pred = syn[(~c0) & (cond == "stimulated")].copy()
    plain = metrics.evaluate(truth, pred, source, n_boot=20, seed=3)
    here = metrics.evaluate(truth, pred, source, n_boot=20, seed=3, execution=execution.resolve("cpu"))
    threads = metrics.evaluate(truth, pred, source, n_boot=20, seed=3,
                               execution=execution.resolve("cpu", threads=1))
    for other in (here, threads):
        pd.testing.assert_frame_equal(plain, other, check_exact=True)
        assert plain.attrs == other.attrs
    assert plain.loc[plain.metric == "edistance", "error"].item() == ""
    ceil = metrics.ceiling(truth, source, seed=1, execution=execution.CPU)
    pd.testing.assert_frame_equal(ceil, metrics.ceiling(truth, source, seed=1), check_exact=True)
    # score's execution replaces the data's without touching the caller's EvalData
    d = metrics.prepare(truth, pred, source)
    metrics.score(d, ["edistance"], n_boot=0, execution=execution.resolve("cpu", threads=1))
    assert d.execution is execution.CPU
    with pytest.raises(InputError, match="Execution"):
        metrics.prepare(truth, pred, source, execution="cuda")


@pytest.mark.parametrize("shape", [(150, 120), (150, 400), (40, 30)])
def test_torch_pca_on_cpu_equals_sklearn(shape):
    """The GPU's PCA (scikit-learn's randomized PCA re-done in torch) run on the CPU: the same components, signs
    and coordinates as scikit-learn's, to rounding (tall and wide data, 7 and 4 power iterations)."""
    n_cells, n_genes = shape
    syn = synthetic(n_contexts=2, n_cells=n_cells, n_genes=n_genes, n_responsive=min(20, n_genes // 3))
    ctx, cond = syn.obs["cell_type"].astype(str), syn.obs["condition"].astype(str)
    c0 = ctx == ctx.iloc[0]
    d = metrics.prepare(syn[c0 & (cond == "stimulated")].copy(), syn[(~c0) & (cond == "stimulated")].copy(),
                        syn[c0 & (cond == "control")].copy(), seed=7, n_top=min(100, n_genes))
    fit_on = np.vstack([d.source_X, d.truth_X])
    ref, ref_info = d.embedding, d.embedding_info
    emb, info = evaldata._pca_torch(fit_on, (d.truth_X, d.pred_X, d.source_X), ref_info["n_comps"],
                                    torch.device("cpu"), d.seed)
    for got, want in zip(emb, ref):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-8 * np.abs(want).max())
    assert info["explained_variance_ratio"] == pytest.approx(ref_info["explained_variance_ratio"], rel=1e-10)
    assert F.energy_distance(emb.truth, emb.pred) == pytest.approx(F.energy_distance(ref.truth, ref.pred),
                                                                   rel=1e-9)
    assert F.mmd_rbf(emb.truth, emb.pred) == pytest.approx(F.mmd_rbf(ref.truth, ref.pred), rel=1e-8, abs=1e-14)


def test_importing_metrics_loads_no_torch():
    code = ("import sys, perturbkit.metrics, perturbkit.metrics.functions, perturbkit.metrics.evaldata; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------ CUDA only


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_energy_distance_equals_cpu():
    X, Y = _data(n=3000, m=2500, d=50)
    for dev in ("cuda", execution.resolve("cuda")):
        assert F.energy_distance(X, Y, device=dev) == pytest.approx(F.energy_distance(X, Y), rel=1e-9, abs=0)
        assert F.mmd_rbf(X, Y, 0.02, device=dev) == pytest.approx(F.mmd_rbf(X, Y, 0.02), rel=1e-9, abs=0)
    assert F.energy_distance(X, Y, device="cuda", block=512) == pytest.approx(F.energy_distance(X, Y), rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_evaluate_agrees_with_cpu():
    syn = synthetic(n_contexts=2, n_cells=150, n_genes=120, n_responsive=20)
    ctx, cond = syn.obs["cell_type"].astype(str), syn.obs["condition"].astype(str)
    c0 = ctx == ctx.iloc[0]
    args = (syn[c0 & (cond == "stimulated")].copy(), syn[(~c0) & (cond == "stimulated")].copy(),
            syn[c0 & (cond == "control")].copy())
    cpu = metrics.evaluate(*args, n_boot=0).set_index("metric")["value"]
    gpu = metrics.evaluate(*args, n_boot=0, execution=execution.resolve("cuda")).set_index("metric")["value"]
    np.testing.assert_allclose(gpu.to_numpy(), cpu.to_numpy(), rtol=1e-3, atol=1e-9)

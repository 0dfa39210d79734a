"""The torch models on the execution context's device (#19, docs/training.md "Devices").

On this machine's CPU: an explicit ``execution.resolve("cpu")`` runs the same path as the default and gives the
same bytes; ``Model.use`` and ``Model.load`` keep predictions; the device code path itself (weights and batches
resident on the device, batches prefetched on a thread, losses summed on the device, scPRAM's torch pairing and
attention) runs on the CPU through a stand-in device and agrees with the CPU path. The CUDA tests need a GPU
and are skipped without one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import SMALL, synthetic

import perturbkit as pk
from perturbkit import execution
from perturbkit.execution import Execution
from perturbkit.models import _train
from perturbkit.models.scpram import attention_weights, cost_matrix, ot_pairing

NO_CUDA = "no CUDA device on this machine: the CUDA path (device-resident training, CUDA graphs) is checked " \
          "only where torch.cuda.is_available()"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
#: CellOT's maps after a few dozen steps are under-trained on purpose here (it says so)
pytestmark = pytest.mark.filterwarnings("ignore:cellot.*extrapolation:perturbkit.errors.InputWarning")

#: small fits: a few seconds each on 2 cores
PARAMS = {
    "scgen": dict(epochs=3, **SMALL),
    "scpram": dict(epochs=3, **SMALL),
    "cellot": dict(epochs=3, ot_iters=40, ot_eval_every=20, **SMALL),
}


@pytest.fixture(scope="module")
def task():
    syn = synthetic()
    spec = pk.PerturbSpec()
    train, source, target = pk.split.holdout_cell_type(syn, spec, "ctx1").subsets(syn)
    return spec, train, source, target


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread (byte-identity holds at a fixed thread count; small models are fastest so)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fit(name, task, seed=0, ex=None, **extra):
    spec, train, _, _ = task
    return pk.models.get(name, **{**PARAMS[name], **extra}).fit(train, spec, seed=seed, execution=ex)


@pytest.fixture(scope="module")
def fitted(task):
    """One default (no execution given) fit of each model."""
    return {name: _fit(name, task) for name in PARAMS}


def _arrays(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in model._state_arrays().items()}


def _same_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _pred(model, task) -> np.ndarray:
    return np.asarray(model.predict(task[2]).X)


# ------------------------------------------------------------------------------------------- the CPU path


@pytest.mark.parametrize("name", list(PARAMS))
def test_explicit_cpu_execution_is_the_default_path(name, task, fitted):
    """``execution.resolve("cpu")`` and the default (``execution.CPU``) give the same weights, history floats and
    predictions, bit for bit, and the fit records the device."""
    default = fitted[name]
    explicit = _fit(name, task, ex=execution.resolve("cpu"))
    assert default.execution is execution.CPU and explicit.execution.device == "cpu"
    assert _same_arrays(_arrays(default), _arrays(explicit))
    assert default.history.train_loss == explicit.history.train_loss
    assert default.history.val_loss == explicit.history.val_loss
    assert np.array_equal(_pred(default, task), _pred(explicit, task))
    for model in (default, explicit):
        info = model.fit_info
        assert info["device"] == "cpu" and info["cuda_graphs"] is False and info["batches"] == "host"
        assert info["precision"] == model.history.precision and model.history.device == "cpu"
    if name == "cellot":
        assert default.transport_history.g_loss == explicit.transport_history.g_loss


@pytest.mark.parametrize("name", list(PARAMS))
def test_use_and_load_predict_the_same(name, task, fitted, tmp_path):
    """A fitted model moved with ``use(resolve("cpu"))``, and the same model saved and loaded (then moved), predict
    exactly as before."""
    model = fitted[name]
    before = _pred(model, task)
    model.save(tmp_path / name)
    assert model.use(execution.resolve("cpu")) is model
    assert np.array_equal(_pred(model, task), before)
    loaded = pk.models.Model.load(tmp_path / name)
    assert loaded.execution is execution.CPU
    assert np.array_equal(_pred(loaded, task), before)
    assert np.array_equal(_pred(loaded.use(execution.resolve("cpu")), task), before)


def test_loss_summed_in_a_float64_tensor_equals_the_python_float_sum():
    """The training loop sums ``loss.detach().double() * batch`` in a float64 tensor (read once per epoch); that
    is bit-identical to the former ``total += loss.item() * batch`` Python float sum, and so is the mean."""
    rng = np.random.default_rng(0)
    losses = torch.from_numpy((rng.gamma(2.0, 50.0, size=400)).astype(np.float32))
    sizes = rng.integers(2, 129, size=400)
    total, acc = 0.0, torch.zeros((), dtype=torch.float64)
    for loss, size in zip(losses, sizes.tolist()):
        total += loss.item() * size
        acc += loss.detach().double() * size
    assert acc.item() == total
    assert acc.item() / int(sizes.sum()) == total / int(sizes.sum())


def test_execution_precision_overrides_the_models(task):
    """``execution.precision_for``: a context's precision replaces the model's own setting (recorded)."""
    model = _fit("scgen", task, ex=execution.resolve("cpu", precision="bfloat16"), epochs=1)
    assert model.params["precision"] == "float32"
    assert model.history.precision == model.fit_info["precision"] == "bfloat16"


def test_auto_precision_on_the_cpu_follows_its_instructions():
    assert _train.resolve_precision("auto") == _train.resolve_precision("auto", execution.CPU) == \
        ("bfloat16" if _train.native_bf16() else "float32")
    assert _train.resolve_precision("float32", execution.CPU) == "float32"


# ------------------------------------------------------------------------------------ the device code path


class StandIn(Execution):
    """The CPU posing as a device: everything but CUDA's pinning, streams and graphs takes the device path
    (the matrix resident "on the device", prefetched batches for sparse data, scPRAM's torch pairing and
    attention, CellOT's device batch generator and deferred finiteness check)."""

    @property
    def kind(self) -> str:
        return "stand-in"


STAND_IN = StandIn(device="cpu")


@pytest.mark.parametrize("form", ["dense", "sparse", "disk"], ids=["dense-resident", "sparse-prefetched",
                                                                   "disk-prefetched"])
def test_device_path_trains_the_same_weights(task, fitted, form, tmp_path):
    """scGen through the device path: the whole matrix "on the device" (dense), batches densified on the
    prefetch thread (sparse), or read from a file in groups on that thread (disk: the training cells as a
    view of an OnDisk file) give the CPU path's weights, losses and predictions bit for bit (the same random
    draws: the stand-in device's generator is the CPU's)."""
    from perturbkit import ondisk

    spec, train, _, _ = task
    if form != "dense":
        train = train.copy()
        train.X = sp.csr_matrix(train.X)
    if form == "disk":
        train.write_h5ad(tmp_path / "train.h5ad")
        train = ondisk.OnDisk(tmp_path / "train.h5ad")[np.arange(train.n_obs)]
    model = pk.models.get("scgen", **PARAMS["scgen"]).fit(train, spec, seed=0, execution=STAND_IN)
    assert model.history.batches == {"dense": "device", "sparse": "prefetch", "disk": "disk"}[form]
    assert _same_arrays(_arrays(model), _arrays(fitted["scgen"]))
    assert model.history.train_loss == fitted["scgen"].history.train_loss
    assert model.history.val_loss == fitted["scgen"].history.val_loss
    assert np.array_equal(_pred(model, task), _pred(fitted["scgen"], task))


def test_device_path_scpram_and_cellot(task, fitted):
    """scPRAM through the device path pairs and attends in torch: the same VAE, the same partners, predictions
    equal to the numpy path's within 1e-5. CellOT's autoencoder is the same; its transport draws its batches
    from the device's own generator (a different stream from the CPU's), so only its run and record are
    checked."""
    scpram = _fit("scpram", task, ex=STAND_IN)
    ref = fitted["scpram"]
    assert _same_arrays({k: v for k, v in _arrays(scpram).items() if k.startswith("module.")},
                        {k: v for k, v in _arrays(ref).items() if k.startswith("module.")})
    assert scpram.fit_info["ot"]["solver"].endswith("on torch tensors")
    np.testing.assert_allclose(scpram.paired_delta, ref.paired_delta, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_pred(scpram, task), _pred(ref, task), rtol=0, atol=1e-5)
    cellot = _fit("cellot", task, ex=STAND_IN)
    assert _same_arrays({k: v for k, v in _arrays(cellot).items() if k.startswith("module.")},
                        {k: v for k, v in _arrays(fitted["cellot"]).items() if k.startswith("module.")})
    assert np.isfinite(_pred(cellot, task)).all() and len(cellot.transport_history.steps) == 2


def test_prefetch_thread_yields_in_order_stops_early_and_raises():
    made = []

    def make(i):
        made.append(i)
        return torch.full((2,), float(i))

    got = [int(x[0]) for x in _train.prefetched(make, range(20), execution.CPU)]
    assert got == list(range(20))
    made.clear()
    gen = _train.prefetched(make, range(1000), execution.CPU)
    assert int(next(gen)[0]) == 0
    gen.close()  # stops the thread: it made at most the queue's depth beyond what was taken
    assert len(made) <= _train.PREFETCH_DEPTH + 3

    def broken(i):
        if i == 3:
            raise ValueError("bad batch 3")
        return torch.zeros(1)

    with pytest.raises(ValueError, match="bad batch 3"):
        list(_train.prefetched(broken, range(10), execution.CPU))


def _latents(seed=0, n=300, m=320, d=8):
    rng = np.random.default_rng(seed)
    zc = rng.normal(size=(n, d)).astype(np.float32)
    zp = (rng.normal(size=(m, d)) + 0.5).astype(np.float32)
    return zc, zp


@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_torch_pairing_matches_numpy(tol):
    """scPRAM's pairing in torch (float64, here on the CPU) against the numpy/POT path (float32 matrix scaling):
    at least 99 % identical partners (100 % measured on these problems) and transport cost ``<P, M>`` within
    1e-6 relative (~2e-8 measured)."""
    zc, zp = _latents()
    p_np, info_np, P_np = ot_pairing(zc, zp, tol=tol, return_plan=True)
    p_t, info_t, P_t = ot_pairing(zc, zp, tol=tol, return_plan=True, device="cpu")
    assert info_np["converged"] and info_t["converged"] and info_t["device"] == "cpu"
    assert info_t["cost_median"] == info_np["cost_median"]  # the same median of the same float64 costs
    assert np.mean(p_np == p_t) >= 0.99
    M = cost_matrix(zc, zp)
    c_np, c_t = float((P_np * M).sum()), float((P_t * M).sum())
    assert abs(c_np - c_t) <= 1e-6 * abs(c_np)


@pytest.mark.parametrize("mode", ["cell", "first_cell"])
def test_torch_attention_matches_numpy(mode):
    """Attention in torch (here on the CPU) keeps the same keys with the same weights as numpy (to 1e-6; ~1e-16
    measured)."""
    zc, _ = _latents()
    query = np.random.default_rng(1).normal(size=(150, 8)).astype(np.float32)
    for ratio in (0.05, 1.0):
        a = attention_weights(query, zc, ratio, mode=mode, chunk=64)
        b = attention_weights(query, zc, ratio, mode=mode, chunk=64, device="cpu")
        assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
        np.testing.assert_allclose(b.data, a.data, rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------------------- CUDA


def _scores(pred: np.ndarray, target, source) -> dict[str, float]:
    """pearson_delta and r2_mean_all as perturbkit.metrics defines them (per-gene means)."""
    p, t, s = (np.asarray(x, dtype=np.float64).mean(axis=0) for x in (pred, target.X, source.X))
    return {"pearson_delta": float(np.corrcoef(p - s, t - s)[0, 1]),
            "r2_mean_all": float(np.corrcoef(t, p)[0, 1] ** 2)}


CUDA_PARAMS = {
    "scgen": dict(epochs=30, **SMALL),
    "scpram": dict(epochs=30, **SMALL),
    "cellot": dict(epochs=30, ot_iters=400, **SMALL),
}


@needs_cuda
@pytest.mark.parametrize("name", list(CUDA_PARAMS))
def test_cuda_fit_scores_agree_with_the_cpu(name, task):
    """Each model fitted on CUDA scores like its CPU fit on the planted effect: pearson_delta within 0.02 and
    r2_mean_all within 0.01 (the random streams differ: CUDA draws dropout and noise on the device)."""
    spec, train, source, target = task
    ex = execution.resolve("cuda")
    results = {}
    for where in ("cpu", "cuda"):
        model = pk.models.get(name, **CUDA_PARAMS[name]).fit(
            train, spec, seed=0, execution=ex if where == "cuda" else None)
        assert model.fit_info["device"] == (ex.device if where == "cuda" else "cpu")
        results[where] = _scores(model.predict(source).X, target, source)
    assert abs(results["cuda"]["pearson_delta"] - results["cpu"]["pearson_delta"]) <= 0.02, results
    assert abs(results["cuda"]["r2_mean_all"] - results["cpu"]["r2_mean_all"]) <= 0.01, results


@dataclass
class _Quiet:
    """A VAE trained without noise (no dropout, no input noise, posterior means in the loss): its training is
    deterministic up to floating-point rounding, so eager and graph-replayed steps can be compared."""

    n_input: int

    def build(self):
        from perturbkit.models._vae import VAE, VAEConfig

        class QuietVAE(VAE):
            def loss(self, x, *, sample=True):
                return super().loss(x, sample=False)

        with execution.CPU.seeded(0):
            return QuietVAE(VAEConfig(n_input=self.n_input, n_hidden=64, n_latent=8, dropout_rate=0.0))


@needs_cuda
def test_cuda_graph_replay_matches_eager(task):
    """The same model trained eagerly and with CUDA graph replay on CUDA: the weights agree to within 1e-4
    (absolute, plus 1e-3 relative) after 5 epochs of 17 steps, and the history says which ran graphs. The
    replayed kernels are those of the eager step, so only rounding of atomics-based reductions may differ."""
    _, train, _, _ = task
    X = np.asarray(train.X, dtype=np.float32)
    cfg = _train.TrainConfig(epochs=5, batch_size=50, patience=None)
    out = {}
    for graphs in (False, True):
        module = _Quiet(X.shape[1]).build()
        hist = _train.train_vae(module, X, cfg, seed=0, progress=False,
                                execution=execution.resolve("cuda", graphs=graphs))
        assert hist.cuda_graphs is graphs and hist.batches == "device"
        out[graphs] = (hist, {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()})
    for k, v in out[False][1].items():
        np.testing.assert_allclose(out[True][1][k], v, rtol=1e-3, atol=1e-4, err_msg=k)
    np.testing.assert_allclose(out[True][0].train_loss, out[False][0].train_loss, rtol=1e-4)
    # scGen itself (dropout, noise): graphs are used and the loss curve stays that of eager training (5 %)
    spec, train, _, _ = task
    h = {g: pk.models.get("scgen", epochs=5, **SMALL).fit(
        train, spec, seed=0, execution=execution.resolve("cuda", graphs=g)).history for g in (False, True)}
    assert h[True].cuda_graphs and not h[False].cuda_graphs
    assert math.isclose(h[True].val_loss[-1], h[False].val_loss[-1], rel_tol=0.05)


@needs_cuda
def test_cuda_disk_batches_match_resident(task, tmp_path):
    """Training cells left on disk: batches read in groups on the prefetch thread, pinned and copied without
    blocking; the same training as the resident matrix up to GPU rounding (weights within 1e-4 + 1e-3 rel)."""
    from perturbkit import ondisk

    spec, train, _, _ = task
    ex = execution.resolve("cuda")
    sparse = train.copy()
    sparse.X = sp.csr_matrix(sparse.X)
    sparse.write_h5ad(tmp_path / "train.h5ad")
    with ondisk.OnDisk(tmp_path / "train.h5ad") as od:
        a = pk.models.get("scgen", epochs=2, **SMALL).fit(train, spec, seed=0, execution=ex)
        b = pk.models.get("scgen", epochs=2, **SMALL).fit(od[np.arange(od.n_obs)], spec, seed=0, execution=ex)
    assert a.history.batches == "device" and b.history.batches == "disk"
    for k, v in _arrays(a).items():
        np.testing.assert_allclose(_arrays(b)[k], v, rtol=1e-3, atol=1e-4, err_msg=k)


@needs_cuda
def test_cuda_sparse_prefetch_matches_resident(task):
    """Sparse training data goes through the prefetch thread (pinned, non-blocking copies), dense data stays on
    the device: the same batches, so the same training up to GPU rounding (weights within 1e-4 + 1e-3 rel)."""
    spec, train, _, _ = task
    ex = execution.resolve("cuda")
    sparse = train.copy()
    sparse.X = sp.csr_matrix(sparse.X)
    a = pk.models.get("scgen", epochs=2, **SMALL).fit(train, spec, seed=0, execution=ex)
    b = pk.models.get("scgen", epochs=2, **SMALL).fit(sparse, spec, seed=0, execution=ex)
    assert a.history.batches == "device" and b.history.batches == "prefetch"
    for k, v in _arrays(a).items():
        np.testing.assert_allclose(_arrays(b)[k], v, rtol=1e-3, atol=1e-4, err_msg=k)


@needs_cuda
@pytest.mark.parametrize("name", list(PARAMS))
def test_cuda_use_moves_a_cpu_fit(name, task, fitted):
    """A CPU fit moved to CUDA with ``use`` predicts what it predicted on the CPU (within 1e-4: float32 GPU
    arithmetic), and back on the CPU exactly."""
    model = fitted[name]
    before = _pred(model, task)
    moved = _pred(model.use(execution.resolve("cuda")), task)
    np.testing.assert_allclose(moved, before, rtol=0, atol=1e-4)
    assert np.array_equal(_pred(model.use(execution.CPU), task), before)

"""CellOT: registration, parameters, the planted effect, seeding, save/load, screens, callbacks, the ICNNs."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import SMALL
from scipy.stats import linregress

import perturbkit as pk
from perturbkit.errors import InputError, InputWarning
from perturbkit.models import MODELS, Model, get
from perturbkit.execution import Execution

#: a small autoencoder (conftest's SMALL) and a small, fast transport: fits in seconds on one CPU thread
FAST = dict(**SMALL, epochs=30, ot_hidden=16, ot_layers=2, ot_iters=300, n_inner_iters=5, ot_batch_size=64,
            ot_lr=1e-2, ot_eval_every=100)


def _task(syn, holdout="ctx1"):
    spec = pk.PerturbSpec()
    return spec, *pk.split.holdout_cell_type(syn, spec, holdout).subsets(syn)


def _fit(train, spec, seed=0, **params):
    model = get("cellot", **{**FAST, **params})
    with Execution(threads=1).activate():  # tiny matrices: one thread is the fastest, and the same everywhere
        return model.fit(train, spec, seed=seed)


def _scores(pred, target, source):
    """r2 of the per-gene means, pred vs truth, and the Pearson r of the predicted vs the real mean change."""
    pm, tm, sm = (np.asarray(a.X).mean(0) for a in (pred, target, source))
    return linregress(tm, pm).rvalue ** 2, np.corrcoef(pm - sm, tm - sm)[0, 1]


def _r2(pred, target):
    return linregress(np.asarray(target.X).mean(0), np.asarray(pred.X).mean(0)).rvalue ** 2


@pytest.fixture(scope="module")
def fitted(syn):
    spec, train, source, target = _task(syn)
    return spec, train, source, target, _fit(train, spec, seed=0)


# ---------------------------------------------------------------------------------------- registry


def test_cellot_is_registered_and_listed():
    cls = MODELS["cellot"]
    assert cls is pk.models.CellOT and cls.name == "cellot" and cls.needs_torch
    assert not cls.COMBINES and not cls.NO_CHANGE and cls.COST > 0
    assert cls.summary().startswith("CellOT:")
    assert set(cls.SEARCH_SPACE) <= set(cls.DEFAULTS) and cls.takes("epochs")
    out = subprocess.run([sys.executable, "-m", "perturbkit", "list", "models"], capture_output=True, text=True,
                         check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("cellot"))
    assert cls.summary() in line


def test_cellot_default_search_space_parses():
    space = pk.tune.default_space("cellot")
    assert list(space) == list(MODELS["cellot"].SEARCH_SPACE)
    cfg = pk.tune.config_from_dict({"models": {"cellot": {}}, "training": {"epochs": 3}})
    assert cfg.name == "cellot" and "epochs" not in cfg.space and cfg.params == {"epochs": 3}


@pytest.mark.parametrize("params, needle", [
    ({"ot_iters": 0}, "'ot_iters' must be an integer >= 1"),
    ({"n_inner_iters": 0}, "'n_inner_iters'"),
    ({"ot_batch_size": 1}, "'ot_batch_size'"),
    ({"ot_lr": 0.0}, "'ot_lr' must be a number > 0"),
    ({"ot_beta1": 1.0}, "'ot_beta1'"),
    ({"g_penalty": -1.0}, "'g_penalty'"),
    ({"ot_val_fraction": 1.0}, "'ot_val_fraction'"),
    ({"source_contexts": "some"}, "'source_contexts' must be 'paired'"),
    ({"output_activation": "tanh"}, "'output_activation'"),
    ({"ot_lr": "fast"}, "parameter 'ot_lr' must be a float"),  # the base's type check
    ({"ot_hidden": 6.5}, "parameter 'ot_hidden' must be an int"),
    ({"n_latent": 0}, "'n_latent' must be >= 1"),
    ({"ot_iter": 10}, "Did you mean 'ot_iters'"),
])
def test_cellot_bad_parameter_names_it(params, needle):
    with pytest.raises(InputError, match=needle):
        get("cellot", **params)


def test_cellot_bad_parameter_from_the_command_line(syn_path, tmp_path, capsys):
    from perturbkit.cli import main

    code = main(["predict", "--data", str(syn_path), "--model", "cellot", "--holdout", "ctx1",
                 "--param", "ot_iters=0", "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2 and "ot_iters" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- fitting


def test_cellot_beats_control_on_planted_effect(fitted):
    spec, train, source, target, model = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # a trained map keeps the cells among the training latents
        pred = model.predict(source)
    r2, pdelta = _scores(pred, target, source)
    r2_control = _r2(get("control").fit(train, spec).predict(source), target)  # its change is 0: no pearson
    assert r2 > r2_control + 0.05
    assert pdelta > 0.7
    # the planted genes go up, the others move much less
    delta = np.asarray(pred.X).mean(0) - np.asarray(source.X).mean(0)
    assert delta[:10].mean() > 0.8 and abs(delta[10:]).mean() < 0.5 * delta[:10].mean()
    assert pred.obs["condition"].eq("stimulated").all() and pred.obs["perturbkit_predicted"].all()


def test_cellot_reports_its_fit(fitted):
    *_, source, _, model = fitted
    info = model.fit_info
    json.dumps(info)  # goes into record.json as it is
    assert info["seed"] == 0 and info["history"]["epochs_run"] >= 1
    t = info["transport"]
    assert t["source_contexts"] == "paired" and t["networks"]["hidden"] == [16, 16]
    rep = t["perturbations"]["stimulated"]
    # paired: the map learns from the control cells of the contexts that have perturbed cells (not ctx1)
    assert rep["contexts"] == ["ctx0", "ctx2", "ctx3"] and rep["n_source"] == 450 and rep["n_target"] == 450
    assert rep["n_val_source"] == 45 and len(rep["val_mmd"]) == 3 and rep["selected_step"] in (100, 200, 300)
    assert model.transport_history.steps == [100, 200, 300] and model.transport_history.epochs_run == 3
    assert model.transport(model.latent(source)).shape == (source.n_obs, SMALL["n_latent"])


def test_cellot_source_contexts_all_uses_every_control(syn):
    spec, train, _, _ = _task(syn)
    model = _fit(train, spec, epochs=2, ot_iters=2, ot_eval_every=1, source_contexts="all")
    rep = model.fit_info["transport"]["perturbations"]["stimulated"]
    assert rep["contexts"] == ["ctx0", "ctx1", "ctx2", "ctx3"] and rep["n_source"] == 600


@pytest.mark.filterwarnings("ignore::perturbkit.errors.InputWarning")  # 20 f-steps: an under-trained map
def test_cellot_same_seed_same_prediction_and_rng_untouched(syn):
    import torch

    spec, train, source, _ = _task(syn)
    quick = dict(epochs=3, ot_iters=20, ot_eval_every=10)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.random.get_rng_state().clone()
    a = _fit(train, spec, seed=7, **quick).predict(source)
    b = _fit(train, spec, seed=7, **quick).predict(source)
    c = _fit(train, spec, seed=8, **quick).predict(source)
    assert np.array_equal(a.X, b.X) and not np.array_equal(a.X, c.X)
    assert np.array_equal(np_state, np.random.get_state()[1])
    assert torch.equal(torch_state, torch.random.get_rng_state())


def test_cellot_save_load_roundtrip(fitted, tmp_path):
    _, _, source, _, model = fitted
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["params.json", "weights.safetensors"]
    meta = json.loads((tmp_path / "m" / "params.json").read_text())
    assert meta["model"] == "cellot" and meta["perturbations"] == ["stimulated"]
    assert meta["params"]["ot_iters"] == FAST["ot_iters"]
    loaded = Model.load(tmp_path / "m")
    assert isinstance(loaded, pk.models.CellOT)
    assert np.array_equal(loaded.predict(source).X, model.predict(source).X)
    # a map that sends cells far beyond the training latents says so
    loaded._g = {k: v * 100 if k.startswith("A") else v for k, v in loaded._g.items()}
    with pytest.warns(InputWarning, match=r"cellot: 150 of 150 cells .* raise ot_iters"):
        loaded.predict(source)
    # weights that do not fit the parameters are refused naming the folder
    meta["params"]["ot_hidden"] = 8
    (tmp_path / "m" / "params.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="do not match its params.json"):
        Model.load(tmp_path / "m")


@pytest.mark.filterwarnings("ignore::perturbkit.errors.InputWarning")  # 40 f-steps: an under-trained map
def test_cellot_callback_sees_every_round_changes_nothing_and_can_stop(syn):
    spec, train, source, _ = _task(syn)
    quick = dict(epochs=3, ot_iters=40, ot_eval_every=10)
    plain = _fit(train, spec, seed=1, **quick)
    model = get("cellot", **{**FAST, **quick})
    seen = []

    def watch(epoch, history):
        seen.append((epoch, history.steps[-1], model.predict(source).X.mean()))  # usable at the current weights
        return False

    with Execution(threads=1).activate():
        model.fit(train, spec, seed=1, callback=watch)
    assert [(e, s) for e, s, _ in seen] == [(1, 10), (2, 20), (3, 30), (4, 40)]
    assert len({m for *_, m in seen}) == 4
    np.testing.assert_array_equal(plain.predict(source).X, model.predict(source).X)  # the same random draws

    with Execution(threads=1).activate():
        stopper = get("cellot", **{**FAST, **quick}).fit(train, spec, seed=1, callback=lambda e, h: e >= 2)
    assert stopper.transport_history.stopped_early and stopper.transport_history.epochs_run == 2
    assert stopper.fit_info["transport"]["perturbations"]["stimulated"]["selected_step"] in (10, 20)
    assert np.isfinite(stopper.predict(source).X).all()


def test_cellot_predict_command_line(syn_path, tmp_path):
    from conftest import SMALL_ARGS

    from perturbkit.cli import main

    out = tmp_path / "out"
    ot = {**{k: v for k, v in FAST.items() if k.startswith(("ot_", "n_inner"))}, "ot_iters": 100, "ot_eval_every": 50}
    args = ["predict", "--data", str(syn_path), "--model", "cellot", "--holdout", "ctx1", "--epochs", "10",
            *SMALL_ARGS, *(a for k, v in ot.items() for a in ("--param", f"{k}={v}")), "--threads", "1",
            "--n-boot", "0", "--metrics", "r2_mean_all,pearson_delta", "--no-progress", "--out", str(out),
            "--save-model", str(tmp_path / "m")]
    assert main(args) == 0
    record = json.loads((out / "record.json").read_text())
    fit = record["models"]["cellot"]["fit"]
    assert fit["history"]["epochs_run"] == 10 and fit["transport"]["history"]["steps"] == [50, 100]
    assert record["models"]["cellot"]["params"]["ot_iters"] == 100
    assert Model.load(tmp_path / "m").name == "cellot"


# ------------------------------------------------------------------------------------------ screens


@pytest.mark.filterwarnings("ignore::perturbkit.errors.InputWarning")  # 20 f-steps: an under-trained map
def test_cellot_screen_learns_each_single_and_refuses_unseen_combination():
    screen = pk.data.synthetic_screen()
    spec = pk.PerturbSpec(perturbed="all")
    split = pk.split.holdout_combination(screen, spec, "A+B")
    train, source, _ = split.subsets(screen)
    model = _fit(train, spec, epochs=3, ot_iters=20, ot_eval_every=10)
    assert model.trained == ["A", "B", "C", "C+D", "D"]
    assert set(model.fit_info["transport"]["perturbations"]) == set(model.trained)
    assert all(model.can_predict(p) for p in model.trained) and not model.can_predict("A+B")
    preds = {p: model.predict(source, p).X for p in ("A", "B")}
    assert preds["A"].shape == (source.n_obs, screen.n_vars) and not np.array_equal(preds["A"], preds["B"])
    with pytest.raises(InputError, match="cannot predict 'A\\+B'"):
        model.predict(source, "A+B")
    with pytest.raises(InputError, match="name the one to predict"):
        model.predict(source)


# ------------------------------------------------------------------------------------------- ICNNs


def test_icnn_is_convex_and_its_gradient_is_the_map():
    import torch

    from perturbkit.models.cellot import grad_map, icnn, init_icnns

    gen = torch.Generator().manual_seed(0)
    params = init_icnns(2, 5, 8, 3, 0.1, gen)
    params = {k: (v + torch.rand(v.shape, generator=gen) - 0.3 if k.startswith(("A", "b")) else v).double()
              for k, v in params.items()}  # any A and b; the W stay >= 0
    x, y = (torch.randn(2, 50, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    for t in (0.25, 0.5, 0.75):
        mid = icnn(params, t * x + (1 - t) * y)
        assert (mid <= t * icnn(params, x) + (1 - t) * icnn(params, y) + 1e-9).all()
    grad = grad_map(params, x)
    xr = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(icnn(params, xr).sum(), xr)
    assert torch.allclose(grad, auto, atol=1e-12)
    eps = 1e-6
    for i in range(5):
        step = torch.zeros(5, dtype=torch.float64)
        step[i] = eps
        numeric = (icnn(params, x + step) - icnn(params, x - step))[..., 0] / (2 * eps)
        assert torch.allclose(grad[..., i], numeric, atol=1e-6)
    # the map is differentiable in the weights (the g-steps train through it)
    loss = grad_map({k: v.clone().requires_grad_(True) for k, v in params.items()}, x).pow(2).sum()
    loss.backward()

"""Screens on seeded synthetic data with planted effects (:func:`perturbkit.data.synthetic_screen`: 3
contexts, control + A-D + the additive combinations A+B and C+D, D a null perturbation): context transfer and
unseen combinations for scgen, scpram and the baselines; one fit serves every perturbation; save / load; bad
input."""

from __future__ import annotations

import numpy as np
import pytest

import perturbkit as pk
from perturbkit.errors import InputError
from perturbkit.models import MODELS, Model, get
from perturbkit.execution import Execution
from perturbkit.metrics import score_models as score

# 50 genes: the metrics' top-100 DEG sets take every gene, and say so
pytestmark = pytest.mark.filterwarnings("ignore:n_top=100 is more than:UserWarning")

SPEC = pk.PerturbSpec(perturbed="all")
#: small VAEs that learn the planted effects in ~20 epochs; float32 so that every CPU trains the same way
VAE = dict(n_hidden=64, n_latent=16, batch_size=64, epochs=20, lr=5e-3, precision="float32")
#: the perturbations with a planted effect (D changes nothing)
EFFECT = ("A", "B", "C", "A+B", "C+D")
HIGH = 0.6  # pearson_delta a model must exceed on every perturbation with an effect (mean_shift gets ~0.98)


def _fit(name: str, train, spec=SPEC) -> Model:
    model = get(name, **(VAE if MODELS[name].needs_torch else {}))
    with Execution(threads=1).activate(torch_used=model.needs_torch):  # tiny matrices: one thread is the fastest on 2 cores
        return model.fit(train, spec, seed=0)


def _pearson_delta(pred, control_pred, target, source, perturbation: str) -> tuple[float, float]:
    """runner.score of one perturbation: (model, control) pearson_delta of predicted vs real mean change."""
    truth = target[(target.obs[SPEC.condition_key] == perturbation).to_numpy()].copy()
    tab, _ = score(truth, source, {"model": pred, "control": control_pred}, ["pearson_delta"], n_boot=0,
                   ceiling=False)
    values = tab.set_index("model")["value"]
    return float(values["model"]), float(values["control"])


@pytest.fixture(scope="module")
def screen():
    return pk.data.synthetic_screen()


@pytest.fixture(scope="module")
def context_task(screen):
    split = pk.split.holdout_context(screen, SPEC, "ctx0")
    train, source, target = split.subsets(screen)
    models = {name: _fit(name, train) for name in ("scgen", "scpram", "mean_shift", "control")}
    return split, models, source, target


@pytest.fixture(scope="module")
def combination_task(screen):
    split = pk.split.holdout_combination(screen, SPEC, "A+B")
    train, source, target = split.subsets(screen)
    models = {name: _fit(name, train) for name in ("scgen", "scpram", "additive", "mean_shift", "control")}
    return split, models, source, target


# ------------------------------------------------------------------------------------ context transfer


@pytest.mark.parametrize("name", ["scgen", "scpram", "mean_shift"])
def test_context_transfer_recovers_every_planted_effect(context_task, name):
    split, models, source, target = context_task
    assert split.info["perturbations"] == ["A", "A+B", "B", "C", "C+D", "D"] and not split.info["skipped"]
    model, control = models[name], models["control"]
    change = {}
    for p in split.info["perturbations"]:
        pred = model.predict(source, p)
        change[p] = np.abs(np.asarray(pred.X) - np.asarray(source.X)).mean(0)
        if p in EFFECT:
            r, r_control = _pearson_delta(pred, control.predict(source, p), target, source, p)
            assert r_control == 0.0 and r > HIGH, (name, p, r)
    # the planted block of A (genes 0-4) changes most; the null perturbation D changes less than A
    assert change["A"][:5].mean() > 2 * change["A"][5:].mean()
    assert change["D"].mean() < change["A"].mean()


def test_one_fit_serves_every_perturbation(context_task, combination_task):
    split, models, source, _ = context_task
    for name, model in models.items():
        assert model.trained == split.info["perturbations"], name
        for p in model.trained:
            pred = model.predict(source, p)
            assert pred.shape == source.shape and (pred.obs[SPEC.condition_key] == p).all()
    _, models, source, _ = combination_task
    for name, model in models.items():
        assert len(model.trained) == 5 and "A+B" not in model.trained, name
        assert model.can_predict("A+B") == model.COMBINES
    scpram = models["scpram"]
    info = scpram.fit_info
    assert sorted(info["perturbations"]) == sorted(scpram.trained) and info["pairing"]["ot_converged"]
    for p in scpram.trained:
        fit = info["perturbations"][p]
        assert fit["ot"]["converged"] and fit["transfer"]["contexts"] == ["ctx0", "ctx1", "ctx2"]
        assert scpram.attention(source, p).shape == (source.n_obs, fit["transfer"]["n_control"])
    fig = scpram.figures(source)["attention"]
    assert "'A'" in fig.axes[0].get_title()


# ----------------------------------------------------------------------------------- unseen combination


@pytest.mark.parametrize("name", ["scgen", "scpram", "additive"])
def test_unseen_combination_is_composed_from_its_singles(combination_task, name):
    split, models, source, target = combination_task
    assert split.info["perturbations"] == ["A+B"] and split.info["singles"] == ["A", "B"]
    pred = models[name].predict(source, "A+B")
    r, r_control = _pearson_delta(pred, models["control"].predict(source, "A+B"), target, source, "A+B")
    assert r_control == 0.0 and r > HIGH, (name, r)


def test_mean_shift_cannot_predict_an_unseen_combination(combination_task):
    _, models, source, _ = combination_task
    with pytest.raises(InputError, match=r"'mean_shift' model cannot predict 'A\+B'.*combine") as exc:
        models["mean_shift"].predict(source, "A+B")
    assert exc.value.params == ("perturbation",)


def test_scpram_composes_a_combination_from_each_singles_attention(combination_task):
    _, models, source, _ = combination_task
    model = models["scpram"]
    z = model.latent(source)
    delta = {p: model._transfer(z, p).astype(np.float64) - z for p in ("A", "B", "A+B")}
    assert np.allclose(delta["A+B"], delta["A"] + delta["B"], atol=1e-5)
    with pytest.raises(InputError, match=r"'A\+B' was not in the training data.*'A', 'B'"):
        model.attention(source, "A+B")


# -------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("name", ["scgen", "scpram"])
def test_screen_model_save_load_round_trip(combination_task, name, tmp_path):
    from safetensors.numpy import load_file

    _, models, source, _ = combination_task
    model = models[name]
    loaded = Model.load(model.save(tmp_path / name))
    assert type(loaded) is type(model) and loaded.trained == model.trained and loaded.spec == model.spec
    for p in [*model.trained, "A+B"]:
        assert np.array_equal(loaded.predict(source, p).X, model.predict(source, p).X), p
    keys = set(load_file(str(tmp_path / name / "weights.safetensors")))
    per_perturbation = "transfer.p/C+D/paired_delta" if name == "scpram" else "transfer.delta/C+D"
    assert per_perturbation in keys
    if name == "scpram":
        for p in model.trained:
            for a, b in zip(loaded.pairing(p), model.pairing(p)):
                assert np.array_equal(a, b)


# ------------------------------------------------------------------------------------------- bad input


def test_predicting_a_perturbation_the_model_did_not_learn(context_task):
    _, models, source, _ = context_task
    for name, model in models.items():
        with pytest.raises(InputError, match=f"'{name}' model cannot predict 'E'"):
            model.predict(source, "E")
        with pytest.raises(InputError, match="learned 6 perturbations.*name the one to predict"):
            model.predict(source)
    with pytest.raises(InputError, match="name the one to predict"):
        models["scpram"].attention(source)


def test_a_combination_whose_singles_are_missing(screen):
    without_a = screen[(screen.obs["condition"] != "A").to_numpy()].copy()
    with pytest.raises(InputError, match=r"single perturbation\(s\) \['A'\]"):
        pk.split.holdout_combination(without_a, SPEC, "A+B")
    listed = pk.PerturbSpec(perturbed=["A+B", "C"])
    with pytest.raises(InputError, match=r"single perturbation\(s\) \['A', 'B'\]"):
        pk.split.holdout_combination(screen, listed, "A+B")


def test_a_control_label_holding_the_delimiter(screen):
    clash = screen.copy()
    clash.obs["condition"] = clash.obs["condition"].cat.rename_categories({"control": "non+targeting"})
    spec = pk.PerturbSpec(control="non+targeting", perturbed="all")
    for call in (lambda: pk.split.holdout_context(clash, spec, "ctx0"),
                 lambda: get("mean_shift").fit(clash, spec)):
        with pytest.raises(InputError, match=r"'non\+targeting' holds the combination delimiter '\+'") as exc:
            call()
        assert "combo_delimiter" in exc.value.params


def test_perturbed_listing_a_label_that_does_not_exist(screen):
    spec = pk.PerturbSpec(perturbed=["A", "Q"])
    for call in (lambda: pk.split.holdout_context(screen, spec, "ctx0"),
                 lambda: get("scpram").fit(screen, spec)):
        with pytest.raises(InputError, match=r"perturbed 'Q' is not a value of obs\['condition'\]") as exc:
            call()
        assert exc.value.params == ("perturbed",)

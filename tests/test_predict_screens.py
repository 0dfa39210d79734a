"""``perturbkit predict`` on screens: --perturbed all / lists, --filter, --holdout (context transfer) and
--holdout-combination (unseen combination), one fit per model, per-perturbation scores, effects, figures, and
the two-condition (Kang-style) contract unchanged apart from the perturbation column."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import SMALL_ARGS

import perturbkit as pk
from perturbkit.cli import main

#: fast scoring: three metrics, few bootstrap replicates
FAST = ["--n-boot", "5", "--metrics", "r2_mean_all,r2_mean_top100,pearson_delta", "--no-progress"]
SCREEN = ["A", "B", "C", "D", "A+B", "C+D"]


def run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def predict_argv(data, out, *extra, model="mean_shift"):
    argv = ["predict", "--data", str(data), "--model", model, "--out", str(out), *FAST, *extra]
    return argv + ([*SMALL_ARGS, "--epochs", "2"] if model == "scgen" else [])


@pytest.fixture(scope="module")
def screen():
    """The seeded synthetic screen: ctx0-ctx2 x (control, A-D, A+B, C+D) x 60 cells; D has no effect."""
    return pk.data.synthetic_screen()


@pytest.fixture(scope="module")
def screen_path(screen, tmp_path_factory):
    path = tmp_path_factory.mktemp("screen") / "screen.h5ad"
    screen.write_h5ad(path)
    return path


def write(adata, path):
    adata.write_h5ad(path)
    return path


def labels(adata, key="condition"):
    return adata.obs[key].astype(str)


@pytest.fixture(scope="module")
def scgen_transfer(screen_path, tmp_path_factory):
    """scgen, --perturbed all, --holdout ctx2, fits counted; its model saved."""
    tmp = tmp_path_factory.mktemp("transfer")
    fits = []
    real = pk.models.Model.fit

    def counting(self, *a, **k):
        fits.append(self.name)
        return real(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pk.models.Model, "fit", counting)
        import io
        from contextlib import redirect_stdout

        buf = io.StringIO()
        with redirect_stdout(buf):
            rc = main(predict_argv(screen_path, tmp / "out", "--perturbed", "all", "--holdout", "ctx2",
                                   "--save-model", str(tmp / "model"), model="scgen"))
    return {"rc": rc, "out": tmp / "out", "fits": fits, "stdout": buf.getvalue(), "model": tmp / "model",
            "tmp": tmp}


def test_context_transfer_predicts_every_perturbation_with_one_fit(scgen_transfer):
    r = scgen_transfer
    assert r["rc"] == 0
    assert sorted(r["fits"]) == ["additive", "control", "linear", "mean_shift", "perturbed_mean", "scgen"]  # one fit each
    out = r["out"]
    files = {p.name for p in out.iterdir()}
    reg = {f for f in files if f.startswith("reg_mean_")}
    assert files - reg == {"pred.h5ad", "scores.csv", "effects.csv", "record.json",
                           "heatmap_perturbation_metric.png", "pearson_delta_vs_mean_shift.png"}
    assert len(reg) == 4 and all(f.endswith(".png") for f in reg)
    assert "reg_mean_A_B.png" in reg  # A+B: the largest effect
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False, na_values=[""])
    assert list(scores.columns) == ["model", "perturbation", "metric", "value", "ci_low", "ci_high",
                                    "higher_is_better", "error"]
    per = scores[~scores.perturbation.isin(["mean", "mean_responsive", "all"])]
    for model in ("scgen", "control", "mean_shift", "perturbed_mean", "linear", "additive", "ceiling"):
        assert set(per[per.model == model].perturbation) == set(SCREEN), model
    assert {"mean", "mean_responsive", "all"} <= set(scores.perturbation)
    assert {"discrimination_score", "pearson_delta_systema", "share_beats_mean_shift"} <= \
        set(scores[scores.perturbation == "all"].metric)
    effects = pd.read_csv(out / "effects.csv", keep_default_na=False)
    assert list(effects.columns) == ["perturbation", "n_cells", "statistic", "p_value", "q_value",
                                     "responsive"]
    assert dict(zip(effects.perturbation, effects.responsive)) == {p: p != "D" for p in SCREEN}  # D: null
    pred = ad.read_h5ad(out / "pred.h5ad")
    assert pred.n_obs == 6 * 60 and pred.obs_names.is_unique
    assert labels(pred).value_counts().to_dict() == {p: 60 for p in SCREEN}
    assert pred.uns["perturbkit"]["holdout"] == "ctx2"
    record = json.loads((out / "record.json").read_text())
    assert record["config"]["spec"]["perturbed"] == "all" and record["config"]["combination"] is None
    assert sorted(record["perturbations"]["predicted"]) == sorted(SCREEN)
    assert record["perturbations"]["skipped"] == {} and record["perturbations"]["models_left_out"] == {}
    assert record["split"]["scenario"] == "holdout_context"
    assert set(record["outputs"]) == files - {"record.json"}
    assert record["outputs"]["scores.csv"] == pk.data.sha256(out / "scores.csv")
    assert set(record["evaluation"]["top_degs"]) == set(SCREEN)
    text = r["stdout"]
    assert "mean over 6 perturbations" in text and "the 5 with a significant effect" in text
    assert "discrimination_score" in text and "mean_responsive" in text


def test_saved_screen_model_predicts_the_same(scgen_transfer, screen_path, capsys):
    r = scgen_transfer
    out = r["tmp"] / "loaded"
    rc, _, err = run(predict_argv(screen_path, out, "--perturbed", "all", "--holdout", "ctx2", "--load-model",
                                  str(r["model"]), model="scgen"), capsys)
    assert rc == 0, err
    assert (out / "scores.csv").read_bytes() == (r["out"] / "scores.csv").read_bytes()
    assert (out / "effects.csv").read_bytes() == (r["out"] / "effects.csv").read_bytes()


def test_list_of_perturbations_recovers_planted_effects_and_reruns_identically(screen_path, tmp_path, capsys):
    argv = predict_argv(screen_path, tmp_path / "o", "--perturbed", "A,C,D", "--holdout", "ctx0")
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    scores = pd.read_csv(tmp_path / "o" / "scores.csv", keep_default_na=False, na_values=[""])
    assert set(scores.model) == {"mean_shift", "control", "perturbed_mean", "linear", "ceiling"}  # no additive
    per = scores[scores.perturbation.isin(["A", "C", "D"])]
    assert set(per.perturbation) == {"A", "C", "D"}
    mean = scores[(scores.perturbation == "mean_responsive") & (scores.metric == "pearson_delta")]
    value = dict(zip(mean.model, mean.value))
    assert value["mean_shift"] > 0.9 and value["mean_shift"] > value["control"] + 0.5
    before = {f: (tmp_path / "o" / f).read_bytes() for f in ("scores.csv", "effects.csv")}
    X = ad.read_h5ad(tmp_path / "o" / "pred.h5ad").X.copy()
    rc, _, err = run(argv, capsys)  # the same run into the same directory: allowed, byte-identical
    assert rc == 0, err
    assert all((tmp_path / "o" / f).read_bytes() == b for f, b in before.items())
    assert np.array_equal(ad.read_h5ad(tmp_path / "o" / "pred.h5ad").X, X)
    assert "mean over 3 perturbations" in out and "the 2 with a significant effect" in out


def test_unseen_combination_with_additive_and_without_mean_shift(screen_path, tmp_path, capsys):
    out = tmp_path / "combo"
    rc, text, err = run(predict_argv(screen_path, out, "--perturbed", "all", "--holdout-combination", "A+B",
                                     model="scgen"), capsys)
    assert rc == 0, err
    assert "note: mean_shift is left out of this task" in text and "'A+B'" in text
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False, na_values=[""])
    assert set(scores.model) == {"scgen", "control", "perturbed_mean", "additive", "ceiling"}  # linear: as mean_shift
    assert set(scores.perturbation) == {"A+B"}
    add = scores[(scores.model == "additive") & (scores.metric == "pearson_delta")].value.iloc[0]
    assert add > 0.9  # the planted combination is additive
    lines = text.splitlines()  # one perturbation: the table as today
    header = next(i for i, line in enumerate(lines) if line.startswith("metric"))
    assert lines[header + 1].startswith("model") and lines[header + 2].startswith("scgen")
    assert "mean over" not in text
    record = json.loads((out / "record.json").read_text())
    assert record["config"]["holdout"] is None and record["config"]["combination"] == "A+B"
    assert record["split"]["scenario"] == "holdout_combination" and record["split"]["singles"] == ["A", "B"]
    assert record["perturbations"]["predicted"] == ["A+B"]
    assert "unseen combination" in record["perturbations"]["models_left_out"]["mean_shift"]["A+B"]
    assert "mean_shift" not in record["models"]
    pred = ad.read_h5ad(out / "pred.h5ad")
    assert pred.n_obs == 3 * 60 and (labels(pred) == "A+B").all()  # control cells of all three contexts
    # a task of one perturbation is a screen of one: the figure of one perturbation, as for Kang
    assert {"reg_mean.png", "effects.csv"} <= {p.name for p in out.iterdir()}
    assert not {"heatmap_perturbation_metric.png", "pearson_delta_vs_additive.png"} & {p.name for p in out.iterdir()}


def test_filter_keeps_cells_before_validation_and_is_recorded(screen, tmp_path, capsys):
    one = screen.copy()
    one.obs["dataset"] = "s1"
    two = pk.data.synthetic_screen(seed=1)
    two.obs["dataset"] = "s2"
    two.obs["cell_type"] = "other" + labels(two, "cell_type").str[3:]
    two.obs_names = [f"two{i}" for i in range(two.n_obs)]
    path = write(ad.concat([one, two]), tmp_path / "two.h5ad")
    rc, text, err = run(predict_argv(path, tmp_path / "a", "--perturbed", "all", "--holdout", "ctx1",
                                     "--filter", "dataset=s1"), capsys)
    assert rc == 0, err
    record = json.loads((tmp_path / "a" / "record.json").read_text())
    assert record["config"]["filter"] == {"dataset": "s1"} and record["data"]["filter"] == {"dataset": "s1"}
    assert record["data"]["n_cells_loaded"] == 2 * screen.n_obs and record["data"]["n_cells"] == screen.n_obs
    assert record["split"]["n_train"] == screen.n_obs - 7 * 60 + 60  # ctx1's perturbed cells held out
    assert f"filter dataset=s1: {screen.n_obs} of {2 * screen.n_obs} cells" in text
    rc, _, err = run(predict_argv(path, tmp_path / "b", "--perturbed", "A", "--holdout", "ctx1", "--filter",
                                  "dataset=s1,s2", "--filter", "cell_type=ctx0,ctx1,other0"), capsys)
    assert rc == 0, err
    record = json.loads((tmp_path / "b" / "record.json").read_text())
    assert record["config"]["filter"] == {"dataset": ["s1", "s2"], "cell_type": ["ctx0", "ctx1", "other0"]}
    assert record["data"]["n_cells"] == 3 * 7 * 60


def test_skipped_perturbation_is_named_and_recorded(screen, tmp_path, capsys):
    """C only in ctx2 (nothing to learn it from): skipped with its reason; the others are predicted."""
    cond, ctx = labels(screen), labels(screen, "cell_type")
    path = write(screen[~((cond == "C") & (ctx != "ctx2"))].copy(), tmp_path / "c.h5ad")
    argv = predict_argv(path, tmp_path / "o", "--perturbed", "A,B,C,D,A+B", "--holdout", "ctx2")
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    assert "warning:" in err and "C (no cells in any other context" in err
    record = json.loads((tmp_path / "o" / "record.json").read_text())
    assert "no cells in any other context" in record["perturbations"]["skipped"]["C"]
    assert record["perturbations"]["predicted"] == ["A", "B", "D", "A+B"]  # the order as listed
    scores = pd.read_csv(tmp_path / "o" / "scores.csv", keep_default_na=False, na_values=[""])
    assert "C" not in set(scores.perturbation) and {"mean_shift", "additive"} <= set(scores.model)


def test_baseline_that_cannot_predict_a_perturbation_is_left_out(screen, tmp_path, capsys):
    """C+D trains in ctx0/ctx1 but its single C does not: additive (always the sum of the singles) cannot
    predict it and is left out of the task with the reason; the chosen model and the other baselines are
    scored."""
    cond, ctx = labels(screen), labels(screen, "cell_type")
    path = write(screen[~((cond == "C") & (ctx != "ctx2"))].copy(), tmp_path / "c.h5ad")
    rc, text, err = run(predict_argv(path, tmp_path / "o", "--perturbed", "all", "--holdout", "ctx2"), capsys)
    assert rc == 0, err
    assert "note: additive is left out of this task" in text and "'C+D'" in text
    record = json.loads((tmp_path / "o" / "record.json").read_text())
    assert "C+D" in record["perturbations"]["predicted"] and "C+D" in \
        record["perturbations"]["models_left_out"]["additive"]
    scores = pd.read_csv(tmp_path / "o" / "scores.csv", keep_default_na=False, na_values=[""])
    assert set(scores.model) == {"mean_shift", "control", "perturbed_mean", "linear", "ceiling"}


def test_single_perturbation_keeps_the_kang_contract(syn, syn_path, tmp_path, capsys):
    """Two conditions: the four files as before and effects.csv, scores.csv = metrics.score_models' table plus the perturbation
    column (byte for byte), the printed table as before."""
    out = tmp_path / "single"
    rc, text, err = run(["predict", "--data", str(syn_path), "--model", "mean_shift", "--holdout", "ctx2",
                         "--out", str(out), "--n-boot", "5", "--no-progress"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["effects.csv", "pred.h5ad", "record.json", "reg_mean.png",
                                                   "scores.csv"]
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False, na_values=[""])
    assert list(scores.columns) == ["model", "perturbation", "metric", "value", "ci_low", "ci_high",
                                    "higher_is_better", "error"]
    assert set(scores.perturbation) == {"stimulated"}
    spec = pk.data.PerturbSpec()
    adata, _ = pk.data.preprocess(syn, pk.data.Preprocessing(), log=lambda *a: None)
    task = pk.split.holdout_cell_type(adata, spec, "ctx2")
    train, source, target = task.subsets(adata)
    preds = {name: pk.models.get(name).fit(train, spec).predict(source)
             for name in ("mean_shift", "control", "perturbed_mean", "linear")}
    ref, _ = pk.metrics.score_models(target, source, preds, None, n_boot=5, seed=0)
    pk._io.write_csv(tmp_path / "ref.csv", ref)
    pk._io.write_csv(tmp_path / "new.csv", scores.drop(columns="perturbation"))
    assert (tmp_path / "new.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("metric"))
    assert lines[header + 1].startswith("model") and lines[header + 2].startswith("mean_shift")
    assert "mean over" not in text
    record = json.loads((out / "record.json").read_text())
    assert record["perturbations"]["predicted"] == ["stimulated"]
    assert list(record["evaluation"]["top_degs"]) == ["stimulated"]  # per perturbation, as in a screen


def _without(screen, label):
    return screen[labels(screen) != label].copy()


def _only_in(screen, ctx, *perts):
    cond, where = labels(screen), labels(screen, "cell_type")
    return screen[~(cond.isin(perts) & (where != ctx))].copy()


BAD = [
    ("both_tasks", None, ["--perturbed", "all", "--holdout", "ctx2", "--holdout-combination", "A+B"],
     "exactly one task"),
    ("no_task", None, ["--perturbed", "all"], "--holdout CONTEXT"),
    ("combo_singles_missing", lambda s: _without(s, "B"),
     ["--perturbed", "all", "--holdout-combination", "A+B"], "single perturbation(s) ['B']"),
    ("combo_not_a_combination", None, ["--perturbed", "all", "--holdout-combination", "A"],
     "is not a combination"),
    ("combo_with_one_label", None, ["--holdout-combination", "A+B", "--perturbed", "A+B"], "--perturbed all"),
    ("delimiter_in_control", None, ["--perturbed", "all", "--holdout", "ctx2", "--combo-delimiter", "o"],
     "holds the combination delimiter"),
    ("delimiter_comma", None, ["--perturbed", "A,B", "--holdout", "ctx2", "--combo-delimiter", ","],
     "--combo-delimiter ','"),
    ("empty_label", None, ["--perturbed", "A,,B", "--holdout", "ctx2"], "empty label"),
    ("unknown_label", None, ["--perturbed", "A,Q", "--holdout", "ctx2"], "'Q'"),
    ("filter_column", None, ["--perturbed", "all", "--holdout", "ctx2", "--filter", "celltype=ctx2"],
     "cell_type"),
    ("filter_value", None, ["--perturbed", "all", "--holdout", "ctx2", "--filter", "cell_type=ctx7"], "ctx7"),
    ("filter_form", None, ["--perturbed", "all", "--holdout", "ctx2", "--filter", "cell_type"], "KEY=VALUE"),
    ("filter_twice", None, ["--perturbed", "all", "--holdout", "ctx2", "--filter", "cell_type=ctx1",
                            "--filter", "cell_type=ctx2"], "twice"),
    ("filter_drops_holdout", None,
     ["--perturbed", "all", "--holdout", "ctx2", "--filter", "cell_type=ctx0,ctx1"], "'ctx2'"),
    ("holdout_unknown", None, ["--perturbed", "all", "--holdout", "ctx9"], "ctx9"),
    ("all_skipped", lambda s: _only_in(s, "ctx2", "C", "D"), ["--perturbed", "C,D", "--holdout", "ctx2"],
     "no requested perturbation can be predicted"),
    ("chosen_cannot_combine", None, ["--perturbed", "all", "--holdout-combination", "A+B"],
     "can predict none"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_screen_input_exits_2_with_one_clear_line(case, screen, screen_path, tmp_path, capsys):
    _, maker, extra, needle = case
    data = screen_path if maker is None else write(maker(screen), tmp_path / "d.h5ad")
    rc, _, err = run(predict_argv(data, tmp_path / "o", *extra), capsys)  # mean_shift
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    assert needle in errors[0] and "Traceback" not in err
    assert not (tmp_path / "o" / "scores.csv").exists()


def test_help_documents_the_screen_options(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--perturbed LABEL|A,B,C|all", "--combo-delimiter", "--filter KEY=VALUE",
                   "--holdout CONTEXT", "--holdout-combination A+B", "'all' (every label but the control)"):
        assert needle in text, needle


def test_screen_plots_return_figures(screen, tmp_path):
    rows = []
    for model, scale in (("mean_shift", 1.0), ("scgen", 0.8), ("ceiling", 1.1)):
        for i, p in enumerate(SCREEN):
            for metric, hib in (("pearson_delta", True), ("edistance", False)):
                rows.append({"model": model, "perturbation": p, "metric": metric,
                             "value": scale * (i + 1) / 7, "higher_is_better": hib})
    table = pd.DataFrame(rows)
    from matplotlib.figure import Figure

    fig = pk.pl.perturbation_heatmap(table, title="t")
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    fig = pk.pl.versus_baseline(table, metric="pearson_delta", baseline="mean_shift")
    assert isinstance(fig, Figure) and "scgen: better in 0 of 6" in [t.get_text() for t in
                                                                   fig.axes[0].get_legend().get_texts()]
    own = Figure()
    axes = own.subplots(1, 2)
    assert pk.pl.perturbation_heatmap(table, models=["scgen", "ceiling"], ax=axes) is own
    with pytest.raises(pk.errors.InputError, match="one per model"):
        pk.pl.perturbation_heatmap(table, ax=axes)
    with pytest.raises(pk.errors.InputError, match="additive"):
        pk.pl.versus_baseline(table, baseline="additive")

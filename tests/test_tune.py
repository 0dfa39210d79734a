"""Tuning: config parsing, the training callback, a validation task blind to the held-out target, the run
directory, and a real PostgreSQL server shared by several worker processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SMALL, SMALL_TOML

import perturbkit as pk
from perturbkit.errors import InputError

TINY = """
seeds = [0, 1]

[data]
source = "{data}"

[preprocessing]
n_top_genes = 0

[training]
epochs = 3
threads = 1

[models.scgen]
{small}
[evaluation]
metrics = ["r2_mean_top100", "pearson_delta"]
n_boot = 10

[tune]
holdout = "ctx0"
metric = "pearson_delta"
trials = {trials}

[tune.space]
use_defaults = false
n_layers = {{ type = "int", low = 1, high = 2 }}
dropout_rate = {{ type = "float", low = 0.0, high = 0.3 }}
lr = {{ type = "float", low = 1e-3, high = 1e-2, log = true }}

[tune.sampler]
n_startup_trials = 3

[tune.pruner]
n_startup_trials = 2
"""
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_config(path: Path, data: Path, trials: int = 5, extra: str = "") -> Path:
    path.write_text(TINY.format(data=data, trials=trials, small=SMALL_TOML) + extra)
    return path


def quiet(*args, **kwargs):
    pass


# ------------------------------------------------------------------------------------------------ config


def test_import_stays_light():
    code = ("import sys, perturbkit as pk, perturbkit.tune; pk.tune.default_space('scgen'); "
            "print(','.join(m for m in ('torch', 'optuna', 'sqlalchemy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def scgen(**tables):
    """A tune config dict: [models.scgen] plus ``tables``."""
    return {"models": {"scgen": {}}, **tables}


def test_default_spaces_parse_and_hold_the_tutorial_knobs():
    for model in ("scgen", "scpram"):
        space = pk.tune.default_space(model)
        assert {"n_layers", "n_latent", "n_hidden", "dropout_rate", "input_noise", "lr", "kl_weight",
                "batch_size", "epochs"} <= set(space)
        assert list(space) == list(pk.models.MODELS[model].SEARCH_SPACE)  # the model class's own space
    assert "ratio" in pk.tune.default_space("scpram") and "ratio" not in pk.tune.default_space("scgen")
    for raw in ({"models": {"scpram": {}}, "training": {"epochs": 3}}, {"models": {"scpram": {"epochs": 3}}}):
        cfg = pk.tune.config_from_dict(raw)
        assert "epochs" not in cfg.space and cfg.params == {"epochs": 3}  # a fixed parameter is not searched
        assert cfg.direction == "maximize"
    assert pk.tune.config_from_dict(scgen(tune={"metric": "edistance"})).direction == "minimize"


@pytest.mark.parametrize("raw, needle", [
    (scgen(modles={}), "Did you mean 'models'"),
    (scgen(tune={"space": {"noise_rate": {"type": "float", "low": 0, "high": 0.3}}}),
     "perturbkit calls it 'input_noise'"),
    (scgen(tune={"space": {"n_layers": {"type": "int", "low": 3, "high": 1}}}),
     "low (3) must be below high (1)"),
    (scgen(tune={"space": {"lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}}),
     "needs low > 0"),
    (scgen(tune={"space": {"lr": {"type": "flaot", "low": 0.1, "high": 0.2}}}), "Did you mean 'float'"),
    (scgen(tune={"space": {"lr": {"type": "float", "lo": 0.1, "high": 0.2}}}), "Did you mean 'low'"),
    (scgen(tune={"space": {"lr": 0.001}}), "a fixed value belongs in the model's table [models.scgen]"),
    (scgen(tune={"validation": {"contexts": ["CD4 T cells"]}}), "never see the held-out target"),
    (scgen(tune={"pruner": {"knd": "median"}}), "Did you mean 'kind'"),
    (scgen(tune={"metric": "pearson_delt"}), "Did you mean 'pearson_delta'"),
    ({"models": {"control": {}}}, "no parameters to tune"),
    ({}, "exactly one model"),
    ({"models": {"scgen": {}, "scpram": {}}}, "exactly one model"),
    (scgen(training={"threads": 0}), "training.threads must be >= 1"),
])
def test_bad_config_names_the_fix(raw, needle):
    with pytest.raises(InputError) as exc:
        pk.tune.config_from_dict(raw)
    assert needle in str(exc.value)


@pytest.mark.parametrize("raw, needle", [
    ({"model": "scgen"}, "[models.scgen]"),
    ({"data": "kang2018"}, '[data] source = "kang2018"'),
    ({"holdout": "ctx0"}, "[tune] holdout"),
    ({"metric": "pearson_delta"}, "[tune] metric"),
    ({"trials": 3}, "[tune] trials"),
    ({"seed": 0}, "[tune] seed"),
    ({"threads": 1}, "threads -> [training] threads"),
    ({"params": {"epochs": 2}}, "fixed model parameters now go in the model's table [models.NAME]"),
    ({"model": "scpram", "params": {"epochs": 2}}, "the model's table [models.scpram]"),
    ({"space": {}}, "[space] -> [tune.space]"),
    ({"spec": {"control": "ctrl"}}, "now go in the [data] table"),
    ({"final": {"seeds": [0, 1]}}, "final.seeds -> seeds"),
    ({"final": {"n_boot": 10}}, "final.n_boot -> [evaluation] n_boot"),
    ({"validation": {}}, "[validation] -> [tune.validation]"),
    ({"sampler": {}}, "[sampler] -> [tune.sampler]"),
    ({"pruner": {}}, "[pruner] -> [tune.pruner]"),
])
def test_old_config_keys_name_their_new_place(raw, needle):
    with pytest.raises(InputError) as exc:
        pk.tune.config_from_dict({**scgen(), **raw})
    assert needle in str(exc.value)


def test_an_old_config_file_names_every_moved_key(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text('model = "scgen"\ndata = "kang2018"\nthreads = 1\n'
                   '[params]\nepochs = 2\n[final]\nseeds = [0]\n')
    with pytest.raises(InputError) as exc:
        pk.tune.load_config(old)
    text = str(exc.value)
    for needle in ("[models.scgen]", "[data] source", "[training] threads", "final.seeds -> seeds"):
        assert needle in text


def test_relative_data_path_is_relative_to_the_config(tmp_path, syn_path):
    (tmp_path / "sub").mkdir()
    shutil.copy(syn_path, tmp_path / "sub" / "d.h5ad")
    cfg = pk.tune.load_config(write_config(tmp_path / "sub" / "c.toml", Path("d.h5ad")))
    assert cfg.data.source == str((tmp_path / "sub" / "d.h5ad").resolve())


@pytest.mark.parametrize("bench_config, holdout", [("smoke.toml", "ctx0"), ("kang.toml", "CD4 T cells")])
def test_bench_tables_parse_the_same_in_a_tune_config(tmp_path, bench_config, holdout):
    """[data], [preprocessing], [training], [models.NAME], [evaluation] and seeds copied from a bench config
    into a tune config give the same tables as bench reads from it."""
    from perturbkit import bench
    from perturbkit import config as C

    raw = C.read(CONFIGS / bench_config)
    shared = {k: raw[k] for k in ("seeds", "data", "preprocessing", "training", "evaluation")}
    tune_raw = {**shared, "models": {"scgen": raw["models"]["scgen"]}, "tune": {"holdout": holdout}}
    path = tmp_path / "tune.toml"
    path.write_text(C.to_toml(tune_raw))
    cfg = pk.tune.load_config(path)
    b = bench.load_config(CONFIGS / bench_config)
    assert (cfg.data, cfg.preprocessing, cfg.training, cfg.evaluation, cfg.seeds) == \
        (b.data, b.preprocessing, b.training, b.evaluation, b.seeds)
    assert [cfg.model] == [m for m in b.models if m.label == "scgen"]
    assert cfg.params == cfg.model.build_params(b.training)  # the parameters bench builds scgen with
    assert cfg.params["epochs"] == raw["training"]["epochs"] and "epochs" not in cfg.space


def test_kang_configs_keep_their_meaning():
    for model in ("scgen", "scpram"):
        cfg = pk.tune.load_config(CONFIGS / f"tune_{model}_kang.toml")
        assert cfg.name == model and cfg.params == {"epochs": 2} and cfg.training.threads == 1
        assert cfg.data.source == "kang2018" and cfg.preprocessing.n_top_genes == 2000
        assert (cfg.tune.holdout, cfg.tune.metric, cfg.tune.trials, cfg.tune.seed) == ("CD4 T cells",
                                                                                      "pearson_delta", 30, 0)
        assert set(cfg.space) == set(pk.models.MODELS[model].SEARCH_SPACE) - {"epochs"}
        assert cfg.seeds == (0, 1, 2) and cfg.evaluation.n_boot == 100 and cfg.evaluation.metrics == "all"
        assert cfg.tune.validation.n_contexts == 1 and cfg.tune.sampler.n_startup_trials == 10
        assert (cfg.tune.pruner.kind, cfg.tune.pruner.n_startup_trials, cfg.tune.pruner.n_warmup_steps) == \
            ("median", 5, 1)


def test_config_round_trips_through_toml():
    """record.json's config, written back as TOML, is the same config (the space written out in full)."""
    import tomllib

    from perturbkit.config import to_toml

    cfg = pk.tune.load_config(CONFIGS / "tune_scpram_kang.toml")
    again = pk.tune.config_from_dict(tomllib.loads(to_toml(cfg.to_dict())))
    assert again == cfg and again.default_study_name("x") == cfg.default_study_name("x")


# ------------------------------------------------------------------------------------- training callback


def test_training_callback_sees_every_epoch_changes_nothing_and_can_stop(syn):
    spec = pk.PerturbSpec()
    task = pk.split.holdout_cell_type(syn, spec, "ctx0")
    train, source, _ = task.subsets(syn)
    small = dict(SMALL, epochs=3)
    plain = pk.models.get("scgen", **small).fit(train, spec, seed=1)
    seen, preds = [], []

    def watch(epoch, history):
        seen.append((epoch, len(history.train_loss)))
        preds.append(model.predict(source).X.mean())  # the model is usable at its current weights
        return False

    model = pk.models.get("scgen", **small)
    model.fit(train, spec, seed=1, callback=watch)
    assert seen == [(1, 1), (2, 2), (3, 3)]
    assert len(set(preds)) == 3
    np.testing.assert_array_equal(plain.predict(source).X, model.predict(source).X)  # same random draws

    stopper = pk.models.get("scgen", **small).fit(train, spec, seed=1, callback=lambda e, h: e >= 2)
    assert stopper.history.epochs_run == 2 and stopper.history.stopped_early
    pk.models.get("mean_shift").fit(train, spec, callback=watch)  # models that do not train ignore it


# --------------------------------------------------------------------------------------- the run directory


@pytest.fixture(scope="module")
def tuned(syn_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    cfg = write_config(root / "tune.toml", syn_path, trials=5)
    out = root / "run"
    from perturbkit.cli import main

    assert main(["tune", str(cfg), "--out", str(out), "--no-progress"]) == 0
    return cfg, out


def test_run_directory_holds_every_output(tuned):
    cfg, out = tuned
    for name in ("trials.csv", "intermediate.csv", "best_params.json", "importance.csv", "final_scores.csv",
                 "final_summary.csv", "history.png", "intermediate.png", "importance.png", "final.png",
                 "record.json", "ro-crate-metadata.json", "config.toml", "study.db"):
        assert (out / name).is_file(), name
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials.number) == list(range(5))
    assert set(trials.state) <= {"COMPLETE", "PRUNED"}
    best = json.loads((out / "best_params.json").read_text())
    done = trials[trials.state == "COMPLETE"]
    assert best["trial"] == int(done.loc[done.value.idxmax(), "number"])
    assert best["params"]["epochs"] == 3 and set(best["sampled"]) == {"n_layers", "dropout_rate", "lr"}
    summ = pd.read_csv(out / "final_summary.csv")
    got = summ[summ.metric == "pearson_delta"].set_index("model")
    assert {"scgen:tuned", "scgen:default", "control", "mean_shift", "ceiling"} <= set(got.index)
    assert (got.loc[["scgen:tuned", "scgen:default"], "n_seeds"] == 2).all()
    assert (got["ci_low"] <= got["mean"] + 1e-12).all()
    imp = pd.read_csv(out / "importance.csv")
    assert set(imp.param) == {"n_layers", "dropout_rate", "lr"} and abs(imp.importance.sum() - 1) < 1e-6
    record = json.loads((out / "record.json").read_text())
    assert record["kind"] == "perturbkit.tune" and record["study"]["states"]["COMPLETE"] >= 1
    assert record["validation"]["tasks"][0]["context"] == "ctx1"  # most perturbed cells, ties by name
    crate = json.loads((out / "ro-crate-metadata.json").read_text())
    ids = {e["@id"] for e in crate["@graph"]}
    assert {"trials.csv", "best_params.json", "final_summary.csv", "importance.png"} <= ids


def test_rerun_continues_the_study_without_repeating_trials(tuned, capsys):
    cfg, out = tuned
    before = pd.read_csv(out / "trials.csv")
    pk.tune.run(cfg, out, trials=7, progress=False, log=quiet, worker_only=True)
    pk.tune.run(cfg, out, trials=7, progress=False, log=quiet, worker_only=True)  # already full: runs nothing
    import optuna

    name = json.loads((out / "record.json").read_text())["study"]["name"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 7
    for stored, row in zip(study.trials[:5], before.to_dict("records")):  # the first five are untouched
        assert stored.params == pytest.approx({k[len("params_"):]: v for k, v in row.items()
                                               if k.startswith("params_")})


def test_objective_never_sees_the_held_out_target(syn, tmp_path):
    """Garbling the held-out target cells changes nothing that the trials compute."""
    spec = pk.PerturbSpec()
    garbled = syn.copy()
    rows = (garbled.obs[spec.context_key] == "ctx0").to_numpy() & (garbled.obs[spec.condition_key]
                                                                  == spec.perturbed).to_numpy()
    garbled.X[rows] = np.random.default_rng(5).uniform(0, 6, size=(rows.sum(), syn.n_vars)).astype(np.float32)
    values = []
    for i, adata in enumerate((syn, garbled)):
        path = tmp_path / f"d{i}.h5ad"
        adata.write_h5ad(path)
        cfg = write_config(tmp_path / f"c{i}.toml", path, trials=3)
        info = pk.tune.run(cfg, tmp_path / f"run{i}", progress=False, log=quiet, worker_only=True)
        values.append([(t["state"], t["value"]) for t in info["trials"]])
    assert len(values[0]) == 3 and values[0] == values[1]


def test_a_study_refuses_another_configuration(tuned, tmp_path, syn_path):
    cfg, out = tuned
    other = write_config(tmp_path / "other.toml", syn_path, extra="")
    other.write_text(other.read_text().replace("epochs = 3", "epochs = 2"))  # [training] epochs: a param
    name = json.loads((out / "record.json").read_text())["study"]["name"]
    with pytest.raises(InputError, match="another configuration .*params"):
        pk.tune.run(other, tmp_path / "o", storage=str(out / "study.db"), study=name, progress=False,
                    log=quiet)


def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    from perturbkit.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text('[models.scgen]\n[tune.space]\nnoise_rate = { type = "float", low = 0.0, high = 0.3 }\n')
    assert main(["tune", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input_noise" in err[0]


def test_out_must_be_new_or_a_tuning_run_of_the_same_model(tmp_path, syn_path):
    cfg = write_config(tmp_path / "c.toml", syn_path)
    other_tool = tmp_path / "bench"
    other_tool.mkdir()
    (other_tool / "run.json").write_text("{}")
    with pytest.raises(InputError, match="already holds other files"):
        pk.tune.run(cfg, other_tool, progress=False, log=quiet)
    other_model = tmp_path / "scpram"
    other_model.mkdir()
    record = {"kind": "perturbkit.tune", "best": {"model": "scpram"}}
    (other_model / "record.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match="tuning run of model 'scpram'"):
        pk.tune.run(cfg, other_model, progress=False, log=quiet)


def test_cli_threads_0_is_refused(tmp_path, syn_path, capsys):
    from perturbkit.cli import main

    cfg = write_config(tmp_path / "c.toml", syn_path)
    assert main(["tune", str(cfg), "--out", str(tmp_path / "o"), "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------- a model of one's own


TOY = """
seeds = [0, 1]

[data]
source = "synthetic"

[data.synthetic]
n_contexts = 3
n_cells = 60
n_genes = 30

[preprocessing]
n_top_genes = 0

[models.toy]

[evaluation]
metrics = ["r2_mean_all", "pearson_delta"]
n_boot = 0

[tune]
holdout = "ctx0"
metric = "r2_mean_all"     # pearson_delta does not see the scale of a shift
trials = 4

[tune.validation]
min_cells = 10

[tune.sampler]
n_startup_trials = 2
"""


def test_toy_model_tunes_without_touching_generic_code(tmp_path, monkeypatch):
    """A model class that sets DEFAULTS and SEARCH_SPACE is tunable: registering it is all it takes (it does
    not train, so it has no history and is never pruned)."""
    from perturbkit.models import MODELS, Model
    from perturbkit.models._base import balanced_means, dense

    class Toy(Model):
        """Control cells plus a scaled balanced mean shift."""

        name = "toy"
        DEFAULTS = {"scale": 1.0}
        SEARCH_SPACE = {"scale": {"type": "float", "low": 0.0, "high": 2.0}}

        def _fit(self, adata, spec, *, seed, progress):
            cond = adata.obs[spec.condition_key].astype(str).to_numpy()
            ctx = adata.obs[spec.context_key].astype(str).to_numpy()
            ctrl, pert = balanced_means(dense(adata.X), cond, ctx, spec)
            self.shift = pert - ctrl

        def _predict_matrix(self, source, perturbation):
            return dense(source.X) + self.params.get("scale", self.DEFAULTS["scale"]) * self.shift

    assert not Toy.needs_torch
    monkeypatch.setitem(MODELS, "toy", Toy)
    cfg = tmp_path / "toy.toml"
    cfg.write_text(TOY)
    assert pk.tune.default_space("toy") == {"scale": pk.tune.Dim("float", 0.0, 2.0)}
    record = pk.tune(cfg, tmp_path / "run", progress=False, log=quiet)  # the module is callable: pk.tune.run
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert list(trials.number) == [0, 1, 2, 3] and set(trials.state) == {"COMPLETE"}
    assert trials.user_attrs_epochs_run.isna().all()  # no history: nothing trained
    best = record["best"]
    assert best["model"] == "toy" and set(best["sampled"]) == {"scale"} and 0 <= best["sampled"]["scale"] <= 2
    assert best["validation_value"] == pytest.approx(trials.value.max())
    assert best["default_params"] == {} and record["study"]["name"].startswith("perturbkit-toy-")
    summ = pd.read_csv(tmp_path / "run" / "final_summary.csv")
    got = summ[summ.metric == "r2_mean_all"].set_index("model")
    assert {"toy:tuned", "toy:default", "control", "mean_shift", "ceiling"} <= set(got.index)
    assert (got.loc[["toy:tuned", "toy:default"], "n_seeds"] == 2).all()
    # the default toy is the mean_shift baseline: the same prediction, the same scores
    assert got.loc["toy:default", "mean"] == pytest.approx(got.loc["mean_shift", "mean"])


# ------------------------------------------------------------------------------ PostgreSQL, several workers
# (the `postgres` fixture: tests/conftest.py)


def test_workers_share_one_postgres_study_and_lose_nothing(postgres, syn_path, tmp_path):
    import optuna

    n_trials, n_workers = 10, 3
    cfg = write_config(tmp_path / "tune.toml", syn_path, trials=n_trials)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "perturbkit", "tune", str(cfg), "--storage", postgres, "--study", "pg-test",
           "--out", str(out), "--worker-only", "--no-progress", "--threads", "1"]
    procs = [subprocess.Popen([*cmd, "--worker", str(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for i in range(n_workers)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n_workers, logs

    study = optuna.load_study(study_name="pg-test", storage=postgres)
    trials = study.get_trials(deepcopy=False)
    numbers = sorted(t.number for t in trials)
    assert n_trials <= len(trials) <= n_trials + n_workers - 1  # a worker only starts a trial below the total
    assert numbers == list(range(len(trials)))
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == n_trials  # exactly the total: none lost, none extra
    surplus = [t for t in trials if t not in finished]  # begun together with the last counted ones
    assert all(t.state.name == "FAIL" and t.user_attrs["error"].startswith("surplus") for t in surplus)
    ran = [json.loads((out / "workers" / f"worker-{i}.json").read_text())["trials"] for i in range(n_workers)]
    per_worker = [[t["number"] for t in r] for r in ran]
    assert sorted(n for w in per_worker for n in w) == numbers  # every trial recorded once, by one worker
    assert sum(1 for w in per_worker if w) >= 2  # the work was shared
    stored = {t.number: t.value for t in trials}
    assert all(stored[t["number"]] == t["value"] for r in ran for t in r)

    # the results step reads the shared study and runs no further trial
    record = pk.tune.run(cfg, out, storage=postgres, study="pg-test", progress=False, log=quiet)
    assert len(optuna.load_study(study_name="pg-test", storage=postgres).trials) == len(trials)
    assert record["study"]["storage"].startswith("postgresql://postgres@127.0.0.1")
    assert len(pd.read_csv(out / "trials.csv")) == len(trials)

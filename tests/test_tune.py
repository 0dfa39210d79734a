"""Tuning: config parsing, the training callback, a validation task blind to the held-out target, the run
directory, and a real PostgreSQL server shared by several worker processes."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import skip_without

import perturbkit as pk
from perturbkit.errors import InputError

TINY = """
model = "scgen"
data = "{data}"
holdout = "ctx0"
metric = "pearson_delta"
trials = {trials}
threads = 1

[preprocessing]
n_top_genes = 0

[params]
epochs = 3
n_hidden = 32
n_latent = 8
batch_size = 64

[space]
use_defaults = false
n_layers = {{ type = "int", low = 1, high = 2 }}
dropout_rate = {{ type = "float", low = 0.0, high = 0.3 }}
lr = {{ type = "float", low = 1e-3, high = 1e-2, log = true }}

[sampler]
n_startup_trials = 3

[pruner]
n_startup_trials = 2

[final]
seeds = [0, 1]
metrics = ["r2_mean_top100", "pearson_delta"]
n_boot = 10
"""


def write_config(path: Path, data: Path, trials: int = 5, extra: str = "") -> Path:
    path.write_text(TINY.format(data=data, trials=trials) + extra)
    return path


def quiet(*args, **kwargs):
    pass


# ------------------------------------------------------------------------------------------------ config


def test_import_stays_light():
    code = ("import sys, perturbkit as pk, perturbkit.tune; pk.tune.DEFAULT_SPACES; "
            "print(','.join(m for m in ('torch', 'optuna', 'sqlalchemy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_default_spaces_parse_and_hold_the_tutorial_knobs():
    for model in ("scgen", "scpram"):
        space = pk.tune.default_space(model)
        assert {"n_layers", "n_latent", "n_hidden", "dropout_rate", "input_noise", "lr", "kl_weight",
                "batch_size", "epochs"} <= set(space)
    assert "ratio" in pk.tune.default_space("scpram") and "ratio" not in pk.tune.default_space("scgen")
    cfg = pk.tune.config_from_dict({"model": "scpram", "params": {"epochs": 3}})
    assert "epochs" not in cfg.space and cfg.params == {"epochs": 3}  # a fixed parameter is not searched
    assert cfg.direction == "maximize"
    assert pk.tune.config_from_dict({"metric": "edistance"}).direction == "minimize"


@pytest.mark.parametrize("raw, needle", [
    ({"modle": "scgen"}, "Did you mean 'model'"),
    ({"space": {"noise_rate": {"type": "float", "low": 0, "high": 0.3}}}, "perturbkit calls it 'input_noise'"),
    ({"space": {"n_layers": {"type": "int", "low": 3, "high": 1}}}, "low (3) must be below high (1)"),
    ({"space": {"lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}}, "needs low > 0"),
    ({"space": {"lr": {"type": "flaot", "low": 0.1, "high": 0.2}}}, "Did you mean 'float'"),
    ({"space": {"lr": {"type": "float", "lo": 0.1, "high": 0.2}}}, "Did you mean 'low'"),
    ({"space": {"lr": 0.001}}, "a fixed value belongs in [params]"),
    ({"validation": {"contexts": ["CD4 T cells"]}}, "never see the held-out target"),
    ({"pruner": {"knd": "median"}}, "Did you mean 'kind'"),
    ({"metric": "pearson_delt"}, "Did you mean 'pearson_delta'"),
    ({"model": "control"}, "no parameters to tune"),
])
def test_bad_config_names_the_fix(raw, needle):
    with pytest.raises(InputError) as exc:
        pk.tune.config_from_dict(raw)
    assert needle in str(exc.value)


def test_relative_data_path_is_relative_to_the_config(tmp_path, syn_path):
    (tmp_path / "sub").mkdir()
    shutil.copy(syn_path, tmp_path / "sub" / "d.h5ad")
    cfg = pk.tune.load_config(write_config(tmp_path / "sub" / "c.toml", Path("d.h5ad")))
    assert cfg.data == str((tmp_path / "sub" / "d.h5ad").resolve())


# ------------------------------------------------------------------------------------- training callback


def test_training_callback_sees_every_epoch_changes_nothing_and_can_stop(syn):
    spec = pk.PerturbSpec()
    task = pk.split.holdout_cell_type(syn, spec, "ctx0")
    train, source, _ = task.subsets(syn)
    small = dict(n_hidden=32, n_latent=8, batch_size=64, epochs=3)
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
    other.write_text(other.read_text().replace("epochs = 3", "epochs = 2"))
    name = json.loads((out / "record.json").read_text())["study"]["name"]
    with pytest.raises(InputError, match="another configuration .*params"):
        pk.tune.run(other, tmp_path / "o", storage=str(out / "study.db"), study=name, progress=False, log=quiet)


def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    from perturbkit.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text('model = "scgen"\n[space]\nnoise_rate = { type = "float", low = 0.0, high = 0.3 }\n')
    assert main(["tune", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input_noise" in err[0]


# ------------------------------------------------------------------------------ PostgreSQL, several workers


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 (initdb + pg_ctl in a temp dir; as user postgres if root)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        skip_without("PostgreSQL server binaries (initdb, pg_ctl) not found; install Debian's `postgresql` package")
    import psycopg2  # noqa: F401  (the test extra installs psycopg2-binary: Optuna's PostgreSQL driver)
    root = Path(tempfile.mkdtemp(prefix="pk-pg-"))
    datadir = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            skip_without("running as root without `runuser` to start PostgreSQL as user postgres")
        as_user = [runuser, "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    port = _free_port()
    try:
        subprocess.run([*as_user, initdb, "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, text=True)
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        subprocess.run([*as_user, pg_ctl, "-D", str(datadir), "-o", opts, "-l", str(root / "log"), "-w", "-t", "60",
                        "start"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {exc.stderr}") from None
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(datadir), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


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
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}  # none lost, none left running
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

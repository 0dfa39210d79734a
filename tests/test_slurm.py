"""Beyond one machine, for real: the benchmark through Snakemake's SLURM executor on a single-node SLURM
cluster (tests/slurm_cluster.py) with the shipped profile, a cancelled job resubmitted alone, tuning workers
as a SLURM array job on one PostgreSQL study with one worker cancelled mid-trial, and the workflow packaged as
a Workflow RO-Crate (validated with roc-validator), which a run crate can point at.

The SLURM tests need root and Debian's slurm-wlm and munge packages (.ci/run installs them; `make slurm`
runs this file); they fail instead of skipping under PERTURBKIT_SYSTEM_TESTS=1."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import slurm_cluster
from conftest import skip_without
from test_tune import write_config
from test_workflow import SMALL, SNAKEFILE

import perturbkit as pk
from perturbkit.cli import main
from perturbkit.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "workflow" / "profiles" / "slurm"
TUNE_ARRAY = ROOT / "workflow" / "tune-array.sbatch"
#: the test cluster has no accounting database, so job states come from squeue, not sacct; and it checks them
#: every second rather than after the 40 s a busy cluster deserves
TEST_CLUSTER = ("--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1")
CELL_JOB = "rule_bench_cell_wildcards_"  # the comment the executor gives each cell's job


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        skip_without("the Snakemake SLURM executor plugin is missing: pip install -e '.[test]'")
    try:
        cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm_cluster.Unavailable as exc:
        skip_without(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small synthetic benchmark of test_workflow.py (3 cells), and its run by plain `perturbkit bench`."""
    root = tmp_path_factory.mktemp("small")
    cfg = root / "small.toml"
    cfg.write_text(SMALL)
    assert main(["bench", str(cfg), "--out", str(root / "local"), "--no-progress"]) == 0
    return cfg, root / "local"


def snakemake_cmd(workdir: Path, cfg: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir),
            "--profile", str(PROFILE), *TEST_CLUSTER, *extra, "--config", f"bench={cfg}", f"out={out}"]


def run_jobs(cluster: slurm_cluster.Cluster, log: str) -> dict[str, str]:
    """The SLURM jobs of one Snakemake run (named by its run ID): ``{comment: state}``."""
    run_id = re.search(r"SLURM run ID: (\S+)", log)
    assert run_id, log[-3000:]
    rows = cluster.jobs(f"--name={run_id.group(1)}")
    comments = [comment for _, _, comment, _ in rows]
    assert len(comments) == len(set(comments)), rows  # no job submitted twice
    return {comment: state for _, state, comment, _ in rows}


def cells_of(local: Path) -> list[str]:
    return sorted(p.name for p in (local / "cells").iterdir())


def test_bench_through_slurm_equals_local_run_and_a_cancelled_cell_is_resubmitted_alone(slurm, small, tmp_path):
    """One scenario (one full run on the cluster, the costly part): every cell and the aggregation run as SLURM
    jobs; one scGen cell's job is cancelled while it runs; the rerun submits that cell and the aggregation only;
    the results equal the plain local run byte for byte."""
    cfg, local = small
    out = tmp_path / "slurm"
    cells = cells_of(local)
    # a first run that does not retry by itself; one scGen cell's job is cancelled while it runs
    first = subprocess.Popen(snakemake_cmd(tmp_path, cfg, out, "--retries", "0"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    victim, deadline = None, time.monotonic() + 300
    while victim is None and first.poll() is None and time.monotonic() < deadline:
        victim = next(((jid, comment[len(CELL_JOB):]) for jid, state, comment, _ in slurm.jobs()
                       if state == "RUNNING" and comment.startswith(CELL_JOB) and ".scgen." in comment), None)
        time.sleep(0.2)
    assert victim is not None, "no scGen cell job was seen running"
    slurm.run("scancel", victim[0])
    log = first.communicate(timeout=900)[0]
    assert first.returncode != 0, log[-3000:]
    assert f"SLURM-job '{victim[0]}' failed, SLURM status is: 'CANCELLED'" in log, log[-3000:]
    cancelled = victim[1]
    # every other cell ran as its own SLURM job and completed; the aggregation did not run
    assert run_jobs(slurm, log) == {CELL_JOB + c: "CANCELLED" if c == cancelled else "COMPLETED" for c in cells}
    assert not (out / "cells" / cancelled / "result.json").exists() and not (out / "summary.csv").exists()
    assert all((out / "cells" / c / "result.json").exists() for c in cells if c != cancelled), log[-5000:]
    finished = {c: (out / "cells" / c / "result.json").stat().st_mtime_ns for c in cells if c != cancelled}

    # the rerun, with the profile as shipped, submits the cancelled cell and the aggregation, nothing else
    res = subprocess.run(snakemake_cmd(tmp_path, cfg, out), capture_output=True, text=True, timeout=900)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:] + slurm.logs()
    assert run_jobs(slurm, log) == {CELL_JOB + cancelled: "COMPLETED", "rule_bench_aggregate": "COMPLETED"}
    assert {c: (out / "cells" / c / "result.json").stat().st_mtime_ns for c in finished} == finished
    assert (out / "summary.csv").read_bytes() == (local / "summary.csv").read_bytes()
    assert (out / "scores.csv").read_bytes() == (local / "scores.csv").read_bytes()
    graph = {e["@id"]: e for e in json.loads((out / "ro-crate-metadata.json").read_text())["@graph"]}
    assert graph["./"]["mainEntity"] == {"@id": "workflow/Snakefile"}  # a Workflow Run Crate of the workflow
    again = subprocess.run(snakemake_cmd(tmp_path, cfg, out, "-n"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


# --------------------------------------------------------------------------- tuning workers as an array job


def test_tuning_array_job_loses_no_trial_when_a_worker_is_killed(slurm, postgres, syn_path, tmp_path):
    """workflow/tune-array.sbatch: N array tasks share one PostgreSQL study of T trials; one task is cancelled
    mid-trial (SIGTERM, as scancel and time limits send): its trial is marked failed and replaced, the study
    holds exactly T finished trials, and the results job after the array retrains the best as ever."""
    import optuna
    from optuna.trial import TrialState

    n_workers, n_trials = 3, 8
    cfg = write_config(tmp_path / "tune.toml", syn_path, trials=n_trials)
    # trials of a few seconds, none cut short by the pruner: the cancel lands inside a trial
    text = cfg.read_text()
    longer = text.replace("epochs = 3\n", "epochs = 20\n").replace("[tune.pruner]\nn_startup_trials = 2",
                                                                   '[tune.pruner]\nkind = "none"')
    assert longer.count("epochs = 20") == 1 and 'kind = "none"' in longer, text
    cfg.write_text(longer)
    out, study_name = tmp_path / "tune", "array-test"
    env = {**os.environ, "PERTURBKIT": f"{sys.executable} -m perturbkit", "OMP_NUM_THREADS": "1"}
    args = [str(TUNE_ARRAY), str(cfg), str(out), postgres, "--study", study_name]

    storage = optuna.storages.RDBStorage(postgres)  # one connection pool for all the polling below

    def sbatch(*opts: str) -> str:
        res = subprocess.run(["sbatch", "--parsable", "--mem=1000", f"--chdir={tmp_path}", *opts], env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    array = sbatch(f"--array=0-{n_workers - 1}", f"--output={tmp_path}/worker-%a.log", *args)
    results = sbatch(f"--dependency=afterany:{array}", f"--output={tmp_path}/results.log", *args,
                     "--worker", str(n_workers))

    def states() -> dict[str, str]:
        return {jid: state for jid, state, *_ in slurm.jobs()}

    def study():
        try:
            return optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:  # not created yet
            return None

    # cancel task 1 while it runs a trial of its own (each trial records its worker): once a trial has finished
    # (its length tells how long trials take), at a moment when task 1's trial began less than a third of the
    # shortest finished trial ago, so it is not about to end when the signal lands
    victim, victim_trial, deadline = f"{array}_1", None, time.monotonic() + 300
    while victim_trial is None and time.monotonic() < deadline:
        st, jobs = study(), states()
        if st is not None and jobs.get(victim) == "RUNNING":
            trials = st.get_trials(deepcopy=False)
            done = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                    if t.state == TrialState.COMPLETE]
            mine = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("worker") == 1]
            if done and mine and time.time() - mine[0].datetime_start.timestamp() < min(done) / 3:
                slurm.run("scancel", victim)
                victim_trial = mine[0].number
        time.sleep(0.1)
    assert victim_trial is not None, "never saw worker 1 inside a fresh trial"
    while time.monotonic() < deadline + 600 and states().get(results) in ("PENDING", "RUNNING", "COMPLETING"):
        time.sleep(1)
    jobs = states()
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert jobs[victim] == "CANCELLED" and jobs[results] == "COMPLETED", (jobs, logs)
    assert all(jobs[f"{array}_{i}"] == "COMPLETED" for i in range(n_workers) if i != 1), (jobs, logs)

    trials = study().get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # distinct, none lost
    failed = [t for t in trials if t.state == TrialState.FAIL]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    killed = [t for t in failed if "error" not in t.user_attrs]  # no error of its own: interrupted
    assert len(killed) == 1 and killed[0].number == victim_trial, ([(t.number, t.user_attrs) for t in failed], logs)
    # any other failure is a trial begun beyond the total by workers that read the count together
    assert all(t.user_attrs["error"].startswith("surplus") for t in failed if t is not killed[0]), logs
    assert len(finished) == n_trials and len(trials) == n_trials + len(failed), logs  # the killed one replaced
    assert max(t.number for t in finished) > killed[0].number
    # the killed worker wrote no record; the others' records and the results job's tables hold every trial
    assert not (out / "workers" / "worker-1.json").exists()
    assert all((out / "workers" / f"worker-{i}.json").is_file() for i in (0, 2))
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == len(trials) and (table["state"] == "FAIL").sum() == len(failed)
    best = json.loads((out / "best_params.json").read_text())
    assert best["trial"] == study().best_trial.number and best["validation_value"] == study().best_value
    assert (out / "final_summary.csv").is_file() and (out / "ro-crate-metadata.json").is_file()


# ------------------------------------------------------------------------------ the workflow as a crate


def test_workflow_crate_names_the_snakefile_and_validates(tmp_path, offline_rocv):
    out = tmp_path / "crate"
    assert main(["workflow-crate", "--workflow", str(ROOT / "workflow"), "--out", str(out),
                 "--author", "Jane Doe <https://orcid.org/0000-0002-1825-0097>",
                 "--organization", "Example University <https://ror.org/02jx3x895>"]) == 0
    crate = json.loads((out / "ro-crate-metadata.json").read_text())
    graph = {e["@id"]: e for e in crate["@graph"]}
    root = graph["./"]
    assert root["mainEntity"] == {"@id": "Snakefile"}
    main_wf = graph["Snakefile"]
    assert set(main_wf["@type"]) == {"File", "SoftwareSourceCode", "ComputationalWorkflow"}
    assert graph[main_wf["programmingLanguage"]["@id"]]["name"] == "Snakemake"
    inputs = {graph[p["@id"]]["name"] for p in main_wf["input"]}
    assert {"bench", "out", "tune", "tune_workers", "tune_storage", "threads"} <= inputs
    assert graph["#param-out"]["defaultValue"] == "runs/bench"
    assert graph[root["license"]["@id"]]["name"] == "BSD-3-Clause"
    assert graph[root["creator"]["@id"]]["name"] == "Jane Doe"
    for rel in ("Snakefile", "README.md", "example.yaml", "schemas/config.schema.yaml", "profiles/slurm/config.yaml",
                "configs/smoke.toml", "LICENSE"):
        assert (out / rel).is_file() and rel in graph, rel
    assert (out / "Snakefile").read_bytes() == (ROOT / "workflow" / "Snakefile").read_bytes()
    for profile in ("ro-crate-1.1", "workflow-ro-crate-1.0"):
        for severity in ("REQUIRED", "RECOMMENDED"):
            ok, issues = offline_rocv(out, profile, severity)
            assert ok, (profile, severity, issues)

    # the example config runs from the unpacked crate (a dry run: the jobs it would submit)
    res = subprocess.run([sys.executable, "-m", "snakemake", "-s", "Snakefile", "-n", "--cores", "1",
                          "--configfile", "example.yaml"], cwd=out, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and re.search(r"bench_cell\s+60\n", res.stdout), res.stdout[-3000:] + res.stderr

    # without authors: placeholders (the crate is still valid); a zip for WorkflowHub; bad input
    zipped = tmp_path / "wf.crate.zip"
    assert main(["workflow-crate", "--workflow", str(ROOT / "workflow"), "--out", str(zipped)]) == 0
    with zipfile.ZipFile(zipped) as zf:
        meta = json.loads(zf.read("ro-crate-metadata.json"))
        assert "Snakefile" in zf.namelist()
    names = [e.get("name", "") for e in meta["@graph"]]
    assert any(n.startswith("YOUR NAME") for n in names) and any(n.startswith("YOUR ORGANISATION") for n in names)
    assert main(["workflow-crate", "--workflow", str(ROOT / "workflow"), "--out", str(zipped)]) == 0  # replaced
    with pytest.raises(InputError, match="holds no Snakefile"):
        pk.record.write_workflow_crate(ROOT / "src", tmp_path / "x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="from something other than a workflow crate"):
        pk.record.write_workflow_crate(ROOT / "workflow", tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_run_crate_points_at_the_workflow_crate(small, tmp_path, offline_rocv):
    """A bench run made through the workflow holds the workflow's crate in workflow/ (the aggregation step
    writes it); its run crate then names workflow/Snakefile as mainEntity and instrument (Workflow Run Crate)."""
    import shutil

    _, local = small
    run = tmp_path / "run"
    shutil.copytree(local, run)
    assert main(["workflow-crate", "--workflow", str(ROOT / "workflow"), "--out", str(run / "workflow")]) == 0
    pk.bench.write_crate(run)
    assert pk.record.link_workflow(run) and pk.record.link_workflow(run)  # idempotent
    crate = json.loads((run / "ro-crate-metadata.json").read_text())
    graph = {e["@id"]: e for e in crate["@graph"]}
    assert graph["./"]["mainEntity"] == {"@id": "workflow/Snakefile"}
    action = next(e for e in crate["@graph"] if e.get("@type") == "CreateAction")
    assert action["instrument"] == {"@id": "workflow/Snakefile"}
    assert "ComputationalWorkflow" in graph["workflow/Snakefile"]["@type"]
    assert graph["workflow/"]["conformsTo"] == {"@id": pk.record.WORKFLOW_PROFILE}
    results = {r["@id"] for r in action["result"]}
    assert "summary.csv" in results and not any(r.startswith("workflow/") for r in results)
    assert {"@id": "config.toml"} in action["object"]
    assert graph["config.toml"]["exampleOfWork"] == {"@id": "#workflow-param-bench"}
    for profile in ("ro-crate-1.1", "workflow-run-crate-0.5"):
        ok, issues = offline_rocv(run, profile, "REQUIRED")
        assert ok, (profile, issues)
    assert not pk.record.link_workflow(local)  # a run without the workflow's crate is left as it is

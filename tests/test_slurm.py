"""Beyond one machine, for real: the benchmark through Snakemake's SLURM executor on a single-node SLURM
cluster (tests/slurm_cluster.py) with the shipped profile, a cancelled job resubmitted alone, and the
workflow packaged as a Workflow RO-Crate (validated with roc-validator), which a run crate can point at.

The SLURM tests need root and Debian's slurm-wlm and munge packages (.ci/run installs them; `make slurm`
runs this file); they fail instead of skipping under PERTURBKIT_SYSTEM_TESTS=1."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import slurm_cluster
from conftest import skip_without
from test_workflow import SMALL, SNAKEFILE

import perturbkit as pk
from perturbkit.cli import main
from perturbkit.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "workflow" / "profiles" / "slurm"
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
    """The small synthetic benchmark of test_workflow.py (6 cells), and its run by plain `perturbkit bench`."""
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


def test_bench_through_slurm_equals_local_run(slurm, small, tmp_path):
    cfg, local = small
    out = tmp_path / "slurm"
    t0 = time.monotonic()
    res = subprocess.run(snakemake_cmd(tmp_path, cfg, out), capture_output=True, text=True, timeout=900)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:] + slurm.logs()
    # every cell, then the aggregation, ran as its own SLURM job, and each completed
    jobs = run_jobs(slurm, log)
    assert jobs == {**{CELL_JOB + c: "COMPLETED" for c in cells_of(local)}, "rule_bench_aggregate": "COMPLETED"}
    assert (out / "summary.csv").read_bytes() == (local / "summary.csv").read_bytes()
    assert (out / "scores.csv").read_bytes() == (local / "scores.csv").read_bytes()
    assert json.loads((out / "ro-crate-metadata.json").read_text())["@graph"]
    again = subprocess.run(snakemake_cmd(tmp_path, cfg, out, "-n"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    print(f"SLURM benchmark run: {time.monotonic() - t0:.0f} s")


def test_cancelled_job_is_all_a_rerun_resubmits(slurm, small, tmp_path):
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
    assert res.returncode == 0 and re.search(r"bench_cell\s+36\n", res.stdout), res.stdout[-3000:] + res.stderr

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

    cfg, local = small
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

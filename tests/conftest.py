from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

import perturbkit as pk


def skip_without(reason: str) -> None:
    """Skip a test whose system dependency is missing, but fail under CI (.ci/run installs it and sets
    PERTURBKIT_SYSTEM_TESTS=1), so a check that CI promises can never silently not run."""
    if os.environ.get("PERTURBKIT_SYSTEM_TESTS") == "1":
        pytest.fail(f"required under PERTURBKIT_SYSTEM_TESTS=1: {reason}")
    pytest.skip(reason)


def need(package: str, pip_name: str) -> None:
    """:func:`skip_without` the importable ``package`` (a Python package of the test extra, pip name
    ``pip_name``): skipped where it is not installed, a failure under CI, which installs it."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        skip_without(f"{pip_name} is not installed (pip install -c constraints.txt -e '.[test]' installs it)")

# The one place tests take small models and synthetic data from.

#: a small VAE so unit tests train in seconds; the architecture is otherwise the model's own
SMALL = dict(n_hidden=32, n_latent=8, batch_size=64)
#: the same as command-line arguments
SMALL_ARGS = [arg for key, value in SMALL.items() for arg in ("--param", f"{key}={value}")]
#: the same as lines of a [models.NAME] table
SMALL_TOML = "".join(f"{key} = {value}\n" for key, value in SMALL.items())


def synthetic(**kw):
    """Seeded synthetic data with a planted effect (:func:`perturbkit.data.synthetic`): 4 contexts x 2
    conditions x 150 cells, the first 10 of 60 genes responding; keywords change any of it."""
    return pk.data.synthetic(**{"n_contexts": 4, "n_cells": 150, "n_genes": 60, "n_responsive": 10, "effect": 1.5,
                                "seed": 0, **kw})


@pytest.fixture(scope="session")
def syn():
    """:func:`synthetic` with its defaults."""
    return synthetic()


@pytest.fixture(scope="session")
def syn_path(tmp_path_factory, syn):
    path = tmp_path_factory.mktemp("data") / "syn.h5ad"
    syn.write_h5ad(path)
    return path


@pytest.fixture
def offline_rocv(monkeypatch):
    """``check(crate_dir, profile, severity) -> (passed, issues)``: :func:`perturbkit.record.validate` with
    roc-validator offline. The RO-Crate 1.1 JSON-LD context is served from tests/data (the context as published,
    CC0, from the rocrate 0.9.0 wheel) instead of https://w3id.org/ro/crate/1.1/context; any other URL answers
    as an offline cache miss."""
    import requests
    from rocrate_validator.utils import http as rv_http

    context = Path(__file__).parent / "data" / "ro-crate-1.1-context.jsonld"

    def local_get(url, *args, **kwargs):
        resp = requests.Response()
        resp.url = url
        if url.rstrip("/") == "https://w3id.org/ro/crate/1.1/context":
            resp.status_code, resp._content = 200, context.read_bytes()
            resp.headers["Content-Type"] = "application/ld+json"
        else:
            resp.status_code, resp._content = 504, b""
        return resp

    def getattr_(self, name):
        if name in ("get", "head"):
            return local_get
        raise AttributeError(name)

    monkeypatch.setattr(rv_http.HttpRequester, "__getattr__", getattr_)
    monkeypatch.setattr(rv_http.HttpRequester, "fetch_fresh", lambda self, url, **kw: local_get(url))

    def check(crate_dir, profile: str, severity: str = "REQUIRED"):
        return pk.record.validate(crate_dir, profile, severity=severity, offline=False,
                                  cache_path=Path(crate_dir).parent / ".rocv-cache")
    return check


# ------------------------------------------------- benchmark runs through the command line (test_bench*.py)

#: the smoke benchmark: one perturbation, every scenario, a few small cells
SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"


def bench_cli(config, out, *args: str) -> int:
    """The exit status of ``perturbkit bench CONFIG --out OUT --no-progress ARGS``, run in this process."""
    from perturbkit.cli import main

    return main(["bench", str(config), "--out", str(out), "--no-progress", *args])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """configs/smoke.toml run once per test module through the command line (every cell, then aggregation)."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    assert bench_cli(SMOKE, out) == 0
    return out


# ------------------------------------------------- a throw-away PostgreSQL server (test_tune.py, test_slurm.py)


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 (initdb + pg_ctl in a temp dir; as user postgres if
    root)."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        skip_without("PostgreSQL server binaries (initdb, pg_ctl) not found; install Debian's `postgresql` "
                     "package")
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
    port = free_port()
    try:
        subprocess.run([*as_user, initdb, "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, text=True)
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        subprocess.run([*as_user, pg_ctl, "-D", str(datadir), "-o", opts, "-l", str(root / "log"), "-w", "-t",
                        "60", "start"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {exc.stderr}") from None
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(datadir), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------- benchmarks/bench_tables.py on a finished run (test_bench*.py)


def benchmark_script(name: str):
    """``benchmarks/NAME.py`` as a module (the scripts are not part of the package; some import a sibling)."""
    import importlib.util
    import sys

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, f"{folder}/{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(folder)
    return mod


def check_results_file(run: Path, out: Path, tasks=(), extra=()) -> str:
    """Write ``run``'s results file with benchmarks/bench_tables.py (``--task`` for each of ``tasks``) and check
    its answer tables against the run's own files: each row's values are summary.csv's, and its margin is the
    mean over seeds of the trained model's per-seed score minus the baseline's, recomputed here from
    scores.csv."""
    import pandas as pd

    from perturbkit.models import MODELS

    mod = benchmark_script("bench_tables")
    args = [str(run), "--command", "perturbkit bench X --out Y", "--out", str(out)]
    assert mod.main([*args, *(a for t in tasks for a in ("--task", t)), *extra]) == 0
    text = out.read_text()
    summary = pd.read_csv(run / "summary.csv", keep_default_na=False, na_values=[""], dtype={"perturbation": str})
    scores = pd.read_csv(run / "scores.csv", keep_default_na=False, na_values=[""], dtype={"perturbation": str})
    screens = set(summary.scenario[summary.perturbation == "mean"])
    blocks = text.split("## The answer")[1].split("\n## ")[0].split("\nTrained models, ")[0].split(
        "The same for one task, ")
    assert len(blocks) == 1 + len(tasks)
    for split, block in zip(["all", *tasks], blocks):
        rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| scenario")]
        assert rows, block
        head = summary[summary.split == split]
        head = head[head.perturbation.eq("mean") | ~head.scenario.isin(screens)]
        for line in rows:
            cols = [c.strip() for c in line.strip("|").split("|")]
            scenario, metric = cols[0], cols[1].split(" (")[0]
            trained, trained_value = cols[3].split()
            baseline, baseline_value = cols[4].split()
            assert not MODELS[trained].BASELINE and MODELS[baseline].BASELINE
            s = head[(head.scenario == scenario) & (head.metric == metric)].set_index("model")["mean"]
            assert float(trained_value) == pytest.approx(s[trained], abs=5e-4)
            assert float(baseline_value) == pytest.approx(s[baseline], abs=5e-4)
            sel = scores[(scores.scenario == scenario) & (scores.metric == metric)]
            if split != "all":
                sel = sel[sel.split == split]
            if scenario in screens:
                sel = sel[sel.perturbation == "mean"]
            per_seed = sel.groupby(["model", "seed"]).value.mean()
            margin = (per_seed[trained] - per_seed[baseline]).mean()
            assert float(cols[5].split()[0]) == pytest.approx(margin, abs=5e-4)
    return text

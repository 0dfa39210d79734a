"""Data sets fetched on request (``perturbkit data fetch``) and bundled data that travel with the package.

The fetch tests download from a local HTTP server on 127.0.0.1 (a thread of this process) that serves a tiny
.h5ad built here and counts the requests; a registry entry points at it. Nothing else touches the network.
The last test builds the wheel, installs it into a fresh virtual environment and runs the installed command
from a folder outside the checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import perturbkit as pk
from perturbkit.cli import main
from perturbkit.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny2024"


def tiny_h5ad(tmp_path: Path, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame({"condition": ["control", "stimulated"] * 10, "cell_type": ["a"] * 10 + ["b"] * 10},
                       index=[f"c{i}" for i in range(20)])
    adata = ad.AnnData(rng.poisson(3, size=(20, 6)).astype(np.float32), obs=obs,
                       var=pd.DataFrame(index=[f"g{j}" for j in range(6)]))
    path = tmp_path / f"tiny{seed}.h5ad"
    adata.write_h5ad(path)
    return path.read_bytes()


class Server:
    """A file server on 127.0.0.1: ``body`` at ``/tiny.h5ad``; ``mode`` "ok", "truncate" (announces the full
    length, sends half, closes) or "missing" (404); ``requests`` counts the GETs."""

    def __init__(self, body: bytes):
        self.body, self.mode, self.requests = body, "ok", 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests += 1
                if server.mode == "missing" or self.path != "/tiny.h5ad":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                if server.mode == "truncate":
                    self.wfile.write(server.body[: len(server.body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(server.body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/tiny.h5ad"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """The server, a registry entry ``tiny2024`` fetched from it, and an empty cache folder."""
    srv = Server(tiny_h5ad(tmp_path, 0))
    monkeypatch.setitem(pk.data.DATASETS, NAME, pk.data.Dataset(
        name=NAME, file="tiny.h5ad", sha256=None, reference="a test file", doi="none", accession="none",
        spec=pk.PerturbSpec(), url=srv.url))
    monkeypatch.setenv("PERTURBKIT_CACHE", str(tmp_path / "cache"))
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    yield srv
    srv.close()


def cached(tmp_path) -> tuple[Path, Path]:
    folder = tmp_path / "cache" / NAME
    return folder / "tiny.h5ad", folder / "tiny.h5ad.sha256.json"


def test_first_fetch_records_the_sha256_and_later_uses_reuse_the_cache(server, tmp_path, capsys):
    assert pk.data.dataset_status(NAME) == "not fetched"
    assert main(["data", "fetch", NAME, "--no-progress"]) == 0
    path, record = cached(tmp_path)
    digest = hashlib.sha256(server.body).hexdigest()
    assert server.requests == 1 and path.read_bytes() == server.body
    rec = json.loads(record.read_text())
    assert rec["sha256"] == digest and rec["url"] == server.url and rec["size"] == len(server.body)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.h5ad", "tiny.h5ad.sha256.json"]
    assert f"sha256 {digest} recorded" in capsys.readouterr().out
    # later uses: fetch again, load by name, load_any, the list: no second request
    assert main(["data", "fetch", NAME, "--no-progress"]) == 0
    assert "already fetched" in capsys.readouterr().out
    adata = pk.data.load(NAME)
    assert adata.shape == (20, 6) and adata.uns["perturbkit_dataset"]["sha256"] == digest
    _, sha, desc = pk.data.load_any(NAME)
    assert sha == digest and desc == {"dataset": NAME, "file": "tiny.h5ad"}
    assert main(["list", "datasets"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(NAME))
    assert " fetched " in line and server.url in line
    assert server.requests == 1


def test_a_file_changed_on_disk_is_refused_until_fetched_again(server, tmp_path, capsys):
    assert main(["data", "fetch", NAME, "--no-progress"]) == 0
    path, record = cached(tmp_path)
    good = hashlib.sha256(server.body).hexdigest()
    with open(path, "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"01234567")
    bad = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(InputError) as err:
        pk.data.load(NAME)
    msg = str(err.value)
    assert str(path) in msg and bad in msg and good in msg and f"perturbkit data fetch {NAME} with force" in msg
    capsys.readouterr()
    # through the command line: one line, exit status 2; fetch without --force refuses too
    assert main(["predict", "--data", NAME, "--model", "mean_shift", "--holdout", "a",
                 "--out", str(tmp_path / "run")]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: ") and bad in err_lines[0]
    assert not (tmp_path / "run" / "scores.csv").exists()
    assert main(["data", "fetch", NAME, "--no-progress"]) == 2 and server.requests == 1
    # --force downloads again and records the sha256: the data set is usable again
    assert main(["data", "fetch", NAME, "--force", "--no-progress"]) == 0 and server.requests == 2
    assert path.read_bytes() == server.body and pk.data.load(NAME).n_obs == 20
    # a file without its record cannot be checked: refused, with the same fix
    record.unlink()
    with pytest.raises(InputError, match=rf"no recorded sha256 .*perturbkit data fetch {NAME} with force"):
        pk.data.load(NAME)
    assert pk.data.dataset_status(NAME) == "not fetched"


def test_a_file_changed_on_the_server_is_refused_and_not_kept(server, tmp_path, capsys):
    assert main(["data", "fetch", NAME, "--no-progress"]) == 0
    path, record = cached(tmp_path)
    first = hashlib.sha256(server.body).hexdigest()
    server.body = tiny_h5ad(tmp_path, 1)  # the server now serves another file under the same address
    second = hashlib.sha256(server.body).hexdigest()
    path.unlink()  # e.g. the cache was cleared: the next fetch downloads again
    with pytest.raises(InputError) as err:
        pk.data.fetch(NAME, log=lambda *a: None)
    msg = str(err.value)
    assert "the file on the server changed" in msg and first in msg and second in msg and "with force" in msg
    assert server.requests == 2 and not path.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == [record.name]
    assert json.loads(record.read_text())["sha256"] == first
    with pytest.raises(InputError, match="not fetched yet"):
        pk.data.load(NAME)
    # --force accepts the new file and records its sha256
    pk.data.fetch(NAME, force=True, log=lambda *a: None)
    assert json.loads(record.read_text())["sha256"] == second and pk.data.load(NAME).n_obs == 20


@pytest.mark.parametrize("mode, match", [("truncate", "downloading .* failed"), ("missing", "404")])
def test_a_failed_download_leaves_nothing_behind(server, tmp_path, mode, match, capsys):
    server.mode = mode
    with pytest.raises(InputError, match=match) as err:
        pk.data.fetch(NAME, log=lambda *a: None)
    assert "nothing was kept" in str(err.value) and server.requests == 1
    path, _ = cached(tmp_path)
    assert not path.parent.exists() or list(path.parent.iterdir()) == []
    assert pk.data.dataset_status(NAME) == "not fetched"
    assert main(["data", "fetch", NAME, "--no-progress"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: ") and "Traceback" not in err_lines[0]
    server.mode = "ok"  # the next fetch starts from scratch and succeeds
    assert main(["data", "fetch", NAME, "--no-progress"]) == 0 and path.read_bytes() == server.body


def test_unknown_and_unfetched_names_say_what_to_do(server, tmp_path, capsys):
    with pytest.raises(InputError, match=r"Unknown dataset 'tiny2042'\. Did you mean 'tiny2024'"):
        pk.data.fetch("tiny2042")
    assert main(["data", "fetch", "dong2032", "--no-progress"]) == 2
    assert "Did you mean 'dong2023'" in capsys.readouterr().err
    with pytest.raises(InputError) as err:
        pk.data.load(NAME)
    assert "not fetched yet" in str(err.value) and f"perturbkit data fetch {NAME}" in str(err.value)
    assert main(["predict", "--data", NAME, "--model", "mean_shift", "--holdout", "a",
                 "--out", str(tmp_path / "run")]) == 2
    err_line = capsys.readouterr().err.strip()
    assert err_line.count("\n") == 0 and f"perturbkit data fetch {NAME}" in err_line
    assert server.requests == 0


def test_bundled_data_missing_from_an_install_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PERTURBKIT_DATA", str(tmp_path))  # a folder without the bundled files
    with pytest.raises(InputError, match="Bundled dataset 'kang2018' not found at .*lacks its data files"):
        pk.data.load("kang2018")


def test_registry_entries_name_an_address_and_a_paper():
    fetched = {n: ds for n, ds in pk.data.DATASETS.items() if not ds.bundled}
    assert {"dong2023", "hagai2018", "srivatsan2020_sciplex3", "haber2017", "norman2019",
            "replogle2022_k562_essential"} <= set(fetched)
    for ds in pk.data.DATASETS.values():
        assert ds.doi.startswith("10.") and ds.reference
        if ds.bundled:
            assert len(ds.sha256) == 64 and (Path(pk.data.__file__).parent / "datasets" / ds.file).exists()
        else:
            assert ds.sha256 is None and ds.url.startswith("https://") and ds.url.endswith(".h5ad")


def test_docs_list_every_registered_dataset():
    page = (ROOT / "docs" / "data.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in page.splitlines() if line.startswith("| `")}
    assert set(rows) == set(pk.data.DATASETS)
    for name, ds in pk.data.DATASETS.items():
        assert ds.doi in rows[name] and ("bundled" if ds.bundled else ds.url) in rows[name]


def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    """The wheel holds the bundled data; installed into a fresh virtual environment (dependencies reused from
    this one through a .pth file, no network), ``perturbkit`` lists the datasets and predicts on kang2018 from
    a folder outside the checkout."""
    t0 = time.time()
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    run = dict(capture_output=True, text=True, check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], **run)
    (wheel,) = wheels.glob("perturbkit-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for ds in pk.data.DATASETS.values():
        if ds.bundled:
            assert f"perturbkit/datasets/{ds.file}" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], **run)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # this environment's dependencies, as a plain path: its .pth files (the editable perturbkit) are not read
    (site / "deps.pth").write_text(
        next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "anndata").exists()).as_posix()
        + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], **run)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PERTURBKIT_DATA", "PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import perturbkit; print(perturbkit.__file__)"],
                           cwd=work, env=env, **run).stdout.strip()
    assert where.startswith(str(site)), where  # the installed copy, not the checkout's editable one
    listed = subprocess.run([str(venv / "bin" / "perturbkit"), "list", "datasets"], cwd=work, env=env, **run)
    assert "kang2018" in listed.stdout and "bundled" in listed.stdout and "dong2023" in listed.stdout
    out = subprocess.run([str(venv / "bin" / "perturbkit"), "predict", "--data", "kang2018", "--model",
                          "mean_shift", "--holdout", "CD4 T cells", "--n-top-genes", "200", "--n-boot", "5",
                          "--metrics", "r2_mean_top100", "--threads", "1", "--no-progress", "--out", "run"],
                         cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (work / "run" / "scores.csv").exists() and not ROOT.joinpath("run").exists()
    record = json.loads((work / "run" / "record.json").read_text())
    assert record["data"]["sha256"] == pk.data.DATASETS["kang2018"].sha256
    print(f"wheel built, installed and run in {time.time() - t0:.0f} s")

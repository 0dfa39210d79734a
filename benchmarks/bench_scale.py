"""Scale (issue #20 item 5): seconds and peak RSS of every stage of a held-out prediction on a Kang-shaped
screen of ``--cells`` cells x 2,000 genes, for scGen and scPRAM, the data on disk.

**Data.** Kang 2018 (the bundled ``kang2018``, 13,576 cells) restricted to its 2,000 highly variable genes (the
genes :func:`perturbkit.data.preprocess` selects with ``n_top_genes=2000``, seurat; raw counts kept), resampled:
copy ``c`` of the data is a permutation of Kang's cells drawn with ``numpy.random.default_rng([seed, c])``, the
copies laid one after the other and cut at ``--cells``, so every Kang cell appears ``cells / 13,576`` times (or
once less) in the proportions of its cell type, condition and donor; every cell's counts are then binomially
thinned (each count kept with probability ``--keep``, 0.8; seeded per block of 10,000 rows), so no two copies
are equal. obs: ``condition``, ``cell_type``, ``donor`` (Kang's harmonised labels). X is written chunk by chunk
(10,000 rows of CSR float32 at a time) with :func:`perturbkit.ondisk.write_h5ad_chunks`; the dense matrix is
never formed, and the writer holds Kang's 2,000-gene CSR, obs and one block. The file is cached under
``--dir`` by its parameters (``kang_shaped_<cells>x2000_keep<keep>_seed<seed>_v<version>.h5ad``, with a
``.json`` beside it recording how it was made), so reruns reuse it.

**Stages**, each run in a fresh process (``subprocess.Popen``, so its peak is its own):

* ``load``: open the file as a user's backed run does (:class:`perturbkit.ondisk.OnDisk`: obs and var in memory,
  X on disk) and check it against the spec with the held-out context (:func:`perturbkit.data.validate`, which
  scans X in row chunks). The same for both models, so run once per size.
* per model (``scgen``, ``scpram``): ``perturbkit predict --data FILE --backed --model MODEL --holdout "CD4 T
  cells" --epochs 1 --seed 0 --no-progress --out DIR/out_<cells>_<model> --force`` plus the model's
  ``--param KEY=VALUE`` (``DEFAULT_PARAMS``: scPRAM with ``ot_max_candidates=20000`` and
  ``attention_max_keys=20000``, changed with ``--param MODEL:KEY=VALUE``, ``VALUE`` ``none`` for the model's own
  default), the command a user runs. A row is named by its model and the parameters it was given.
  Its stages' seconds are the product's own, from the run's ``record.json`` ``timings``: ``preprocess``
  (``preprocess_s``: with ``--backed`` the input's sha256, the chunked validation and gene statistics, the
  normalised genes written to the run's cache and read back for the models), ``fit`` (``fit_s`` of the model:
  one epoch), ``predict`` (``predict_s``: the held-out context's control cells), ``baselines`` (fit + predict of
  every baseline ``predict`` scores beside the model, as its record lists them: ``control``, ``mean_shift``,
  ``perturbed_mean``, ``linear`` at the time of writing), ``metrics``
  (``evaluate_s``: the effect table and every metric) and ``write`` (``write_s``: pred.h5ad, tables, figures);
  ``process`` is the wall time of the whole process, ``other`` what it spent outside those stages (imports,
  the split, the top DEGs the record lists, record.json).

**Memory.** The script polls ``/proc`` every ``--interval`` seconds (0.1): ``VmRSS`` of the child and of every
descendant (``/proc/PID/task/*/children``, recursively), summed (the *process tree*), and the child's own ``VmHWM``
(its exact peak so far); the samples are written beside the run's log (``<log>.rss.tsv``). A process's peak is the
larger of the highest tree sum sampled, the last ``VmHWM`` read and ``ru_maxrss`` from ``os.wait4`` (the child's
exact peak; the child is started from this small driver, which imports no perturbkit, so the driver's RSS, about 30
MB, is what ``ru_maxrss`` could carry over). A stage's peak is the highest sample in its time window, raised to the
child's ``VmHWM`` when that grew during the window (so a short spike between two samples is not lost); a window
shorter than the interval takes the samples on either side of it. The windows come from the run's log lines, each
timestamped by the driver as it arrives (stdout unbuffered): ``preprocess`` runs from the process start (imports
included) to the line ``task ...: train on ...`` (so it also holds the split); the line ``MODEL: fit F s, predict P
s`` ends ``predict`` (it starts ``P`` seconds earlier; ``fit`` ends there and starts ``F`` seconds before); the
last baseline's line ends ``baselines``; ``metrics`` takes the next ``evaluate_s`` seconds; ``write`` the rest of
the process (so its peak also covers the top DEGs computed before it). Where a line is missing (the product's log
changed) that stage's peak is left empty and the process peak still stands. MB = 2^20 bytes. A run that fails (or
that ``--stop-above-mb`` stops: SIGTERM once its tree passes that RSS, a guard for a shared machine) keeps its exit
status, its error, its peak, and the fit and predict seconds of its model's log line where it got that far.

Usage (from the project root)::

    .venv/bin/python benchmarks/bench_scale.py --cells 10000,100000 [--models scgen,scpram] [--threads N]
        [--param MODEL:KEY=VALUE ...] [--n-boot N] [--metrics A,B] [--stop-above-mb MB] [--dir runs/scale]
        [--out benchmarks/results/scale.md]

Results accumulate in ``--out`` with a ``.json`` beside it (``scale.json``): a run replaces the rows it ran (a
size's model with the same parameters) and keeps the others, each row with its command, date, commit and the
machine's load average (before and after), and the markdown is written again from all of them, atomically. The acceptance check of issue #20 (peak
RSS under 4 GB for both models at 1M cells; every stage's time at most 12x from 100k to 1M) is printed under the
tables when both sizes are there. Not a test: minutes at 100k, hours at 1M on a 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOLDOUT = "CD4 T cells"
N_GENES = 2000
BLOCK = 10_000  # rows per written block (and per thinning seed)
VERSION = 1  # of the generator: part of the cached file's name
MODELS = ("scgen", "scpram")
#: model parameters the benchmark passes unless ``--param`` says otherwise: scPRAM's two all-pairs steps (the
#: partner search of its OT pairing and its attention) capped at 20,000 perturbed cells / keys, the options
#: docs/scpram.md ("OT at scale") gives for data of this size. Without them both grow with the square of the
#: cells (``--param scpram:ot_max_candidates=none --param scpram:attention_max_keys=none``: the published
#: all-pairs method, which at 1M cells did not finish its pairing in 52 minutes).
#: 20,000 is perturbkit.models.scpram.SCALE_CAP, the cap scPRAM's warnings name (written out: this driver imports
#: no perturbkit module that would load numpy or torch, so that its own RSS stays small)
DEFAULT_PARAMS = {"scpram": {"ot_max_candidates": 20000, "attention_max_keys": 20000}}
STAGES = ("load", "preprocess", "fit", "predict", "baselines", "metrics", "write", "process")
#: the stages inside the predict process, in the order the tables show them
PREDICT_STAGES = STAGES[1:-1]
LIMIT_MB = 4e9 / 2**20  # issue #20: under 4 GB (4e9 bytes: half of one dense float32 copy of 1M x 2,000)
GROWTH = 12.0  # issue #20: at most 12x per stage from 100k to 1M


# ------------------------------------------------------------------------------------- child processes


def generate(path: str, n_cells: int, keep: float, seed: int) -> dict:
    """Write the Kang-shaped file (see the module docstring); returns what the sidecar records."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    import perturbkit as pk
    from perturbkit.ondisk import write_h5ad_chunks
    from perturbkit.spec import Preprocessing

    t = time.perf_counter()
    kang = pk.data.load("kang2018")
    hvg, _ = pk.data.preprocess(kang, Preprocessing(n_top_genes=N_GENES), log=lambda m: None)
    genes = kang.var_names.get_indexer(hvg.var_names)
    if len(genes) != N_GENES or (genes < 0).any():
        raise SystemExit(f"error: expected {N_GENES} highly variable Kang genes, got {len(genes)}")
    genes.sort()  # Kang's gene order
    X = sp.csr_matrix(kang.X)[:, genes].tocsr()
    var = pd.DataFrame(index=kang.var_names[genes])
    small = kang.obs[["condition", "cell_type", "donor"]].copy()
    names = kang.obs_names.to_numpy()
    del kang, hvg
    n_kang = X.shape[0]
    copies = math.ceil(n_cells / n_kang)
    order = np.concatenate([np.random.default_rng([seed, c]).permutation(n_kang) for c in range(copies)])[:n_cells]
    copy = np.repeat(np.arange(copies), n_kang)[:n_cells]
    obs = small.iloc[order].copy()
    obs.index = pd.Index([f"{names[i]}-{c}" for i, c in zip(order, copy)])

    def blocks():
        for b, start in enumerate(range(0, n_cells, BLOCK)):
            rng = np.random.default_rng([seed, copies, b])
            block = X[order[start:start + BLOCK]]
            block.data = rng.binomial(block.data.astype(np.int64), keep).astype(np.float32)
            block.eliminate_zeros()
            yield block

    write_h5ad_chunks(path, obs, var, blocks())
    return {"cells": n_cells, "genes": N_GENES, "copies_of_kang": copies, "keep": keep, "seed": seed,
            "version": VERSION, "seconds_in_process": time.perf_counter() - t}


def load(path: str) -> dict:
    """The load stage: open backed (obs in memory, X on disk) and validate (X scanned in row chunks)."""
    import perturbkit as pk
    from perturbkit.ondisk import OnDisk
    from perturbkit.spec import PerturbSpec

    t = time.perf_counter()
    with OnDisk(path) as od:
        pk.data.validate(od, PerturbSpec(), holdout=HOLDOUT)
        n = od.n_obs
    return {"cells": n, "seconds": time.perf_counter() - t}


# --------------------------------------------------------------------------------------------- monitor


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line[:5]] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/PID/task/TID/children)."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                try:
                    with open(f"/proc/{p}/task/{tid}/children") as fh:
                        todo.extend(int(c) for c in fh.read().split())
                except (FileNotFoundError, ProcessLookupError):
                    pass
        except (FileNotFoundError, ProcessLookupError):
            pass
    return seen


def monitored(cmd: list[str], log_path: Path, interval: float, env: dict | None = None,
              stop_above_mb: float | None = None) -> dict:
    """Run ``cmd`` in a fresh process, sampling its process tree's RSS; its output (timestamped lines) goes to
    ``log_path``. Returns rc, seconds, samples [(t, tree_kb, hwm_kb)], lines [(t, text)], ru_maxrss_kb, and
    ``stopped`` (None, or the time and RSS at which the tree passed ``stop_above_mb`` and the child was sent
    SIGTERM, then SIGKILL 30 s later if still there: a guard for a shared machine)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=ROOT)
    lines: list[tuple[float, str]] = []

    def reader():
        with open(log_path, "w") as fh:
            for line in proc.stdout:
                lines.append((time.monotonic() - t0, line.rstrip("\n")))
                fh.write(line)
                fh.flush()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    samples: list[tuple[float, int, int]] = []
    status = rusage = stopped = None
    while True:
        pids = _tree(proc.pid)
        root = _status(proc.pid)
        total = root.get("VmRSS", 0) + sum(_status(p).get("VmRSS", 0) for p in pids[1:])
        now = time.monotonic() - t0
        if root:
            samples.append((now, total, root.get("VmHWM", 0)))
        if stop_above_mb and stopped is None and total > stop_above_mb * 1024:
            stopped = {"t": now, "rss_mb": total / 1024}
            proc.send_signal(15)
        elif stopped is not None and now - stopped["t"] > 30:
            proc.kill()
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(interval)
    seconds = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    th.join(timeout=30)
    with open(log_path.with_suffix(".rss.tsv"), "w") as fh:  # the timeline, for reading a peak against the log
        fh.write("seconds\ttree_rss_mb\tchild_vmhwm_mb\n")
        fh.writelines(f"{t:.2f}\t{tree / 1024:.0f}\t{hwm / 1024:.0f}\n" for t, tree, hwm in samples)
    return {"rc": proc.returncode, "seconds": seconds, "samples": samples, "lines": lines,
            "ru_maxrss_kb": rusage.ru_maxrss, "stopped": stopped}


def process_peak_mb(run: dict) -> dict:
    s = run["samples"]
    tree = max((x[1] for x in s), default=0)
    hwm = max((x[2] for x in s), default=0)
    return {"peak_mb": max(tree, hwm, run["ru_maxrss_kb"]) / 1024, "tree_sampled_mb": tree / 1024,
            "child_hwm_mb": max(hwm, run["ru_maxrss_kb"]) / 1024}


def window_peak_mb(samples, a: float, b: float) -> float | None:
    """The peak in [a, b]: the highest tree sample there, or the child's VmHWM when it grew in the window."""
    inside = [x for x in samples if a <= x[0] <= b]
    before = [x for x in samples if x[0] < a]
    after = [x for x in samples if x[0] > b]
    if not inside:  # a window shorter than the interval: the samples on either side of it
        inside = before[-1:] + after[:1]
    peak = max((x[1] for x in inside), default=0)
    hwm_before = before[-1][2] if before else 0
    hwm_after = after[0][2] if after else (inside[-1][2] if inside else 0)
    if hwm_after > hwm_before:
        peak = max(peak, hwm_after)
    return peak / 1024 if (inside or hwm_after > hwm_before) else None


def stage_windows(lines, timings: dict, model: str, end: float) -> dict[str, tuple[float, float]]:
    """Stage -> (start, stop) in the run's clock, from its log lines and record.json timings."""
    def at(pred):
        return next((t for t, text in lines if pred(text)), None)

    w: dict[str, tuple[float, float]] = {}
    task = at(lambda s: s.startswith("task ") and ": train on " in s)
    if task is not None:
        w["preprocess"] = (0.0, task)
    mine = at(lambda s: s.startswith(f"{model}: fit "))
    fit_s, pred_s = timings.get("fit_s", {}).get(model), timings.get("predict_s", {}).get(model)
    if mine is not None and fit_s is not None and pred_s is not None:
        w["predict"] = (mine - pred_s, mine)
        w["fit"] = (mine - pred_s - fit_s, mine - pred_s)
        last = mine
        for b in timings.get("fit_s", {}):
            tb = at(lambda s, b=b: s.startswith(f"{b}: fit ")) if b != model else None
            if tb is not None:
                last = max(last, tb)
        if last > mine:
            w["baselines"] = (mine, last)
        if "evaluate_s" in timings:
            w["metrics"] = (last, last + timings["evaluate_s"])
            w["write"] = (last + timings["evaluate_s"], end)
    return w


def logged_timings(lines, model: str) -> dict:
    """``fit_s`` / ``predict_s`` of the models whose line ``NAME: fit F s, predict P s`` was logged (for a run
    that did not finish, so has no record.json)."""
    import re

    out: dict = {"fit_s": {}, "predict_s": {}}
    for _t, text in lines:
        m = re.match(r"(\S+): fit ([0-9.]+) s, predict ([0-9.]+) s", text)
        if m:
            out["fit_s"][m[1]], out["predict_s"][m[1]] = float(m[2]), float(m[3])
    return out


def predict_stages(record: dict, model: str) -> dict[str, float]:
    t = record.get("timings", {})
    fit, pred = t.get("fit_s", {}), t.get("predict_s", {})
    out = {"preprocess": t.get("preprocess_s"), "fit": fit.get(model), "predict": pred.get(model),
           "metrics": t.get("evaluate_s"), "write": t.get("write_s")}
    base = [fit[b] + pred[b] for b in fit if b != model and b in pred]
    out["baselines"] = sum(base) if base else None
    if "load_s" in t:  # a product that times loading apart from preprocessing
        out["load_in_predict"] = t["load_s"]
    return out


# ------------------------------------------------------------------------------------------- the runs


def data_path(folder: Path, n: int, keep: float, seed: int) -> Path:
    return folder / f"kang_shaped_{n}x{N_GENES}_keep{keep:g}_seed{seed}_v{VERSION}.h5ad"


def child_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", *args]


def child_json(run: dict, what: str, log_path: Path) -> dict:
    if run["rc"] != 0:
        tail = "\n".join(text for _, text in run["lines"][-15:])
        raise SystemExit(f"error: {what} failed with exit status {run['rc']} (log {log_path}):\n{tail}")
    for _, text in reversed(run["lines"]):
        if text.startswith("{"):
            return json.loads(text)
    raise SystemExit(f"error: {what} printed no result (log {log_path})")


def ensure_data(folder: Path, n: int, args, log) -> dict:
    """The cached file of ``n`` cells (written in a fresh process when missing) and how it was made."""
    path = data_path(folder, n, args.keep, args.seed)
    side = path.with_suffix(".json")
    if path.exists() and side.exists():
        info = json.loads(side.read_text())
        log(f"data: {path} (cached; written in {info['seconds']:.0f} s, writer peak {info['peak_mb']:.0f} MB)")
        return {**info, "cached": True}
    log(f"data: writing {path} ...")
    lp = folder / f"{path.stem}.log"
    run = monitored(child_cmd("generate", str(path), str(n), str(args.keep), str(args.seed)), lp, args.interval)
    res = child_json(run, "writing the data", lp)
    info = {"path": str(path), **res, "seconds": run["seconds"], **process_peak_mb(run),
            "file_mb": path.stat().st_size / 2**20, "written": stamp()}
    atomic_write(side, json.dumps(info, indent=2) + "\n")
    log(f"data: wrote {path} ({info['file_mb']:.0f} MB) in {run['seconds']:.0f} s, writer peak "
        f"{info['peak_mb']:.0f} MB")
    return {**info, "cached": False}


def row_name(model: str, params: dict) -> str:
    """A results row's name: the model, and the parameters it was given (``scpram (ot_max_candidates=20000,
    ...)``)."""
    return model if not params else f"{model} ({', '.join(f'{k}={v}' for k, v in params.items())})"


def parse_params(items: list[str], models: list[str]) -> dict:
    """``DEFAULT_PARAMS`` changed by ``--param MODEL:KEY=VALUE`` items (``VALUE`` ``none``: the model's own
    default, so the parameter is not passed)."""
    params = {m: dict(DEFAULT_PARAMS.get(m, {})) for m in models}
    for item in items:
        head, eq, value = item.partition("=")
        model, colon, key = head.partition(":")
        model, key, value = model.strip(), key.strip(), value.strip()
        if not (eq and colon and key and value):
            raise SystemExit(f"error: --param {item!r} must look like MODEL:KEY=VALUE, e.g. "
                             "--param scpram:ot_max_candidates=none")
        if model not in params:
            raise SystemExit(f"error: --param {item!r} names model {model!r}, which --models does not run "
                             f"({', '.join(models)})")
        if value.lower() == "none":
            params[model].pop(key, None)
        else:
            params[model][key] = value
    return params


def run_size(folder: Path, n: int, args, log) -> dict:
    data = ensure_data(folder, n, args, log)
    path = Path(data["path"])
    size = {"cells": n, "data": data, "load_before": os.getloadavg(), "started": stamp(), "models": {}}

    lp = folder / f"load_{n}.log"
    run = monitored(child_cmd("load", str(path)), lp, args.interval)
    res = child_json(run, "the load stage", lp)
    size["load"] = {"seconds": res["seconds"], "process_s": run["seconds"], **process_peak_mb(run)}
    log(f"{n} cells, load: {res['seconds']:.1f} s, peak {size['load']['peak_mb']:.0f} MB")

    for model in args.models:
        params = args.params[model]
        name = row_name(model, params)
        out = folder / (f"out_{n}_{model}" + "".join(f"_{k}{v}" for k, v in params.items()))
        cmd = [sys.executable, "-m", "perturbkit", "predict", "--data", str(path), "--backed", "--model", model,
               "--holdout", HOLDOUT, "--epochs", "1", "--seed", str(args.seed), "--no-progress", "--force",
               "--out", str(out)]
        for k, v in params.items():
            cmd += ["--param", f"{k}={v}"]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        if args.n_boot is not None:
            cmd += ["--n-boot", str(args.n_boot)]
        if args.metrics is not None:
            cmd += ["--metrics", args.metrics]
        lp = folder / f"predict_{out.name[4:]}.log"
        before = os.getloadavg()
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        started = stamp()
        log(f"{n} cells, {name}: {' '.join(shlex.quote(c) for c in cmd)}")
        run = monitored(cmd, lp, args.interval, stop_above_mb=args.stop_above_mb)
        row = {"model": model, "params": params, "command": " ".join(shlex.quote(str(c)) for c in cmd[2:]),
               "rc": run["rc"], "process_s": run["seconds"], "load_before": before, "load_after": os.getloadavg(),
               **process_peak_mb(run), "log": str(lp), "out": str(out), "bench_command": args.command, "started": started,
               "commit": commit(), "uptime": uptime, "machine": args.machine}
        if run["rc"] != 0:
            tail = [text for _, text in run["lines"][-5:]]
            row["error"] = tail[-1] if tail else f"exit status {run['rc']}"
            if run["stopped"]:
                row["error"] = (f"stopped by the script at {run['stopped']['rss_mb']:.0f} MB, "
                                f"{run['stopped']['t']:.0f} s in (--stop-above-mb {args.stop_above_mb:g})")
            # what the log shows of the stages reached: MODEL's own line gives its fit and predict seconds
            timings = logged_timings(run["lines"], model)
            row["seconds"] = {k: v for k, v in (("fit", timings.get("fit_s", {}).get(model)),
                                                ("predict", timings.get("predict_s", {}).get(model)))
                              if v is not None}
            windows = stage_windows(run["lines"], timings, model, run["seconds"])
            row["peak_stage_mb"] = {k: window_peak_mb(run["samples"], a, b) for k, (a, b) in windows.items()
                                    if k in ("preprocess", "fit", "predict")}
            row["reached"] = [f"{t:.0f} s: {text}" for t, text in run["lines"] if text.startswith(
                ("preprocessing:", "task ", f"{model}: fit "))]
            log(f"{n} cells, {name}: FAILED (exit status {run['rc']}, peak {row['peak_mb']:.0f} MB): "
                + row["error"] + "; reached: " + " | ".join(row["reached"]))
        else:
            record = json.loads((out / "record.json").read_text())
            row["seconds"] = predict_stages(record, model)
            windows = stage_windows(run["lines"], record.get("timings", {}), model, run["seconds"])
            row["peak_stage_mb"] = {k: window_peak_mb(run["samples"], a, b) for k, (a, b) in windows.items()}
            row["threads"] = record.get("determinism", {}).get("torch_threads")
            row["train_cells"] = record.get("split", {}).get("n_train")
            scores = _scores(out / "scores.csv", model)
            row["scores"] = scores
            log(f"{n} cells, {name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in row["seconds"].items()
                                                       if v is not None)
                + f"; peak {row['peak_mb']:.0f} MB; "
                + ", ".join(f"{k} {v:.0f} MB" for k, v in row["peak_stage_mb"].items() if v is not None))
        size["models"][name] = row
    size["load_after"] = os.getloadavg()
    return size


def _scores(path: Path, model: str) -> dict:
    """The model's pearson_delta and r2_mean_all (a sanity check that the run predicted something)."""
    import csv

    out = {}
    with open(path) as fh:
        for r in csv.DictReader(fh):
            if r["model"] == model and r["metric"] in ("pearson_delta", "r2_mean_all") and r["value"]:
                out[r["metric"]] = float(r["value"])
    return out


# --------------------------------------------------------------------------------------------- output


def stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def atomic_write(path: Path, text: str) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from perturbkit._io import atomic_write_text  # a leaf module: imports no numpy, torch or scanpy

    atomic_write_text(path, text)


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + (" (src/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def other(r: dict) -> float | None:
    """The predict process's seconds outside the product's timed stages: imports, the split, the top DEGs of
    the record (computed after ``evaluate_s``), record.json."""
    sec = r.get("seconds")
    if not sec or r.get("rc"):
        return None
    return r["process_s"] - sum(v for k, v in sec.items() if v is not None and k != "load_in_predict")


def fmt(v, spec=".1f") -> str:
    return "" if v is None else format(v, spec)


def render(results: dict) -> str:
    sizes = sorted(results["sizes"].values(), key=lambda s: s["cells"])
    lines = [
        "# Scale: seconds and peak RSS by stage, Kang-shaped data on disk",
        "",
        "`benchmarks/bench_scale.py` (its docstring says how the data are made and each number measured): a "
        f"Kang-shaped screen of N cells x {N_GENES} genes written chunk by chunk to an .h5ad, then per model "
        f"`perturbkit predict --backed --holdout \"{HOLDOUT}\" --epochs 1` in a fresh process. Seconds: the "
        "product's own (record.json `timings`), `load` and `process` measured by the script; peak RSS: the "
        "script's polling of /proc (the process tree's summed VmRSS and the child's VmHWM), MB = 2^20 bytes. "
        "The machine is shared: the load average (1 min) before and after each run is in the last table.",
        "",
    ]
    for s in sizes:
        for m, r in s["models"].items():
            lines.append(f"- {s['cells']:,} cells, {m}: `{r['bench_command']}` on {r['machine']}, {r['started']}, "
                         f"commit {r['commit']}; `uptime` before: {r['uptime']}")
    lines += ["", "## Seconds per stage", "",
              "| cells | model | train cells | load | preprocess | fit (1 epoch) | predict | baselines | metrics "
              "| write | other | process | exit |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in sizes:
        for m, r in s["models"].items():
            sec = r.get("seconds", {})
            lines.append(f"| {s['cells']:,} | {m} | {r.get('train_cells', '')} | {fmt(s['load']['seconds'])} | "
                         + " | ".join(fmt(sec.get(k)) for k in PREDICT_STAGES)
                         + f" | {fmt(other(r))} | {fmt(r['process_s'])} | {r['rc']}"
                         + (f": {r['error']}" if r.get("error") else "") + " |")
    lines += ["", "## Peak RSS per stage (MB)", "",
              "`load` is its own process; the others are windows of the predict process (empty: the window could "
              "not be placed). `peak` is the whole process tree's peak, the number the 4 GB limit applies to.",
              "",
              "| cells | model | load | preprocess | fit | predict | baselines | metrics | write | peak (tree) "
              "| data written: s, writer peak MB, file MB |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in sizes:
        d = s["data"]
        for m, r in s["models"].items():
            st = r.get("peak_stage_mb", {})
            lines.append(f"| {s['cells']:,} | {m} | {fmt(s['load']['peak_mb'], '.0f')} | "
                         + " | ".join(fmt(st.get(k), ".0f") for k in PREDICT_STAGES)
                         + f" | **{r['peak_mb']:.0f}** | {d['seconds']:.0f} s, {d['peak_mb']:.0f} MB, "
                         f"{d['file_mb']:.0f} MB |")
    lines += ["", "## Runs", "",
              "| cells | model | torch threads | load avg before -> after | pearson_delta | r2_mean_all |",
              "|---:|---|---:|---|---:|---:|"]
    for s in sizes:
        for m, r in s["models"].items():
            sc = r.get("scores", {})
            lines.append(f"| {s['cells']:,} | {m} | {r.get('threads', '')} | {r['load_before'][0]:.2f} -> "
                         f"{r['load_after'][0]:.2f} | {fmt(sc.get('pearson_delta'), '.3f')} | "
                         f"{fmt(sc.get('r2_mean_all'), '.3f')} |")
    lines += acceptance(results)
    return "\n".join(lines) + "\n"


def acceptance(results: dict) -> list[str]:
    """Issue #20's check on every row run at 1M cells: exit 0 and a peak under 4 GB; and, for a row run with
    the same parameters at 100k, every stage at most 12x slower. A model meets it when one of its rows does."""
    sz = results["sizes"]
    if "1000000" not in sz:
        return ["", "Acceptance (issue #20): needs the 1,000,000-cell run "
                "(`python benchmarks/bench_scale.py --cells 1000000`)."]
    big, small = sz["1000000"], sz.get("100000", {"models": {}})
    out, met = ["", "## Acceptance (issue #20)", ""], {m: [] for m in MODELS}
    for name, b in big["models"].items():
        fits = b["rc"] == 0 and b["peak_mb"] < LIMIT_MB
        line = (f"- {name} at 1,000,000 cells: exit {b['rc']}, peak {b['peak_mb']:.0f} MB "
                f"({'under' if fits else 'NOT under'} 4 GB = {LIMIT_MB:.0f} MB)")
        a = small["models"].get(name)
        grows = False
        if a is None or a.get("rc") != 0 or b["rc"] != 0:
            line += "; time 100k -> 1M: " + ("no 100k run with these parameters" if a is None else "not comparable "
                                             "(a run did not finish)")
        else:
            sa, sb = a["seconds"], b["seconds"]
            ratios = {k: sb[k] / sa[k] for k in sa if sa.get(k) and sb.get(k) is not None}
            ratios["load"] = big["load"]["seconds"] / small["load"]["seconds"]
            worst = max(ratios, key=ratios.get)
            grows = ratios[worst] <= GROWTH
            line += ("; time 100k -> 1M: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items())
                     + f"; largest {worst} {ratios[worst]:.1f}x ({'within' if grows else 'OVER'} {GROWTH:g}x)")
        out.append(line)
        if fits and grows:
            met[b.get("model", name)].append(name)
    out.append("")
    for m, names in met.items():
        out.append(f"- **{m}: {'met' if names else 'NOT met'}**" + (f" by {'; '.join(names)}" if names else ""))
    return out


def merge(results: dict, size: dict) -> None:
    """Put a size's new rows into ``results``: they replace the rows of the same name (model and parameters);
    the size's other rows (other models, other parameters, run earlier) stay, before the new ones."""
    kept = results["sizes"].get(str(size["cells"]), {}).get("models", {})
    size["models"] = {**{k: v for k, v in kept.items() if k not in size["models"]}, **size["models"]}
    results["sizes"][str(size["cells"])] = size


def upgrade(results: dict) -> dict:
    """Results written before rows carried their own command, date and commit (they were the size's): copied
    onto each row, which also names its model and parameters."""
    for s in results["sizes"].values():
        for name, r in s["models"].items():
            r.setdefault("model", name.split(" ")[0])
            r.setdefault("params", {})
            for key, old in (("bench_command", "command"), ("started", "started"), ("commit", "commit"),
                             ("uptime", "uptime"), ("machine", "machine")):
                r.setdefault(key, s.get(old, ""))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", default="10000,100000", help="comma-separated sizes (default 10000,100000)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--keep", type=float, default=0.8, help="binomial thinning: probability a count is kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="perturbkit predict --threads (default: its own)")
    ap.add_argument("--param", action="append", default=[], metavar="MODEL:KEY=VALUE",
                    help="a model parameter for perturbkit predict --param (repeatable; VALUE none: the model's "
                    f"default); default {', '.join(f'{m}:{k}={v}' for m, d in DEFAULT_PARAMS.items() for k, v in d.items())}")
    ap.add_argument("--n-boot", type=int, default=None, help="perturbkit predict --n-boot (default: its own)")
    ap.add_argument("--metrics", default=None, help="perturbkit predict --metrics (default: its own)")
    ap.add_argument("--stop-above-mb", type=float, default=None,
                    help="stop a run (SIGTERM) whose process tree passes this RSS (MB): a guard on a shared machine")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between /proc samples")
    ap.add_argument("--dir", default=str(ROOT / "runs/scale"), help="data, run outputs and logs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/scale.md"))
    ap.add_argument("--data-only", action="store_true",
                    help="only write (or find) the data files of --cells, run nothing")
    ap.add_argument("--render", action="store_true",
                    help="only write --out again from the .json beside it (no run)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        res = generate(rest[0], int(rest[1]), float(rest[2]), int(rest[3])) if kind == "generate" else load(rest[0])
        print(json.dumps(res))
        return
    try:
        cells = [int(c) for c in args.cells.split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"error: --cells takes comma-separated integers, got {args.cells!r}") from None
    if not cells or min(cells) < 1000:
        raise SystemExit(f"error: --cells must be at least 1000 (a held-out context needs cells), got {args.cells!r}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models:
        raise SystemExit("error: --models names no model")
    if not 0 < args.keep <= 1:
        raise SystemExit(f"error: --keep must be in (0, 1], got {args.keep}")
    args.params = parse_params(args.param, args.models)
    folder = Path(args.dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    store = out.with_suffix(".json")
    results = upgrade(json.loads(store.read_text())) if store.exists() else {"sizes": {}}
    if args.render:
        if not results["sizes"]:
            raise SystemExit(f"error: --render: {store} holds no results; run a size first")
        atomic_write(out, render(results))
        print(f"wrote {out} from {store}")
        return
    args.command = " ".join(["python", "benchmarks/bench_scale.py", *map(shlex.quote, sys.argv[1:])])
    args.machine = f"{platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()})"

    def log(msg):
        print(msg, flush=True)

    if args.data_only:
        for n in cells:
            ensure_data(folder, n, args, log)
        return
    for n in cells:
        merge(results, run_size(folder, n, args, log))
        atomic_write(store, json.dumps(results, indent=1) + "\n")
        text = render(results)
        atomic_write(out, text)
    print(text)
    print(f"wrote {out} and {store}")


if __name__ == "__main__":
    main()

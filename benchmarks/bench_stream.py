"""Streamed training and prediction from disk (``perturbkit predict --backed``): what a training epoch's reads
cost by shuffling scheme, and the peak memory of whole runs.

Two measurements, each in a fresh child process:

* ``--reads FILE``: one epoch of mini-batches (``--batch`` cells, scGen's 32 by default) over every row of a
  CSR ``.h5ad`` (e.g. a preprocessed cache, ``OUT/.cache/data-*.h5ad``), read but not trained on, by scheme:

  - ``random rows, one read per batch``: every batch's rows read on their own (sorted), as scvi-tools'
    ``AnnTorchDataset`` reads backed data;
  - ``random rows, grouped reads`` (what ``perturbkit.models._train.Rows.batches`` does): the same batches, in
    the same order, read ``READ_BYTES`` of rows at a time (one sorted read per group, then cut);
  - ``random chunks``: blocks of ``--chunk`` consecutive rows in random order, the rows shuffled within a block
    (one slice read per block; the batches hold neighbouring cells of the file);
  - ``in memory``: the CSR matrix in memory, each batch cut from it (the plain loop).

  Seconds per epoch (wall, on a shared machine: noisy) and the child's peak RSS.
* ``--fit FILE``: the models of ``--fit-models`` fitted on the training cells of ``--holdout`` of a preprocessed
  file, from disk (a view of the file) and in memory (the file read and the cells copied, as before streamed
  training); seconds of the fit and the child's peak RSS.
* ``--predict FILE``: ``perturbkit predict --backed`` (``--model`` each of ``--models``, ``--holdout``,
  ``--epochs``) in a child whose own peak RSS (``VmHWM`` of ``/proc/self/status``, read at exit) is reported
  with its wall time; ``--in-memory`` also runs the same command without ``--backed``.

Usage::

    .venv/bin/python benchmarks/bench_stream.py --reads /tmp/od/run/.cache/data-KEY.h5ad
    .venv/bin/python benchmarks/bench_stream.py --predict /tmp/kang3.h5ad --models scgen,scpram --epochs 1

Each table is printed and written into ``benchmarks/results/ondisk.md`` between its own ``bench_stream``
markers, named by the measurement and the file's name (a rerun of the same replaces that section only; the rest
of the file, written by ``bench_ondisk.py``, is kept).
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/ondisk.md"


def markers(kind: str) -> tuple[str, str]:
    """The two lines around a measurement's section of RESULTS (a rerun of the same kind, on a file of the same
    name, replaces only that section)."""
    return f"<!-- bench_stream {kind} -->", f"<!-- /bench_stream {kind} -->"
SCHEMES = ("random rows, one read per batch", "random rows, grouped reads", "random chunks", "in memory")


def peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def epoch(path: str, scheme: str, batch: int, chunk: int, seed: int) -> dict:
    """One epoch's batches of ``path`` read by ``scheme``; seconds and peak RSS."""
    import numpy as np
    import torch

    from perturbkit import ondisk
    from perturbkit.models._train import Rows

    with ondisk.OnDisk(path) as od:
        n = od.n_obs
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        parts = [order[i:i + batch] for i in range(0, n, batch)]
        rows = Rows(od.X.to_memory() if scheme == "in memory" else od.X)
        t = time.perf_counter()
        seen = 0
        if scheme == "random rows, one read per batch":
            for part in parts:
                seen += rows.take(part).shape[0]
        elif scheme in ("random rows, grouped reads", "in memory"):
            for xb in rows.batches(parts):
                seen += xb.shape[0]
        else:
            rng = np.random.default_rng(seed)
            for start in rng.permutation(np.arange(0, n, chunk)):
                block = rows.slice(int(start), int(start) + chunk)
                block = block[torch.from_numpy(rng.permutation(block.shape[0]))]
                for i in range(0, block.shape[0], batch):
                    seen += block[i:i + batch].shape[0]
        seconds = time.perf_counter() - t
    assert seen == n
    return {"scheme": scheme, "cells": n, "genes": od.n_vars, "seconds": seconds, "peak_rss_mb": peak_mb()}


def fit(path: str, model: str, where: str, holdout: str) -> dict:
    """Fit ``model`` on the training cells of ``holdout`` of the preprocessed file ``path``: from disk (the
    cells as a view of the file, as ``predict --backed`` now gives them) or in memory (the file read into
    memory and the training cells copied, as ``predict --backed`` did before); seconds and peak RSS."""
    import perturbkit as pk
    from perturbkit import ondisk, split

    spec = pk.data.PerturbSpec()
    with ondisk.OnDisk(path) as od:
        data = od if where == "on disk" else od.to_memory()
        task = split.holdout_context(data, spec, holdout)
        train = od[task.train] if where == "on disk" else data[task.train].copy()
        t = time.perf_counter()
        pk.models.get(model).fit(train, spec, seed=0)
        seconds = time.perf_counter() - t
    return {"model": model, "where": where, "cells": int(len(task.train)), "genes": int(od.n_vars),
            "seconds": seconds, "peak_rss_mb": peak_mb()}


def child(argv: list[str]) -> dict:
    """Run ``perturbkit`` with ``argv`` in this process; its exit status, wall time and own peak RSS."""
    from perturbkit.cli import main

    t = time.perf_counter()
    status = main(argv)
    return {"status": status, "seconds": time.perf_counter() - t, "peak_rss_mb": peak_mb()}


def run_child(args: list[str], src: str | None = None) -> dict:
    """The JSON result of this script run with ``args`` in a child process (with ``src`` first on its
    PYTHONPATH: another checkout's ``src``)."""
    env = {**os.environ, "PYTHONPATH": src} if src else None
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measured(children: list[tuple], src: str | None = None) -> list[dict]:
    """Run each child (its arguments, what to add to its result, and optionally a ``src`` for
    :func:`run_child`) one after the other; print and return their results."""
    rows = []
    for argv, extra, *where in children:
        rows.append({**run_child(argv, *where), **extra})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reads", help="a CSR .h5ad: time one epoch's reads by shuffling scheme")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=4096, help="rows per block of the random-chunks scheme")
    ap.add_argument("--predict", help="an .h5ad: peak RSS of perturbkit predict --backed on it")
    ap.add_argument("--fit", help="a preprocessed .h5ad: peak RSS of fitting --fit-models on its training cells, "
                    "from disk and in memory")
    ap.add_argument("--fit-models", default="mean_shift")
    ap.add_argument("--compare-src", help="another checkout's src folder: its in-memory fit too")
    ap.add_argument("--models", default="scgen,scpram")
    ap.add_argument("--holdout", default="CD4 T cells")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--in-memory", action="store_true", help="also run predict without --backed")
    ap.add_argument("--out-dir", default="/tmp/pk-stream")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child-epoch", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--child-cli", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ap.add_argument("--child-fit", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_fit:
        print(json.dumps(fit(args.fit, args.child_fit[0], args.child_fit[1], args.holdout)))
        return
    if args.child_epoch:
        print(json.dumps(epoch(args.child_epoch[0], args.child_epoch[1], args.batch, args.chunk, args.seed)))
        return
    if args.child_cli is not None:
        print(json.dumps(child(args.child_cli)))
        return
    sections = {}
    stamp = (f"on {platform.node()} ({os.cpu_count()} CPUs shared with other work, Python "
             f"{platform.python_version()}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    command = " ".join(["python", "benchmarks/bench_stream.py", *sys.argv[1:]])
    if args.reads:
        rows = measured([(["--batch", str(args.batch), "--chunk", str(args.chunk), "--seed", str(args.seed),
                           "--child-epoch", args.reads, scheme], {}) for scheme in SCHEMES])
        lines = ["## One training epoch's reads by shuffling scheme", "",
                 f"`{command}` {stamp}; {rows[0]['cells']} cells x {rows[0]['genes']} genes, batches of "
                 f"{args.batch}, random chunks of {args.chunk} rows. Seconds to read (not train on) every batch "
                 "of one epoch; MB = 2^20 bytes.", "",
                 "| scheme | seconds per epoch | ms per batch | peak RSS MB |", "|---|---:|---:|---:|"]
        n_batches = -(-rows[0]["cells"] // args.batch)
        lines += [f"| {r['scheme']} | {r['seconds']:.1f} | {1000 * r['seconds'] / n_batches:.2f} | "
                  f"{r['peak_rss_mb']:.0f} |" for r in rows]
        sections[f"reads {Path(args.reads).name}"] = lines
    if args.predict:
        runs = [(model, backed) for model in args.models.split(",")
                for backed in ((True, False) if args.in_memory else (True,))]
        rows = measured([(["--child-cli", "predict", "--data", args.predict, "--model", model, "--holdout",
                           args.holdout, "--epochs", str(args.epochs), "--out",
                           str(Path(args.out_dir) / f"{model}{'-backed' if backed else ''}"), "--force",
                           "--no-progress", *(["--backed"] if backed else [])], {"model": model, "backed": backed})
                         for model, backed in runs])
        lines = ["## Peak memory of `perturbkit predict`", "",
                 f"`{command}` {stamp}: `perturbkit predict --data {args.predict} --holdout '{args.holdout}' "
                 f"--epochs {args.epochs} --model MODEL [--backed]` in a child process; its own peak RSS "
                 "(VmHWM). MB = 2^20 bytes.", "",
                 "| model | input | exit status | peak RSS MB | seconds |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['model']} | {'on disk (--backed)' if r['backed'] else 'in memory'} | {r['status']} | "
                  f"{r['peak_rss_mb']:.0f} | {r['seconds']:.0f} |" for r in rows]
        sections[f"predict {Path(args.predict).name}"] = lines
    if args.fit:
        runs = [(model, where, None) for model in args.fit_models.split(",") for where in ("in memory", "on disk")]
        if args.compare_src:  # the in-memory fit of another checkout (e.g. the commit before streamed training)
            runs += [(model, "in memory", args.compare_src) for model in args.fit_models.split(",")]
        rows = measured([(["--fit", args.fit, "--holdout", args.holdout, "--child-fit", model, where],
                          {"src": src or "this checkout"}, src) for model, where, src in runs])
        lines = ["## Peak memory of a fit on the training cells", "",
                 f"`{command}` {stamp}: in a child process, the preprocessed file opened "
                 "(`ondisk.OnDisk`), the split `--holdout` made, and the model fitted on its training cells: "
                 "`in memory` = the file read into memory and the training cells copied (what `predict --backed` "
                 "did before streamed training), `on disk` = the training cells as a view of the file; the "
                 "child's own peak RSS (VmHWM). MB = 2^20 bytes.", "",
                 "| model | code | training cells | genes | training cells are | peak RSS MB | seconds |",
                 "|---|---|---:|---:|---|---:|---:|"]
        lines += [f"| {r['model']} | {r['src']} | {r['cells']} | {r['genes']} | {r['where']} | "
                  f"{r['peak_rss_mb']:.0f} | {r['seconds']:.0f} |" for r in rows]
        sections[f"fit {Path(args.fit).name}"] = lines
    text = RESULTS.read_text() if RESULTS.exists() else ""
    for kind, lines in sections.items():
        begin, end = markers(kind)
        section = "\n".join([begin, "", *lines, "", end])
        print(section)
        if begin in text and end in text:
            text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()

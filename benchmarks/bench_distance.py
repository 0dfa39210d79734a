"""Time perturbkit's tiled ``energy_distance`` against the all-pairs code it replaced and pertpy's ``Edistance``.

Data: ``X ~ N(0, 1)`` and ``Y ~ N(0.1, 1)``, ``cells x dims`` float64 each, from ``numpy.random.default_rng(seed)``.
Every measurement runs in a fresh child process (``sys.executable`` or ``--pertpy-python``), so that its peak
RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which only grows) is its own; the children regenerate the
same data from the seed, and only the distance call is timed.

* ``tiled``: :func:`perturbkit.metrics.energy_distance` (default tile, all CPUs) at every ``--cells``;
* ``all-pairs``: the numpy/scipy code as it was before the tiling (copied below), at ``--old-cells``;
* ``pertpy``: ``pertpy.tl.Distance("edistance")`` (pertpy 1.0.3's ``Edistance``: three full
  ``sklearn.metrics.pairwise_distances`` matrices) at ``--old-cells``, when pertpy imports in
  ``--pertpy-python`` (default: this interpreter); otherwise the row says why it was skipped.

Usage::

    .venv/bin/python benchmarks/bench_distance.py [--cells 20000,100000] [--old-cells 20000] [--dims 50]
        [--pertpy-python /tmp/pertpy-venv/bin/python] [--out benchmarks/results/distance_bench.md]

Prints a markdown table and writes it to ``--out``. Not a test: run on demand (the 100k run takes minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ the all-pairs code, as it was


def _old_pair_mean(A, B, fn, chunk: int = 1024) -> float:
    """Mean of ``fn(squared Euclidean distance)`` over all ``len(A) * len(B)`` pairs (self-pairs included)."""
    from scipy.spatial.distance import cdist

    total = 0.0
    for start in range(0, A.shape[0], chunk):
        total += float(fn(cdist(A[start : start + chunk], B, "sqeuclidean")).sum())
    return total / (A.shape[0] * B.shape[0])


def old_energy_distance(X, Y) -> float:
    import numpy as np

    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    return 2 * _old_pair_mean(X, Y, np.sqrt) - _old_pair_mean(X, X, np.sqrt) - _old_pair_mean(Y, Y, np.sqrt)


# --------------------------------------------------------------------------------------------- children


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(method: str, cells: int, dims: int, seed: int) -> dict:
    """One measurement in this process: ``{seconds, value, rss_before_mb, peak_rss_mb}`` or ``{skipped}``."""
    import numpy as np

    if method == "tiled":
        try:
            from perturbkit.metrics import energy_distance
        except ImportError:  # a checkout that is not installed
            sys.path.insert(0, str(ROOT / "src"))
            from perturbkit.metrics import energy_distance
        fn = energy_distance
        energy_distance(
            np.zeros((2, dims)), np.ones((2, dims))
        )  # imports (threadpoolctl, ...) out of the way
    elif method == "all-pairs":
        fn = old_energy_distance
        import scipy.spatial.distance  # noqa: F401
    elif method == "pertpy":
        try:
            import pertpy as pt
        except Exception as exc:  # noqa: BLE001 - any failure to import means: skipped, and why
            return {"skipped": f"pertpy does not import in {sys.executable}: {type(exc).__name__}: {exc}"}
        version = getattr(pt, "__version__", "?")
        distance = pt.tl.Distance(metric="edistance")

        def fn(X, Y):
            return float(distance(X, Y))

    else:
        raise SystemExit(f"unknown method {method!r}")
    rng = np.random.default_rng(seed)
    X = rng.normal(0.0, 1.0, size=(cells, dims))
    Y = rng.normal(0.1, 1.0, size=(cells, dims))
    before = _rss_mb()
    start = time.perf_counter()
    value = fn(X, Y)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "value": float(value), "rss_before_mb": before, "peak_rss_mb": _rss_mb()}
    if method == "pertpy":
        out["version"] = version
    return out


def run_child(python: str, method: str, cells: int, dims: int, seed: int, timeout: float) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--child", method, "--cells", str(cells), "--dims", str(dims),
           "--seed", str(seed)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except FileNotFoundError as exc:
        return {"skipped": f"cannot run {python}: {exc}"}
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not finish within {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"skipped": f"failed (exit {proc.returncode}): {tail[0][:300]}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------- report


def machine() -> str:
    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    try:
        import threadpoolctl

        blas = ", ".join(
            f"{i['internal_api']} {i.get('version') or ''} ({i['num_threads']} threads)".replace("  ", " ")
            for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"
        )  # fmt: skip
    except ImportError:
        blas = "?"
    mem = ""
    try:
        kib = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
                  .split()[1])  # fmt: skip
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return (f"{platform.machine()}, {cpu}, {cpus} CPUs{mem}; Python {platform.python_version()}, numpy "
            f"{np.__version__}, BLAS: {blas or '?'}")  # fmt: skip


def fmt_row(method: str, cells: int, r: dict, ref: float | None) -> str:
    if "skipped" in r:
        return f"| {method} | {cells:,} | skipped | | | | {r['skipped']} |"
    rel = "" if ref is None else f"{abs(r['value'] - ref) / abs(ref):.1e}"
    name = f"{method} {r['version']}" if "version" in r else method
    added = r["peak_rss_mb"] - r["rss_before_mb"]
    return (f"| {name} | {cells:,} | {r['seconds']:.1f} | {r['peak_rss_mb']:,.0f} | {added:,.0f} | "
            f"{r['value']:.12g} | {rel} |")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cells", default="20000,100000", help="cells per set for the tiled code (comma list)"
    )
    parser.add_argument("--old-cells", type=int, default=20000, help="cells per set for all-pairs and pertpy")
    parser.add_argument("--dims", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pertpy-python", default=sys.executable, help="interpreter in which pertpy imports")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distance_bench.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child, int(args.cells), args.dims, args.seed)))
        return 0

    load_start = os.getloadavg()
    cells = [int(c) for c in args.cells.split(",") if c]
    runs = []  # (method, cells, result)
    for n in cells:
        runs.append(("tiled", n, run_child(sys.executable, "tiled", n, args.dims, args.seed, args.timeout)))
        print(runs[-1], flush=True)
    old = args.old_cells
    for method, python in (("all-pairs", sys.executable), ("pertpy", args.pertpy_python)):
        runs.append((method, old, run_child(python, method, old, args.dims, args.seed, args.timeout)))
        print(runs[-1], flush=True)
    load_end = os.getloadavg()

    tiled = {n: r for m, n, r in runs if m == "tiled" and "skipped" not in r}
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT), "benchmarks/bench_distance.py",
                                                *(sys.argv[1:] if argv is None else argv)])  # fmt: skip
    lines = [
        "# energy_distance: tiled float64 sums vs the all-pairs code and pertpy",
        "",
        f"Command: `{command}`",
        "",
        (
            f"Machine: {machine()}. Load average (1, 5, 15 min) {'/'.join(f'{x:.1f}' for x in load_start)} at "
            f"the start, {'/'.join(f'{x:.1f}' for x in load_end)} at the end (above the CPU count: other "
            "processes shared the CPUs during the run)."
        ),
        "",
        (
            f"Data: X ~ N(0, 1), Y ~ N(0.1, 1), cells x {args.dims} float64 each, "
            f"`numpy.random.default_rng({args.seed})`. One run per row, each in a fresh process; seconds = the "
            "distance call only; peak RSS = the process's `ru_maxrss` after the call; added = peak RSS minus "
            "`ru_maxrss` just before the call (interpreter, imports and the data); rel. diff = |value - tiled "
            "value| / tiled value at the same size."
        ),
        "",
        "| method | cells per set | seconds | peak RSS MB | added by the call MB | value | rel. diff vs tiled |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, n, r in runs:
        ref = tiled[n]["value"] if method != "tiled" and n in tiled else None
        lines.append(fmt_row(method, n, r, ref))
    lines.append("")
    for method, n, r in runs:
        if method != "tiled" and "skipped" not in r and n in tiled:
            added = (
                r["peak_rss_mb"] - r["rss_before_mb"],
                tiled[n]["peak_rss_mb"] - tiled[n]["rss_before_mb"],
            )
            lines.append(f"- {n:,} cells: {method} takes {r['seconds'] / tiled[n]['seconds']:.1f}x the time of "
                         f"tiled; its call adds {added[0]:,.0f} MB to the peak RSS, tiled's {added[1]:,.0f} MB.")  # fmt: skip
    for n in cells:
        if n != old:
            lines.append(f"- not run at {n:,} cells: pertpy (three dense {n:,} x {n:,} float64 matrices, "
                         f"{3 * n * n * 8 / 1e9:,.0f} GB) and the all-pairs code (about "
                         f"{(n / old) ** 2:.0f}x its {old:,}-cell time).")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory and time of out-of-core preprocessing (:func:`perturbkit.ondisk.preprocess_to_disk`) by file size.

Data: synthetic raw counts, ``cells x genes``, written chunk by chunk with
:func:`perturbkit.ondisk.write_h5ad_chunks` (never dense, never whole in memory): per gene a mean drawn from
``Gamma(0.3, 0.5)``, per cell a size factor from ``Gamma(4, 0.25)``, counts ``Poisson(mean x size)``, so X is CSR
with most entries zero; obs holds ``condition`` and ``cell_type``; seeded by ``--seed`` and the chunk's index.

Every measurement runs in a fresh child process so that its peak RSS (``resource.getrusage(RUSAGE_SELF)
.ru_maxrss``, which only grows) is its own:

* ``rss``: the RSS after the imports and after opening the file, the peak RSS and the wall time of
  ``preprocess_to_disk`` (default chunk size: :data:`perturbkit.ondisk.CHUNK_BYTES` of dense float32 rows);
* ``tracemalloc``: the peak of Python and numpy allocations during the same call (tracemalloc on; slower, so its
  time is not reported);
* ``in-memory`` (only at ``--in-memory-cells``): ``anndata.read_h5ad`` + :func:`perturbkit.data.preprocess`, for
  comparison;
* ``reads``: what a mini-batch costs to read from the file (``DiskMatrix``): the median over ``READS`` reads of
  ``BATCH`` random rows (``take``: read in sorted order) and of ``BATCH`` consecutive rows (``rows``), seeded.

Usage::

    .venv/bin/python benchmarks/bench_ondisk.py [--cells 50000,200000] [--genes 2000] [--in-memory-cells 50000]
        [--n-top-genes 1000] [--dir /tmp/pk-ondisk] [--out benchmarks/results/ondisk.md]

Prints a markdown table and writes it to ``--out``. Not a test: run on demand (minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 10_000
BATCH, READS = 512, 20


def make(path: Path, n_cells: int, n_genes: int, seed: int) -> None:
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from perturbkit.ondisk import write_h5ad_chunks

    gene_mean = np.random.default_rng(seed).gamma(0.3, 0.5, size=n_genes)

    def blocks():
        for i, start in enumerate(range(0, n_cells, CHUNK)):
            rng = np.random.default_rng([seed, i])
            n = min(CHUNK, n_cells - start)
            size = rng.gamma(4.0, 0.25, size=(n, 1))
            yield sp.csr_matrix(rng.poisson(gene_mean[None, :] * size).astype(np.float32))

    rng = np.random.default_rng(seed)
    obs = pd.DataFrame({"condition": pd.Categorical(rng.choice(["control", "stimulated"], n_cells)),
                        "cell_type": pd.Categorical(rng.choice([f"t{k}" for k in range(8)], n_cells))},
                       index=pd.RangeIndex(n_cells).astype(str))
    write_h5ad_chunks(path, obs, pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]), blocks())


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, path: str, out: str, n_top: str) -> dict:
    import tracemalloc

    import perturbkit as pk
    from perturbkit import ondisk

    after_import = rss_mb()
    res: dict = {"mode": mode, "rss_after_import_mb": after_import}
    t = time.perf_counter()
    if mode == "reads":
        import numpy as np

        with ondisk.OnDisk(path) as src:
            rng = np.random.default_rng(0)
            random, ranges = [], []
            for _ in range(READS):
                idx = rng.choice(src.n_obs, BATCH, replace=False)
                t0 = time.perf_counter()
                src.X.take(idx)
                random.append(time.perf_counter() - t0)
                start = int(rng.integers(0, src.n_obs - BATCH))
                t0 = time.perf_counter()
                src.X.rows(start, start + BATCH)
                ranges.append(time.perf_counter() - t0)
        res["random_ms"], res["range_ms"] = 1000 * np.median(random), 1000 * np.median(ranges)
    elif mode == "in-memory":
        import anndata as ad

        pk.data.preprocess(ad.read_h5ad(path), pk.spec.Preprocessing(n_top_genes=int(n_top)), log=lambda m: None)
    else:
        src = ondisk.OnDisk(path)
        res["rss_after_open_mb"] = rss_mb()
        res["chunk_rows"] = src.X.chunk_size
        if mode == "tracemalloc":
            tracemalloc.start()
        od, info = ondisk.preprocess_to_disk(src, pk.spec.Preprocessing(n_top_genes=int(n_top)), out,
                                             log=lambda m: None)
        if mode == "tracemalloc":
            res["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        res["out_mb"] = os.path.getsize(out) / 2**20
        od.close()
        src.close()
        os.unlink(out)
    res["seconds"] = time.perf_counter() - t
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", default="50000,200000")
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--n-top-genes", type=int, default=1000, help="highly variable genes kept (default 1000)")
    ap.add_argument("--in-memory-cells", default="50000", help="sizes also run in memory ('' for none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default="/tmp/pk-ondisk")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/ondisk.md"))
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    in_memory = {int(c) for c in args.in_memory_cells.split(",") if c}
    rows = []
    for n in [int(c) for c in args.cells.split(",")]:
        path = folder / f"counts_{n}x{args.genes}.h5ad"
        if not path.exists():
            t = time.perf_counter()
            make(path, n, args.genes, args.seed)
            print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - t:.0f} s",
                  flush=True)
        for mode in ("rss", "tracemalloc", *(("in-memory",) if n in in_memory else ()), "reads"):
            cmd = [sys.executable, __file__, "--child", mode, str(path), str(folder / f"pp_{n}.h5ad"),
                   str(args.n_top_genes)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            res.update(cells=n, file_mb=path.stat().st_size / 2**20)
            print(json.dumps(res), flush=True)
            rows.append(res)
    fmt = (lambda v: "" if v is None else f"{v:.0f}" if isinstance(v, float) else str(v))
    lines = [
        "# Out-of-core preprocessing: peak memory by file size",
        "",
        f"`{' '.join(['python', 'benchmarks/bench_ondisk.py', *sys.argv[1:]])}` on {platform.node()} "
        f"({os.cpu_count()} CPUs, Python {platform.python_version()}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{args.genes} genes of synthetic counts (see the script's docstring), normalize_total + log1p and "
        f"{args.n_top_genes} highly variable genes (seurat). MB = 2^20 bytes.",
        "",
        "| cells | file MB | mode | chunk rows | RSS after imports | RSS after open | peak RSS | tracemalloc peak "
        "| output MB | seconds |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["mode"] == "reads":
            continue
        lines.append(f"| {r['cells']} | {fmt(r['file_mb'])} | {r['mode']} | {fmt(r.get('chunk_rows'))} | "
                     f"{fmt(r['rss_after_import_mb'])} | {fmt(r.get('rss_after_open_mb'))} | {fmt(r['peak_rss_mb'])} | "
                     f"{fmt(r.get('tracemalloc_peak_mb'))} | {fmt(r.get('out_mb'))} | "
                     f"{'' if r['mode'] == 'tracemalloc' else format(r['seconds'], '.1f')} |")
    lines += ["", f"Reading a mini-batch of {BATCH} cells from the file (median of {READS} reads, ms; peak RSS of "
              "the reading process):", "", "| cells | random rows (`take`, read sorted) | consecutive rows (`rows`) "
              "| peak RSS |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['cells']} | {r['random_ms']:.0f} | {r['range_ms']:.0f} | {fmt(r['peak_rss_mb'])} |"
              for r in rows if r["mode"] == "reads"]
    text = "\n".join(lines) + "\n"
    print(text)
    old = Path(args.out).read_text() if Path(args.out).exists() else ""
    keep = "<!-- bench_stream"  # the section benchmarks/bench_stream.py writes into the same file stays
    Path(args.out).write_text(text + ("\n" + old[old.index(keep):] if keep in old else ""))


if __name__ == "__main__":
    main()

"""The two deliberate departures of perturbkit's scGen from the reference, measured on the demo's task.

scGen's docstring (``perturbkit/models/scgen.py``) quotes what each choice does on Kang 2018 with the CD4 T
cells held out, 10 epochs, seed 0 (the ``perturbkit demo`` task): the latent delta over the cell types seen in
both conditions (``delta_contexts="paired"``, the default) against the reference's (``"all"``), and the
published output ReLU (``output_activation="relu"``, the default) against the scvi-tools port's linear output
(``None``). This script runs ``perturbkit predict`` once per setting and writes the scores::

    .venv/bin/python benchmarks/scgen_choices.py [--threads 2] [--out benchmarks/results/scgen_choices.md]

Each run takes about as long as ``perturbkit demo`` (a minute of training at 2 threads on an idle 2-core
machine). The scores are byte-identical only at the same thread count; the table names it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

METRICS = ("r2_mean_all", "r2_mean_top100", "pearson_delta")
SETTINGS = {
    "default (delta_contexts=paired, output_activation=relu)": [],
    "delta_contexts=all (the reference's delta)": ["--param", "delta_contexts=all"],
    "output_activation=None (linear output, as the scvi-tools port)": ["--param", "output_activation=null"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "scgen_choices.md"))
    args = p.parse_args(argv)
    import pandas as pd

    base = ["perturbkit", "predict", "--model", "scgen", "--holdout", "CD4 T cells", "--epochs", "10", "--seed", "0",
            "--threads", str(args.threads), "--n-boot", "0", "--metrics", ",".join(METRICS), "--no-progress"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(SETTINGS.items()):
            cmd = [*base, *extra, "--out", f"{tmp}/run{i}"]
            subprocess.run([sys.executable, "-m", "perturbkit", *cmd[1:]], check=True, stdout=subprocess.DEVNULL)
            scores = pd.read_csv(f"{tmp}/run{i}/scores.csv")
            scores = scores[(scores.model == "scgen") & scores.metric.isin(METRICS)].set_index("metric").value
            rows.append((name, shlex.join(cmd).replace(f"{tmp}/run{i}", "DIR"), scores))
    import torch

    lines = [f"# scGen's deliberate departures, measured (Kang 2018, CD4 T held out, 10 epochs, seed 0, "
             f"{args.threads} torch thread{'s' if args.threads != 1 else ''}, torch {torch.__version__})", "",
             "Written by `.venv/bin/python benchmarks/scgen_choices.py"
             + (f" --threads {args.threads}" if args.threads != 2 else "") + "`; quoted in the docstring of "
             "`src/perturbkit/models/scgen.py`.", "",
             "| setting | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    lines += [f"| {name} | " + " | ".join(f"{s[m]:.3f}" for m in METRICS) + " |" for name, _, s in rows]
    lines += ["", "Commands:", ""] + [f"- `{cmd}`" for _, cmd, _ in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

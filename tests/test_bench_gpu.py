"""benchmarks/bench_gpu.py --device cpu --quick runs here and writes every section of its table, with the CPU's
numbers and the GPU's rows marked as not measured (the GPU run itself happens on the lent GPU machine)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("torch")


def test_bench_gpu_quick_on_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--quick", "--threads", "1",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "python benchmarks/bench_gpu.py --device cpu --quick" in text  # the exact command
    assert re.search(r"torch \d+\.\d+", text) and "Date: " in text
    for heading in ("## a. Seconds per training epoch", "## b. Kang CD4 T scores", "## c. Leave-one-cell-type-out",
                    "## d. Energy distance"):
        assert heading in text, heading
    assert "failed:" not in text, text
    assert text.count("not measured on a GPU") >= 4  # a (per model), b, c, d

    def rows(heading):
        block = text.split(heading, 1)[1].split("\n## ", 1)[0]
        return [line.split("|")[1:-1] for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]

    def number(cell):
        return float(cell.strip().replace(",", ""))

    a = [r for r in rows("## a.") if r[2].strip() == "CPU"]
    assert {r[0].strip() for r in a} == {"scgen", "scpram", "cellot"}
    assert all(number(r[5]) > 0 for r in a)  # s/epoch
    b = [r for r in rows("## b.") if r[1].strip() == "r2_mean_all"]
    assert len(b) == 3 and all(-1 <= number(r[2]) <= 1 for r in b)
    c = rows("## c.")
    assert number(c[-1][3]) > 0  # the sweep's total seconds
    d = [r for r in rows("## d.") if r[0].strip() == "CPU"]
    assert number(d[0][2]) > 0 and 0 < number(d[0][3]) < 1

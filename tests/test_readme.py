"""The README's demo block is what ``perturbkit demo`` prints.

The block in README.md starts with the command that made it, ``$ perturbkit demo --threads N``; the test runs
that command (in a temporary folder, so the outputs land in its ``runs/demo/``) and compares every printed line
with the block. Only the seconds of the ``fit ... s, predict ... s`` timing lines may differ; the scores, the
warning, the verdicts and every other line must be the same. The scores are byte-identical only at the same
thread count (and library versions and CPU), hence the ``--threads`` in the block.

After a change that moves the demo's output, regenerate the block from a real run with::

    .venv/bin/python tests/test_readme.py --update

which runs the demo at the thread count the block states and writes its output, timings included, into
README.md.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the fenced block that opens with the demo command
BLOCK = re.compile(r"```\n(\$ perturbkit demo --threads (\d+)\n)(.*?)```\n", re.S)
#: the seconds of a timing line, the one thing that changes from run to run
TIMING = re.compile(r"^(\S+: fit )[0-9.]+( s, predict )[0-9.]+( s)$")
UPDATE = ".venv/bin/python tests/test_readme.py --update"


def readme_block(text: str | None = None) -> tuple[int, list[str]]:
    """(thread count, printed lines) of the README's demo block."""
    text = README.read_text() if text is None else text
    found = BLOCK.findall(text)
    assert len(found) == 1, f"README.md needs exactly one block opening with '$ perturbkit demo --threads N', " \
                            f"found {len(found)}"
    _, threads, body = found[0]
    return int(threads), body.splitlines()


def run_demo(threads: int, cwd: Path) -> tuple[list[str], dict]:
    """Run ``perturbkit demo --threads N`` in ``cwd``: (its stdout lines, its record.json)."""
    cmd = [sys.executable, "-m", "perturbkit", "demo", "--threads", str(threads), "--no-progress"]
    # the block was made on the CPU ("on cpu" in its task line): hide a GPU, which --device auto would take.
    # Passive OpenMP threads sleep instead of spinning while they wait: on a machine busy with other work the
    # spinning threads of a 2-thread run took the demo past 30 minutes; the work each thread does, and so the
    # bytes, depend on the thread count, not on how the threads wait.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=3600, env=env)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    record = json.loads((cwd / "runs" / "demo" / "record.json").read_text())
    return done.stdout.splitlines(), record


def masked(lines: list[str]) -> list[str]:
    return [TIMING.sub(r"\g<1>N\g<2>N\g<3>", line) for line in lines]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    threads, _ = readme_block()
    cwd = tmp_path_factory.mktemp("demo")
    lines, record = run_demo(threads, cwd)
    return threads, lines, record


def test_readme_demo_block_is_what_the_demo_prints(demo):
    threads, printed, _ = demo
    _, shown = readme_block()
    assert any(TIMING.match(line) for line in shown), "the block lost its timing lines (the mask would hide nothing)"
    diff = list(difflib.unified_diff(masked(shown), masked(printed), "README.md", "perturbkit demo", lineterm=""))
    assert not diff, (f"README.md's demo block differs from `perturbkit demo --threads {threads}` (timings "
                      f"masked); if the change is meant, regenerate it: {UPDATE}\n" + "\n".join(diff))


def test_demo_prints_and_records_its_thread_count(demo):
    threads, printed, record = demo
    assert record["determinism"]["torch_threads"] == threads
    assert record["config"]["threads"] == threads
    assert f"torch threads: {threads} (--threads; record.json determinism.torch_threads)" in printed


def test_make_demo_runs_the_block_command():
    """``make demo`` (the README's quick start) prints the block's scores: it runs the same thread count."""
    threads, _ = readme_block()
    recipe = re.search(r"^demo:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"perturbkit demo --threads {threads}" in recipe, recipe


def test_timing_mask_hides_only_the_seconds():
    assert masked(["scgen: fit 55.0 s, predict 0.17 s"]) == ["scgen: fit N s, predict N s"]
    assert masked(["scgen: fit 55.0 s, predict 0.17 s, extra"]) == ["scgen: fit 55.0 s, predict 0.17 s, extra"]
    assert masked(["scgen            0.907  0.921"]) == ["scgen            0.907  0.921"]


def update() -> None:
    """Rewrite the README's demo block from a real run at the thread count it states."""
    threads, _ = readme_block()
    with tempfile.TemporaryDirectory() as tmp:
        lines, _ = run_demo(threads, Path(tmp))
    text = README.read_text()  # read again: the README may have been edited while the demo ran
    match = BLOCK.search(text)
    new = text[: match.start()] + "```\n" + match.group(1) + "\n".join(lines) + "\n```\n" + text[match.end():]
    README.write_text(new)
    print("\n".join(lines))
    print(f"README.md: demo block rewritten ({threads} threads)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(f"usage: {UPDATE}")
    update()

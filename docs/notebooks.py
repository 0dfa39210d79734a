"""Execute the tutorials (``tutorials/*.py``, jupytext percent scripts) into the documentation's notebooks.

Each script is read with jupytext, run top to bottom in a fresh ``python3`` kernel by nbclient (an error in
any cell stops it and raises), and written with its outputs, figures included, as
``docs/tutorials/NAME.ipynb``: the input of the Sphinx build, which renders them without executing them again.
That folder is generated and ignored by git; the scripts are the only committed form of the tutorials.

``make test`` executes them (tests/test_tutorials.py) and the documentation built by tests/test_docs.py reuses
those copies; ``make docs`` executes only those whose copy is missing or older than its script or the package.

    python docs/notebooks.py                   # every tutorial
    python docs/notebooks.py --stale           # only those out of date
    python docs/notebooks.py 01_scgen          # one
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
OUT = ROOT / "docs" / "tutorials"
#: each notebook must finish within this many seconds on the project's 2-core machine
BUDGET_S = 300
#: nbclient's limit for one cell
CELL_TIMEOUT_S = 600
#: the line every tutorial's last cell prints
RUNTIME = re.compile(r"^runtime: (\d+) s", re.MULTILINE)


def names() -> list[str]:
    """The tutorials, in order: ``01_scgen``, ``02_scpram``, ..."""
    return sorted(p.stem for p in TUTORIALS.glob("[0-9][0-9]_*.py"))


def stale(name: str, out_dir: Path = OUT) -> bool:
    """Whether ``out_dir/NAME.ipynb`` is missing or older than its script or a source file of the package."""
    target = out_dir / f"{name}.ipynb"
    if not target.exists():
        return True
    sources = [TUTORIALS / f"{name}.py", *(ROOT / "src" / "perturbkit").rglob("*.py")]
    return target.stat().st_mtime < max(p.stat().st_mtime for p in sources)


def execute(name: str, out_dir: Path = OUT, *, cwd: Path | None = None, timeout: int = CELL_TIMEOUT_S):
    """Run ``tutorials/NAME.py`` and write ``out_dir/NAME.ipynb``; return (notebook, wall seconds).

    ``cwd``: the kernel's working directory (what the notebook writes, e.g. tutorial 3's run directory, goes
    there); default: a new temporary folder. Raises ``nbclient.exceptions.CellExecutionError`` naming the cell
    and the error when a cell fails; the partly executed notebook is still written, for inspection.
    """
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(TUTORIALS / f"{name}.py")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"perturbkit-{name}-") as tmp:
        work = Path(cwd) if cwd is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(work)}})
        t = time.perf_counter()
        try:
            client.execute()
        finally:
            seconds = time.perf_counter() - t
            nbformat.write(nb, out_dir / f"{name}.ipynb")
    return nb, seconds


def printed_runtime(nb) -> int | None:
    """The seconds of the notebook's ``runtime: N s`` line (its last cell), or None."""
    for cell in reversed(nb.cells):
        for output in cell.get("outputs", []):
            m = RUNTIME.search(output.get("text", "") if output.get("output_type") == "stream" else "")
            if m:
                return int(m.group(1))
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"tutorials to run (default: all of {', '.join(names())})")
    ap.add_argument("--stale", action="store_true", help="only those whose executed copy is out of date")
    args = ap.parse_args(argv)
    todo = args.names or names()
    unknown = sorted(set(todo) - set(names()))
    if unknown:
        print(f"error: unknown tutorial {unknown[0]!r}; tutorials: {', '.join(names())}.", file=sys.stderr)
        return 2
    for name in todo:
        if args.stale and not stale(name):
            print(f"{name}: up to date ({OUT / name}.ipynb)")
            continue
        nb, seconds = execute(name)
        print(f"{name}: executed in {seconds:.0f} s (the notebook says: runtime {printed_runtime(nb)} s) "
              f"-> {OUT / name}.ipynb")
    return 0


if __name__ == "__main__":
    sys.exit(main())

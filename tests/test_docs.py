"""The documentation: the settings tables of docs/bench.md and docs/tune.md agree with the config dataclasses
that read the settings, and the Sphinx site builds without a warning, its tutorial pages showing their figures
in headless Chromium.

The site is built from the executed tutorials of tests/test_tutorials.py (one execution per session), into
docs/_build/html, as ``make docs`` does.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from conftest import skip_without

from perturbkit import config as C

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BUILD = DOCS / "_build" / "html"

# ------------------------------------------------------------------------------------- measured answers


def answer_tables(text: str) -> list[str]:
    """The markdown tables of a bench_tables.py results file's "## The answer" section."""
    section = text.split("\n## The answer\n", 1)[1].split("\n## ", 1)[0]
    return [block for block in section.split("\n\n") if block.startswith("| scenario | metric |")]


def test_bench_md_answers_are_the_results_files():
    """Each answer table of a benchmark results file made by benchmarks/bench_tables.py stands in docs/bench.md
    as that file has it (rewrite the docs after regenerating a results file)."""
    bench_md = (DOCS / "bench.md").read_text()
    files = [p for p in sorted((ROOT / "benchmarks" / "results").glob("*_bench.md"))
             if "benchmarks/bench_tables.py" in p.read_text()]
    assert any(p.name == "kang_bench.md" for p in files)
    for path in files:
        tables = answer_tables(path.read_text())
        assert tables, path
        for table in tables:
            assert table in bench_md, f"{path.name}: an answer table differs in docs/bench.md:\n{table}"


# ------------------------------------------------------------------------------------- settings tables


def markdown_tables(text: str, section: str | None = None) -> list[tuple[str, list[list[str]]]]:
    """(heading, rows) of every pipe table of ``text`` (of the ``## section`` only, when given); ``heading``
    is the last paragraph starting with ``**`` before the table; rows exclude the header and the rule."""
    lines = text.splitlines()
    if section is not None:
        start = next(i for i, line in enumerate(lines) if line.strip() == f"## {section}")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[start:end]
    tables, block, heading = [], [], ""
    for line in [*lines, ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if block:
            tables.append((heading, block[2:]))
            block = []
        if line.startswith("**"):
            heading = line
    return tables


def names_in(cell: str) -> list[str]:
    """The setting names of a table cell: ``a.b`` makes ``a.`` the prefix of the bare names after it
    (```synthetic.n_contexts`, `n_cells``` -> ``synthetic.n_contexts``, ``synthetic.n_cells``)."""
    out, prefix = [], ""
    for name in re.findall(r"`([^`]+)`", cell):
        if "." in name:
            prefix = name.rsplit(".", 1)[0] + "."
            out.append(name)
        else:
            out.append(prefix + name)
    return out


def is_config(tp) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def setting_paths(cls, prefix: str = "") -> set[str]:
    """Every setting of a config dataclass's table as a dotted path; a field that is a dataclass of its own is
    a sub-table (``data.synthetic.seed``); ``FLATTEN`` fields contribute their settings to the table."""
    hints = typing.get_type_hints(cls)
    flat = getattr(cls, "FLATTEN", ())
    out = set()
    for f in dataclasses.fields(cls):
        if f.name in flat:
            out |= setting_paths(hints[f.name], prefix)
        elif is_config(hints[f.name]):
            out |= setting_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


def test_setting_paths_follow_the_loader():
    """The paths are those :func:`perturbkit.config.settings` names, table by table."""
    assert {p for p in setting_paths(C.DataConfig) if "." not in p} == {
        s for s in C.settings(C.DataConfig) if not is_config(typing.get_type_hints(C.DataConfig).get(s))}
    assert {f"synthetic.{s}" for s in C.settings(C.SyntheticConfig)} <= setting_paths(C.DataConfig)


def test_bench_md_settings_tables_match_the_config_dataclasses():
    from perturbkit.bench import BenchConfig
    from perturbkit.scenarios import SCENARIOS

    prefixes = {"Top level": "", "[data]": "data", "[preprocessing]": "preprocessing",
                "[scenarios.*]": "scenarios", "[models.LABEL]": ""}
    tables_of_bench = {f.name for f in dataclasses.fields(BenchConfig)}
    documented = set()
    for heading, rows in markdown_tables((DOCS / "bench.md").read_text(), "The config file"):
        key = re.match(r"\*\*`?(.+?)`?\*\*", heading).group(1)
        assert key in prefixes, f"docs/bench.md: a settings table under {heading!r} this test does not know"
        for row in rows:
            for name in names_in(row[0]):
                top = name.split(".")[0]
                full = name if top in tables_of_bench or not prefixes[key] else f"{prefixes[key]}.{name}"
                documented.add(full)
    hints = typing.get_type_hints(BenchConfig)
    expected = set()
    for f in dataclasses.fields(BenchConfig):
        if f.name == "models":  # free-form: each model's own parameters (perturbkit list models)
            continue
        if f.name == "scenarios":
            for name, scenario in SCENARIOS.items():
                expected |= setting_paths(scenario.Config, f"scenarios.{name}.")
        elif is_config(hints[f.name]):
            expected |= setting_paths(hints[f.name], f"{f.name}.")
        else:
            expected.add(f.name)
    assert not expected - documented, f"settings missing from docs/bench.md: {sorted(expected - documented)}"
    assert not documented - expected, f"docs/bench.md has unknown settings: {sorted(documented - expected)}"


def test_tune_md_settings_tables_match_the_config_dataclasses():
    from perturbkit.models import MODELS
    from perturbkit.spec import Preprocessing
    from perturbkit.tune import config as T

    tables = markdown_tables((DOCS / "tune.md").read_text(), "The config file")
    by_first = {rows[0][0]: rows for _, rows in tables if rows}

    # the top level and the shared tables: `description`, `seeds`, `[data]`, ... ; `[models.NAME]` is `model`
    top = [re.sub(r"^\[(\w+)(\.NAME)?\]$", r"\1", n)
           for row in by_first["`description`"] for n in names_in(row[0])]
    expected_top = {("models" if f.name == "model" else f.name)
                    for f in dataclasses.fields(T.TuneConfig)} - {"tune"}
    assert sorted(top) == sorted(expected_top)
    # the shared tables' rows name every setting of the table (but [data], documented in docs/bench.md)
    shared = {row[0].strip("`[]"): row for row in by_first["`description`"]}
    assert "docs/bench.md" in shared["data"][3]
    for table, cls in (("preprocessing", Preprocessing), ("training", C.TrainingConfig),
                       ("evaluation", C.EvaluationConfig)):
        listed = set(re.findall(r"`(\w+)[^`]*`", shared[table][2] + shared[table][3]))
        assert set(C.settings(cls)) <= listed, (table, set(C.settings(cls)) - listed)

    # [tune]: holdout, metric, trials, seed and its sub-tables
    tune = [re.sub(r"^\[tune\.(\w+)\]$", r"\1", n) for row in by_first["`holdout`"] for n in names_in(row[0])]
    assert sorted(tune) == sorted(C.settings(T.TuneSettings))

    # [tune.validation], [tune.sampler], [tune.pruner]: a "table | key" table
    rows = next(rows for _, rows in tables if rows and rows[0][0] == "`[tune.validation]`")
    documented: dict[str, set[str]] = {}
    table = ""
    for row in rows:
        table = row[0].strip("`[]") or table
        documented.setdefault(table, set()).update(names_in(row[1]))
    assert documented == {"tune.validation": set(C.settings(T.ValidationConfig)),
                          "tune.sampler": set(C.settings(T.SamplerConfig)),
                          "tune.pruner": set(C.settings(T.PrunerConfig))}

    # [tune.space]: an entry's keys, and the default space of each model
    text = (DOCS / "tune.md").read_text()
    entry = re.search(r"An\s+entry\s+\(`Dim`\)\s+takes\s+([^:]+):", text).group(1)
    assert sorted(re.findall(r"`(\w+)`", entry)) == sorted(C.settings(T.Dim))
    space = next(rows for _, rows in tables if rows and rows[0][0] == "`n_layers`")
    tunable = [name for name, cls in MODELS.items() if cls.SEARCH_SPACE]
    header = next(line for line in text.splitlines() if line.startswith("| dimension |"))
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    assert columns == tunable
    dims = [row[0].strip("`") for row in space]
    assert sorted(dims) == sorted(set().union(*(MODELS[m].SEARCH_SPACE for m in tunable)))
    for row in space:
        for model, cell in zip(tunable, row[1:]):
            dim = MODELS[model].SEARCH_SPACE.get(row[0].strip("`"))
            if dim is None:
                assert cell == "-", (model, row)
            elif cell != "same":
                assert cell.startswith(dim.get("type", "")), (model, row, dim)


# ----------------------------------------------------------------------------------------------- site


@pytest.fixture(scope="module")
def site():
    """docs/_build/html built from scratch with warnings as errors, from the session's executed tutorials."""
    from test_tutorials import NAMES, executed

    for name in NAMES:
        _, _, error = executed(name)
        if error is not None:
            pytest.fail(f"tutorial {name} did not run, so the site cannot be built: {error}")
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-E", "-W", "--keep-going", "-q", str(DOCS),
           str(BUILD)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, f"sphinx-build failed:\n{done.stderr[-5000:]}"
    assert "WARNING" not in done.stderr, done.stderr[-5000:]
    return BUILD


def test_site_has_every_page(site):
    from test_tutorials import NAMES

    for page in ["index", "api/index", "api/models", *(f"tutorials/{n}" for n in NAMES),
                 *(p.stem for p in DOCS.glob("*.md") if p.stem != "index")]:
        assert (site / f"{page}.html").exists(), page
    api = (site / "api" / "models.html").read_text()
    for name in ("ScGen", "ScPRAM", "MeanShift", "attention"):
        assert name in api, name  # from the docstrings


def image_count(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("name", ["01_scgen", "02_scpram", "03_benchmarking"])
def test_tutorial_page_shows_its_figures_in_headless_chromium(site, name, tmp_path):
    from test_tutorials import executed

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        skip_without("Debian's chromium is not installed (apt-get install -y chromium); .ci/run installs it")
    copy = tmp_path / "html"
    shutil.copytree(site, copy)
    page = copy / "tutorials" / f"{name}.html"
    marker = ('<script>window.addEventListener("load", function () { var im = Array.from(document.images); '
              'var ok = im.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length; '
              'document.body.setAttribute("data-images", im.length + "/" + ok); });</script></body>')
    page.write_text(page.read_text().replace("</body>", marker))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
             "--window-size=1280,1600"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=180).stdout
    found = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert found, dom[-1000:]
    total, loaded = map(int, found.groups())
    expected = image_count(executed(name)[0])
    assert total >= expected > 0, (total, expected)
    assert loaded == total, f"{total - loaded} of {total} images did not load"

    shot = tmp_path / f"{name}.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=180)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1280) and pixels.std() > 0.01  # a rendered page, not a blank one
    shutil.copy(shot, BUILD.parent / f"screenshot-{name}.png")  # for a person to look at

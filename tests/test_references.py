"""perturbkit's metrics agree with the reference packages they claim to match (docs/metrics.md, "What was
checked against the references"): the committed scripts benchmarks/check_celleval.py and
benchmarks/check_scperturb.py, run on fewer cases than their defaults.

cell-eval and scPerturb come with the ``test`` extra; without them the tests skip with the reason (and fail
under CI, which installs them: PERTURBKIT_SYSTEM_TESTS=1).
"""

from __future__ import annotations

import os

from conftest import benchmark_script, need


def test_metrics_agree_with_cell_eval(capsys):
    need("cell_eval", "cell-eval")
    bars = lambda: {k: v for k, v in os.environ.items() if k.startswith("TQDM_")}  # noqa: E731
    before = bars()
    check = benchmark_script("check_celleval")
    table = check.compare(cases=40, seed=1)
    assert bars() == before  # it once left TQDM_DISABLE=1 behind: every later child drew no progress bar
    assert set(table.metric) == {"discrimination_score_l1", "discrimination_score_l2", "discrimination_score_cosine",
                                 "pearson_delta", "mse_mean", "mae_mean"}
    assert (table.n_values > 100).all()
    discrimination = table[table.metric.str.startswith("discrimination")]
    assert (discrimination.max_abs_diff == 0).all(), discrimination  # ranks: exactly equal
    assert table.max_abs_diff.max() < 1e-9, table
    # the random screens are not all trivially discriminated (a check that only ever sees 1.0 checks little)
    assert (discrimination.perturbkit_mean < 0.95).all(), discrimination
    assert check.main(["--cases", "3"]) == 0
    assert "max abs difference over all metrics" in capsys.readouterr().out


def test_celleval_check_catches_a_wrong_metric(monkeypatch):
    need("cell_eval", "cell-eval")
    check = benchmark_script("check_celleval")
    import perturbkit.metrics as metrics

    real = metrics.discrimination_score
    monkeypatch.setattr(metrics, "discrimination_score",
                        lambda *a, **kw: real(*a, **{**kw, "exclude_target_gene": False}))
    table = check.compare(cases=15, seed=1)
    assert table[table.metric == "discrimination_score_l1"].max_abs_diff.iloc[0] > 0


def test_effect_test_agrees_with_scperturb(capsys):
    need("scperturb", "scperturb")
    check = benchmark_script("check_scperturb")
    table = check.compare(seed=0)
    assert list(table.group) == ["strong", "weak", "none"]
    assert table.rel_diff.max() < 1e-9, table
    assert (table.p_diff <= table.p_allowed).all(), table
    strong = table.iloc[0]
    assert strong.p_perturbkit == strong.p_scperturb == 1 / check.RUNS
    assert table.iloc[2].p_perturbkit > 0.05
    assert check.main(["--null", "0"]) == 0
    assert "max relative difference of the statistics" in capsys.readouterr().out

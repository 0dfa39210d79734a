"""Honest reporting: each model against mean_shift by intervals, the best model per metric, and "no model beats
mean_shift" where that is the truth (perturbkit.report.versus_baseline / verdict_lines)."""

from __future__ import annotations

import math

import pandas as pd

from perturbkit.report import verdict_lines, versus_baseline


def rows(*entries):
    return pd.DataFrame([dict(zip(("model", "metric", "value", "ci_low", "ci_high", "higher_is_better"), e))
                         for e in entries])


def test_intervals_apart_overlapping_and_the_direction_of_the_metric():
    table = rows(("mean_shift", "pearson_delta", 0.80, 0.78, 0.82, True),
                 ("scgen", "pearson_delta", 0.85, 0.83, 0.87, True),  # above: better
                 ("scpram", "pearson_delta", 0.81, 0.79, 0.84, True),  # overlaps
                 ("control", "pearson_delta", 0.0, -0.1, 0.1, True),  # below: worse
                 ("ceiling", "pearson_delta", 0.95, 0.94, 0.96, True),  # not a contender
                 ("mean_shift", "edistance", 2.0, 1.8, 2.2, False),
                 ("scgen", "edistance", 3.0, 2.7, 3.3, False),  # above, but lower is better: worse
                 ("scpram", "edistance", 1.0, 0.8, 1.2, False),  # below: better
                 ("control", "edistance", 2.5, math.nan, math.nan, False))
    vs = versus_baseline(table).set_index(["model", "metric"]).verdict
    assert vs.to_dict() == {
        ("scgen", "pearson_delta"): "better", ("scpram", "pearson_delta"): "overlaps",
        ("control", "pearson_delta"): "worse", ("scgen", "edistance"): "worse",
        ("scpram", "edistance"): "better", ("control", "edistance"): "no interval"}
    lines = verdict_lines(table, ["pearson_delta", "edistance"])
    assert lines == ["pearson_delta (higher is better): best scgen (0.850); scgen beats mean_shift",
                     "edistance (lower is better): best scpram (1.000); scpram beats mean_shift"]


def test_no_model_beats_mean_shift_is_said():
    table = rows(("mean_shift", "pearson_delta", 0.83, 0.80, 0.86, True),
                 ("scgen", "pearson_delta", 0.84, 0.79, 0.89, True),  # higher, but the intervals overlap
                 ("scpram", "pearson_delta", 0.70, 0.65, 0.75, True))
    assert verdict_lines(table, ["pearson_delta"]) == [
        "pearson_delta (higher is better): best scgen (0.840); no model beats mean_shift"]


def test_without_intervals_nothing_is_claimed():
    table = rows(("mean_shift", "edistance", 2.0, math.nan, math.nan, False),
                 ("scgen", "edistance", 1.0, math.nan, math.nan, False))
    assert verdict_lines(table, ["edistance", "r2_mean_all"]) == [
        "edistance (lower is better): best scgen (1.000); no intervals to compare with mean_shift"]


def test_a_bench_summary_reads_its_mean_column():
    table = rows(("mean_shift", "pearson_delta", 0.80, 0.78, 0.82, True),
                 ("scgen", "pearson_delta", 0.85, 0.83, 0.87, True)).rename(columns={"value": "mean"})
    assert verdict_lines(table, ["pearson_delta"], value="mean") == [
        "pearson_delta (higher is better): best scgen (0.850); scgen beats mean_shift"]

"""Honest reporting: each model against the best baseline of each metric by intervals, the best model per
metric, "no model beats it" where that is the truth, and the ceiling note where the best baseline reaches the
split-half ceiling (perturbkit.report.versus_baseline / verdict_lines)."""

from __future__ import annotations

import math

import pandas as pd

from perturbkit.report import at_ceiling, best_baselines, verdict_lines, versus_baseline


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
    vs = versus_baseline(table, "mean_shift").set_index(["model", "metric"]).verdict
    assert vs.to_dict() == {
        ("scgen", "pearson_delta"): "better", ("scpram", "pearson_delta"): "overlaps",
        ("control", "pearson_delta"): "worse", ("scgen", "edistance"): "worse",
        ("scpram", "edistance"): "better", ("control", "edistance"): "no interval"}
    # the best baseline by default: control is a baseline, so only the two models are compared
    best = versus_baseline(table).set_index(["model", "metric"])
    assert set(best.index) == {("scgen", "pearson_delta"), ("scpram", "pearson_delta"), ("scgen", "edistance"),
                               ("scpram", "edistance")}
    assert set(best.baseline) == {"mean_shift"}
    lines = verdict_lines(table, ["pearson_delta", "edistance"])
    assert lines == [
        "pearson_delta (higher is better): best scgen (0.850); best baseline mean_shift (0.800): scgen (by 0.050) "
        "beats it",
        "edistance (lower is better): best scpram (1.000); best baseline mean_shift (2.000): scpram (by 1.000) "
        "beats it"]


def test_the_best_baseline_is_chosen_per_metric_and_named():
    table = rows(("mean_shift", "pearson_delta", 0.80, 0.78, 0.82, True),
                 ("linear", "pearson_delta", 0.88, 0.86, 0.90, True),
                 ("perturbed_mean", "pearson_delta", 0.55, 0.50, 0.60, True),
                 ("scgen", "pearson_delta", 0.85, 0.83, 0.87, True),  # beats mean_shift, not linear
                 ("mean_shift", "edistance", 0.5, 0.4, 0.6, False),
                 ("linear", "edistance", 0.7, 0.6, 0.8, False),
                 ("scgen", "edistance", 0.45, 0.44, 0.46, False))
    assert best_baselines(table) == {"pearson_delta": "linear", "edistance": "mean_shift"}
    assert verdict_lines(table, ["pearson_delta", "edistance"]) == [
        "pearson_delta (higher is better): best linear (0.880); best baseline linear (0.880): no model beats it",
        "edistance (lower is better): best scgen (0.450); best baseline mean_shift (0.500): no model beats it"]


def test_a_baseline_at_the_ceiling_is_said():
    table = rows(("mean_shift", "pearson_delta", 0.36, 0.30, 0.40, True),
                 ("scgen", "pearson_delta", 0.30, 0.25, 0.35, True),
                 ("ceiling", "pearson_delta", 0.364, 0.33, 0.39, True))
    assert at_ceiling(table, "mean_shift", "pearson_delta")
    assert not at_ceiling(table, "scgen", "edistance")
    # wholly beyond the ceiling on the better side reaches it too (a nearly unperturbed target); below it does not
    beyond = rows(("control", "r2_mean_all", 0.961, 0.960, 0.962, True),
                  ("control", "edistance", 0.384, 0.383, 0.386, False),
                  ("scgen", "edistance", 3.55, 3.27, 3.84, False),
                  ("ceiling", "r2_mean_all", 0.929, 0.922, 0.936, True),
                  ("ceiling", "edistance", 0.959, 0.894, 1.024, False))
    assert at_ceiling(beyond, "control", "r2_mean_all") and at_ceiling(beyond, "control", "edistance")
    assert not at_ceiling(beyond, "scgen", "edistance")
    assert verdict_lines(table, ["pearson_delta"]) == [
        "pearson_delta (higher is better): best mean_shift (0.360); best baseline mean_shift (0.360): no model "
        "beats it; mean_shift reaches the ceiling's interval: no model can be shown to beat it on this data"]


def test_no_model_beats_mean_shift_is_said():
    table = rows(("mean_shift", "pearson_delta", 0.83, 0.80, 0.86, True),
                 ("scgen", "pearson_delta", 0.84, 0.79, 0.89, True),  # higher, but the intervals overlap
                 ("scpram", "pearson_delta", 0.70, 0.65, 0.75, True))
    assert verdict_lines(table, ["pearson_delta"], baseline="mean_shift") == [
        "pearson_delta (higher is better): best scgen (0.840); mean_shift: no model beats it"]


def test_without_intervals_nothing_is_claimed():
    table = rows(("mean_shift", "edistance", 2.0, math.nan, math.nan, False),
                 ("scgen", "edistance", 1.0, math.nan, math.nan, False))
    assert verdict_lines(table, ["edistance", "r2_mean_all"]) == [
        "edistance (lower is better): best scgen (1.000); best baseline mean_shift (2.000): no intervals to "
        "compare with it"]


def test_only_baselines_and_a_bench_summary_reads_its_mean_column():
    table = rows(("mean_shift", "pearson_delta", 0.80, 0.78, 0.82, True),
                 ("scgen", "pearson_delta", 0.85, 0.83, 0.87, True)).rename(columns={"value": "mean"})
    assert verdict_lines(table, ["pearson_delta"], value="mean") == [
        "pearson_delta (higher is better): best scgen (0.850); best baseline mean_shift (0.800): scgen (by 0.050) "
        "beats it"]
    assert verdict_lines(table[table.model == "mean_shift"], ["pearson_delta"], value="mean") == [
        "pearson_delta (higher is better): best mean_shift (0.800); best baseline mean_shift (0.800): only "
        "baselines were scored"]

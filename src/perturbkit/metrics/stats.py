"""Statistics over repeated results: the Student-t interval of a mean (over seeds, or over perturbations)."""

from __future__ import annotations

import math


def t_interval(values, ci: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sd, ci_low, ci_high): the Student-t interval of the mean over seeds, NaNs dropped (NaN sd and
    interval with one value, all NaN with none)."""
    import numpy as np
    from scipy import stats

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return (math.nan,) * 4
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + ci / 2, len(v) - 1)) * sd / math.sqrt(len(v))
    return mean, sd, mean - half, mean + half

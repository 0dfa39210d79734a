"""The tiled energy distance and RBF MMD equal the all-pairs computation they replaced.

``reference_*`` below is the all-pairs code as it was before the tiling (``perturbkit.metrics.functions``:
``_pair_mean``, ``energy_distance``, ``mmd_rbf``), kept verbatim as the reference: scipy ``cdist`` of every
pair of rows (self-pairs included, distance exactly 0), plain means over all pairs.
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest

from perturbkit.metrics import energy_distance, mmd_rbf

# ---------------------------------------------------------------------- the reference (the old all-pairs code)


def _pair_mean(
    A: np.ndarray, B: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], chunk: int = 1024
) -> float:
    """Mean of ``fn(squared Euclidean distance)`` over all ``len(A) * len(B)`` pairs (self-pairs included)."""
    from scipy.spatial.distance import cdist

    total = 0.0
    for start in range(0, A.shape[0], chunk):
        total += float(fn(cdist(A[start : start + chunk], B, "sqeuclidean")).sum())
    return total / (A.shape[0] * B.shape[0])


def reference_energy_distance(X: np.ndarray, Y: np.ndarray) -> float:
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    return 2 * _pair_mean(X, Y, np.sqrt) - _pair_mean(X, X, np.sqrt) - _pair_mean(Y, Y, np.sqrt)


def reference_mmd_rbf(X: np.ndarray, Y: np.ndarray, gamma: float = 1.0) -> float:
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)

    def kernel(d2):
        return np.exp(-gamma * d2)

    return _pair_mean(X, X, kernel) + _pair_mean(Y, Y, kernel) - 2 * _pair_mean(X, Y, kernel)


def _scale(X, Y) -> float:
    """Size of the terms the distance is a difference of (the mean pairwise distance, about)."""
    Z = np.vstack([np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)])
    return float(np.sqrt(((Z - Z.mean(0)) ** 2).sum(1).mean())) + 1.0


def assert_same(X, Y, **kwargs):
    """Both distances within 1e-6 relative of the reference (plus 1e-12 of the terms' size for values that
    are themselves differences of equal-sized terms near 0), for the default and a small tile."""
    scale = _scale(X, Y)
    ref_e, ref_m = reference_energy_distance(X, Y), reference_mmd_rbf(X, Y)
    for kw in ({}, {"block": 7}, {"block": 7, "n_jobs": 2}, kwargs):
        assert energy_distance(X, Y, **kw) == pytest.approx(ref_e, rel=1e-6, abs=1e-12 * scale), kw
        assert mmd_rbf(X, Y, **kw) == pytest.approx(ref_m, rel=1e-6, abs=1e-12), kw


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("n", "m", "d"),
    [
        (1, 1, 1),
        (1, 1, 5),
        (1, 9, 3),
        (9, 1, 3),
        (2, 3, 1),
        (37, 11, 4),
        (11, 37, 50),
        (64, 64, 8),
        (130, 45, 2),
    ],
)
def test_equal_to_all_pairs_on_random_sets(n, m, d):
    rng = np.random.default_rng(n * 1000 + m * 10 + d)
    X = rng.normal(size=(n, d))
    Y = rng.normal(0.4, 1.3, size=(m, d))
    assert_same(X, Y)


def test_many_tiles_and_threads():
    rng = np.random.default_rng(7)
    X, Y = rng.normal(size=(700, 20)), rng.normal(0.2, 1.0, size=(450, 20))
    ref_e, ref_m = reference_energy_distance(X, Y), reference_mmd_rbf(X, Y, gamma=0.05)
    values_e = {
        (b, j): energy_distance(X, Y, block=b, n_jobs=j) for b in (33, 128, 512, 5000) for j in (1, 2, 3)
    }
    values_m = {(b, j): mmd_rbf(X, Y, 0.05, block=b, n_jobs=j) for b in (33, 128, 512) for j in (1, 2)}
    for v in values_e.values():
        assert v == pytest.approx(ref_e, rel=1e-9)
    for v in values_m.values():
        assert v == pytest.approx(ref_m, rel=1e-9)
    for b in (33, 128, 512):  # the tile sums are added in tile order: the threads change nothing, bit for bit
        assert values_e[(b, 1)] == values_e[(b, 2)] == values_e[(b, 3)]
        assert values_m[(b, 1)] == values_m[(b, 2)]
    assert energy_distance(X[:40], Y[:30], block=1, n_jobs=2) == pytest.approx(
        reference_energy_distance(X[:40], Y[:30]), rel=1e-12
    )


def test_float32_input_is_computed_in_float64():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(90, 30)).astype(np.float32)
    Y = rng.normal(0.1, 1.0, size=(60, 30)).astype(np.float32)
    assert_same(X, Y)
    assert energy_distance(X, Y) == energy_distance(X.astype(np.float64), Y.astype(np.float64))
    assert mmd_rbf(X, Y) == mmd_rbf(X.astype(np.float64), Y.astype(np.float64))


def test_integer_and_list_input():
    X, Y = [[0, 0], [1, 0], [0, 2]], [[1, 1], [3, 0]]
    assert_same(np.array(X), np.array(Y))
    assert energy_distance(X, Y) == pytest.approx(reference_energy_distance(X, Y), rel=1e-12)


# ----------------------------------------------------------------------------- duplicates, near-duplicates


def test_duplicates_within_and_across_sets():
    rng = np.random.default_rng(5)
    base = rng.normal(size=(12, 6))
    X = base[rng.integers(0, 12, 80)]  # many exact duplicates within X
    Y = np.vstack([base[:5], base[:5], rng.normal(size=(20, 6))])  # duplicates within Y and shared with X
    assert_same(X, Y)


def test_near_identical_cells():
    """Pairs a product form cannot resolve (distance ~1e-9 on norms ~1): recomputed, not sqrt(rounding)."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(60, 50))
    Y = X[rng.permutation(60)] + 1e-9 * rng.normal(size=(60, 50))
    ref = reference_energy_distance(X, Y)
    got = energy_distance(X, Y, block=16)
    # matrix products alone would leave ~sqrt(1e-16 * 100) ~ 1e-7 on each of the 60 near pairs: ~1e-9 here
    assert abs(got - ref) < 1e-13
    assert_same(X, Y)


def test_large_offset_and_far_apart_groups():
    rng = np.random.default_rng(13)
    X = 1e4 + 1e-2 * rng.normal(size=(40, 5))  # tiny spread on a large offset
    Y = 1e4 + 1e-2 * rng.normal(0.5, 1.0, size=(30, 5))
    assert_same(X, Y)
    Z = rng.normal(size=(40, 5))
    assert_same(Z, Z[:30] + 1e3)  # two groups 1e3 apart, each of spread 1


def test_identical_sets_and_constant_cells():
    rng = np.random.default_rng(17)
    X = rng.normal(size=(25, 4))
    assert energy_distance(X, X) == pytest.approx(0.0, abs=1e-12)
    assert mmd_rbf(X, X) == pytest.approx(0.0, abs=1e-12)
    C = np.full((10, 3), 2.5)
    assert energy_distance(C, C) == 0.0 and mmd_rbf(C, C) == 0.0
    assert_same(C, C[:4] + 1.0)


def test_hand_cases():
    X, Y = np.array([[0.0], [1.0], [2.0]]), np.array([[0.0], [3.0]])
    assert energy_distance(X, Y) == pytest.approx(11 / 18, abs=1e-12)
    assert energy_distance(X, Y, block=1) == pytest.approx(11 / 18, abs=1e-12)
    X, Y = np.array([[0.0], [1.0]]), np.array([[0.0]])
    assert mmd_rbf(X, Y) == pytest.approx((1 - math.exp(-1)) / 2, abs=1e-12)


# ------------------------------------------------------------------------------------------ memory, errors


def test_memory_is_bounded_by_the_tile_not_the_pairs():
    rng = np.random.default_rng(19)
    X, Y = rng.normal(size=(3000, 10)), rng.normal(size=(2500, 10))
    energy_distance(X[:10], Y[:10])  # imports and first-call allocations out of the way
    tracemalloc.start()
    try:
        energy_distance(X, Y, block=256, n_jobs=2)
        mmd_rbf(X, Y, block=256, n_jobs=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # one X x Y distance matrix would be 60 MB; the tiles are 0.5 MB each, the augmented rows ~0.6 MB
    assert peak < 8 * 2**20, peak


@pytest.mark.parametrize(
    ("X", "Y", "kwargs", "match"),
    [
        (np.zeros((0, 3)), np.zeros((2, 3)), {}, "at least one cell"),
        (np.zeros((2, 3)), np.zeros((2, 4)), {}, "same number of columns"),
        (np.zeros(3), np.zeros((2, 3)), {}, "2-D"),
        (np.zeros((2, 3)), np.zeros((2, 3)), {"block": 0}, "block"),
        (np.zeros((2, 3)), np.zeros((2, 3)), {"block": 2.5}, "block"),
        (np.zeros((2, 3)), np.zeros((2, 3)), {"n_jobs": 0}, "n_jobs"),
    ],
)
def test_bad_input_raises(X, Y, kwargs, match):
    for fn in (energy_distance, mmd_rbf):
        with pytest.raises(ValueError, match=match):
            fn(X, Y, **kwargs)


def test_nan_propagates():
    X = np.array([[0.0, 1.0], [np.nan, 0.0]])
    assert math.isnan(energy_distance(X, np.ones((2, 2))))
    assert math.isnan(mmd_rbf(X, np.ones((2, 2))))


def test_concurrent_callers_and_blas_threads_restored():
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    def blas_threads():
        return sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    rng = np.random.default_rng(23)
    X, Y = rng.normal(size=(300, 6)), rng.normal(0.3, 1.0, size=(200, 6))
    before = blas_threads()
    alone = energy_distance(X, Y, block=64, n_jobs=2)
    with ThreadPoolExecutor(3) as pool:
        values = list(pool.map(lambda j: energy_distance(X, Y, block=64, n_jobs=j), [1, 2, 3, 2]))
    assert values == [alone] * 4
    assert blas_threads() == before

from __future__ import annotations

import os

import pytest

import perturbkit as pk


def skip_without(reason: str) -> None:
    """Skip a test whose system dependency is missing, but fail under CI (.ci/run installs it and sets
    PERTURBKIT_SYSTEM_TESTS=1), so a check that CI promises can never silently not run."""
    if os.environ.get("PERTURBKIT_SYSTEM_TESTS") == "1":
        pytest.fail(f"required under PERTURBKIT_SYSTEM_TESTS=1: {reason}")
    pytest.skip(reason)

#: a small VAE so unit tests train in seconds; the architecture is otherwise the model's own
SMALL = dict(n_hidden=64, n_latent=8, batch_size=64)


@pytest.fixture(scope="session")
def syn():
    """Seeded synthetic data with a planted effect on the first 10 of 60 genes (4 contexts)."""
    return pk.data.synthetic(n_contexts=4, n_cells=150, n_genes=60, n_responsive=10, effect=1.5, seed=0)


@pytest.fixture(scope="session")
def syn_path(tmp_path_factory, syn):
    path = tmp_path_factory.mktemp("data") / "syn.h5ad"
    syn.write_h5ad(path)
    return path

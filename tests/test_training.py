"""The training budget (docs/training.md): epochs, max_steps, early stopping, the still-falling warning; and
the verdict against mean_shift that predict prints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import SMALL, SMALL_ARGS

import perturbkit as pk
from perturbkit.cli import main
from perturbkit.errors import InputError
from perturbkit.models._train import FALLING_TOL, still_falling


def _task(syn):
    spec = pk.PerturbSpec()
    return spec, *pk.split.holdout_cell_type(syn, spec, "ctx1").subsets(syn)


@pytest.mark.parametrize("curve, falling", [
    ([10.0, 9.0, 8.0, 7.0, 6.0], True),  # falling to the end
    ([10.0, 8.0, 7.0, 7.0, 7.0, 7.0], False),  # flat at the end
    ([10.0, 9.0, 8.0, 8.0, 8.0 * (1 - FALLING_TOL / 2)], False),  # falling, but by less than the tolerance
    ([10.0, 9.0, 8.0, 8.0, 8.0 * (1 - 2 * FALLING_TOL)], True),
    ([10.0, 6.0, 7.0, 6.5, 6.2], False),  # the best epoch lies before the window
    ([10.0, 9.0], False),  # too short to judge
    ([-10.0, -11.0, -12.0], True),  # negative losses: the tolerance is relative to |loss|
])
def test_still_falling_rule(curve, falling):
    assert still_falling(curve) is falling


def test_window_is_a_tenth_of_the_epochs_and_at_least_two():
    # 40 epochs: the window is the last 4; an improvement only at epoch 36 (outside it) does not count
    flat_end = [10.0 - i for i in range(36)] + [-25.0] * 4
    assert not still_falling(flat_end)
    assert still_falling(flat_end[:-1] + [-26.0])


def test_steps_are_counted_and_max_steps_stops_mid_epoch(syn):
    spec, train, _, _ = _task(syn)
    full = pk.models.get("scgen", epochs=2, **SMALL).fit(train, spec, seed=0).history
    per_epoch = math.ceil(full.n_train / SMALL["batch_size"])  # no 1-cell batch at this size
    assert full.steps == 2 * per_epoch and full.stop_reason == "epochs"
    capped = pk.models.get("scgen", epochs=50, max_steps=per_epoch + 2, **SMALL).fit(train, spec, seed=0)
    h = capped.history
    assert h.steps == per_epoch + 2 and h.epochs_run == 2 and h.stop_reason == "max_steps"
    assert capped.fit_info["steps"] == h.steps
    # the first epoch is the same training as the uncapped run's
    assert h.train_loss[0] == full.train_loss[0] and h.val_loss[0] == full.val_loss[0]


def test_max_steps_is_checked():
    with pytest.raises(InputError, match="'max_steps' must be >= 1, got 0"):
        pk.models.get("scgen", max_steps=0)


def test_early_stopping_off_trains_on_every_cell_for_every_epoch(syn):
    spec, train, _, _ = _task(syn)
    for name in ("scgen", "scpram"):
        on = pk.models.get(name, epochs=1, **SMALL).fit(train, spec, seed=0).history
        off = pk.models.get(name, epochs=1, early_stopping=False, **SMALL).fit(train, spec, seed=0).history
        assert on.n_val == round(train.n_obs * 0.1) and on.monitor == "validation loss", name
        assert off.n_val == 0 and off.n_train == train.n_obs and not off.val_loss and off.monitor == "training loss"


def test_an_undertrained_fit_warns_and_a_converged_one_does_not(syn):
    spec, train, _, _ = _task(syn)
    short = pk.models.get("scgen", epochs=4, lr=1e-4, **SMALL).fit(train, spec, seed=0)
    assert short.history.still_falling and short.history.stop_reason == "epochs"
    (warning,) = short.fit_info["warnings"]
    assert "validation loss was still falling" in warning and "raise epochs" in warning
    stopped = pk.models.get("scgen", epochs=60, patience=2, lr=5e-2, **SMALL).fit(train, spec, seed=0)
    assert stopped.history.stop_reason == "early stopping" and not stopped.history.still_falling
    assert stopped.fit_info["warnings"] == []


def test_predict_prints_the_warning_and_records_it(syn_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["predict", "--data", str(syn_path), "--model", "scgen", "--holdout", "ctx1", "--epochs", "4",
                 "--param", "lr=0.0001", *SMALL_ARGS, "--n-boot", "0", "--metrics", "r2_mean_all", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "warning: scgen: the validation loss was still falling" in printed.out + printed.err
    assert "r2_mean_all (higher is better): best " in printed.out  # the verdict against mean_shift
    record = json.loads((out / "record.json").read_text())
    (warning,) = record["warnings"]
    assert warning == record["models"]["scgen"]["fit"]["warnings"][0]
    history = record["models"]["scgen"]["fit"]["history"]
    assert history["still_falling"] and history["steps"] > 0 and history["stop_reason"] == "epochs"


def test_same_seed_same_weights_with_max_steps(syn):
    spec, train, source, _ = _task(syn)
    a, b = (pk.models.get("scgen", epochs=5, max_steps=7, **SMALL).fit(train, spec, seed=3) for _ in range(2))
    assert np.array_equal(a.predict(source).X, b.predict(source).X)


def test_subnormal_weights_are_zeroed_after_training_and_on_load(syn, tmp_path):
    """Weights below float32's smallest normal number slow every CPU product (docs/ondisk.md): training leaves
    none, and a saved model that holds some loses them on load; the predictions do not change."""
    import torch

    from perturbkit.models._train import zero_subnormal

    tiny = torch.finfo(torch.float32).tiny
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[tiny / 4, -tiny / 2, 0.5], [tiny, 0.0, -tiny * 0.9]]))
    assert zero_subnormal(lin) == 3
    assert lin.weight.tolist() == [[0.0, 0.0, 0.5], [tiny, 0.0, 0.0]]  # tiny itself is normal

    def subnormal(module):
        return sum(int(((p != 0) & (p.abs() < tiny)).sum()) for p in module.parameters())

    spec, train, source, _ = _task(syn)
    model = pk.models.get("scgen", epochs=2, **SMALL).fit(train, spec, seed=0)
    assert subnormal(model.module) == 0 and model.history.subnormal_zeroed >= 0
    first = next(model.module.parameters()).view(-1)
    with torch.no_grad():
        first[0] = 0.0
    pred = model.predict(source).X
    with torch.no_grad():  # as a model trained before the zeroing might have been saved
        first[0] = tiny / 8
    loaded = pk.models.Model.load(model.save(tmp_path / "m"))
    assert subnormal(loaded.module) == 0
    np.testing.assert_array_equal(loaded.predict(source).X, pred)


# ------------------------------------------------------------------------------ sparse input, batch by batch


def test_sparse_input_trains_and_predicts_exactly_as_dense(syn):
    import scipy.sparse as sp

    spec, train, source, _ = _task(syn)
    assert not sp.issparse(train.X)  # the synthetic data are dense
    sparse_train, sparse_source = train.copy(), source.copy()
    sparse_train.X, sparse_source.X = sp.csr_matrix(train.X), sp.csr_matrix(source.X)
    for name in ("scgen", "scpram"):
        dense_model = pk.models.get(name, epochs=2, **SMALL).fit(train, spec, seed=0)
        sparse_model = pk.models.get(name, epochs=2, **SMALL).fit(sparse_train, spec, seed=0)
        assert dense_model.history.val_loss == sparse_model.history.val_loss, name
        assert np.array_equal(dense_model.predict(source).X, sparse_model.predict(sparse_source).X), name


def test_rows_hand_out_dense_blocks_without_densifying_the_matrix():
    import scipy.sparse as sp
    import torch

    from perturbkit.models._train import Rows

    X = sp.random(50, 7, density=0.3, format="csr", dtype=np.float32, random_state=0)
    rows = Rows(X)
    assert sp.issparse(rows.X) and rows.shape == (50, 7) and len(rows) == 50
    idx = torch.tensor([4, 0, 49, 4])
    assert np.array_equal(rows.take(idx).numpy(), X.toarray()[[4, 0, 49, 4]])
    assert np.array_equal(torch.cat(list(rows.chunks(16))).numpy(), X.toarray())
    dense = Rows(X.toarray())
    assert np.array_equal(dense.take(idx).numpy(), rows.take(idx).numpy())


def test_a_large_validation_set_is_scored_chunk_by_chunk(syn, monkeypatch):
    import torch

    from perturbkit.models import _train

    spec, train, _, _ = _task(syn)
    model = pk.models.get("scgen", epochs=1, **SMALL).fit(train, spec, seed=0)
    rows, idx = _train.Rows(train.X), torch.arange(train.n_obs)
    whole = _train._val_loss(model.module, rows, idx)
    monkeypatch.setattr(_train, "VAL_CHUNK", 7)  # 450 cells in chunks of 7
    assert _train._val_loss(model.module, rows, idx) == pytest.approx(whole, rel=1e-5)

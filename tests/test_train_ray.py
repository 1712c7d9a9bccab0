"""Ray Train V2: two DDP workers take the same hook decisions; a killed worker resumes."""

from __future__ import annotations

import json
import os

import pytest

from raypipe.config import load_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def truth_embeddings(tmp_path_factory):
    from raypipe.synth.embeddings import write_truth_embeddings
    from raypipe.synth.latent import generate_truth

    root = tmp_path_factory.mktemp("emb")
    return write_truth_embeddings(generate_truth(n=160, seed=2), str(root / "emb"), dim=16)


def _setup(out, emb, *extra):
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.train.trainer import assign_splits, model_meta

    cfg = load_config(None, [f"run.out_dir={out}", f"train.input={emb}", "train.epochs=4", "train.patience=100",
                             "train.hidden_dim=8", "train.batch_size=16", "train.omnifuse.depth=2",
                             "ray.progress_bars=false", *extra])
    table = read_embeddings(emb)
    task, k = infer_task(table.y)
    split = assign_splits(table, cfg)
    meta = model_meta(cfg, table, task, k)
    ids = {s: set(table.sample_id[split == s]) for s in ("train", "val")}
    return cfg, meta, ids


def _history(result):
    with result.checkpoint.as_directory() as d:
        return json.load(open(os.path.join(d, "history.json")))


@pytest.mark.parametrize("method", ["omnifuse", "gblend"])
def test_two_ddp_workers_take_the_same_hook_decisions(ray_session, truth_embeddings, tmp_path, method):
    from raypipe.train.trainer import fit_torch_trainer

    cfg, meta, ids = _setup(tmp_path, truth_embeddings, "train.num_workers=2", f"train.method={method}")
    meta["method"] = method
    result = fit_torch_trainer(cfg, meta, ids["train"], ids["val"], f"ddp-{method}", str(tmp_path / "results"))
    hist = _history(result)
    assert len(hist) == 4
    assert all(h["workers_agree"] for h in hist)
    if method == "omnifuse":
        assert all(h["tla"]["lazy"] for h in hist)


def test_killed_worker_resumes_from_its_checkpoint(ray_session, truth_embeddings, tmp_path):
    from raypipe.train.trainer import fit_torch_trainer

    cfg, meta, ids = _setup(tmp_path, truth_embeddings)
    clean = fit_torch_trainer(cfg, meta, ids["train"], ids["val"], "clean", str(tmp_path / "results"))
    marker = str(tmp_path / "killed-once")
    crashed = fit_torch_trainer(cfg, meta, ids["train"], ids["val"], "crashed", str(tmp_path / "results"),
                                fault_injection={"epoch": 2, "marker": marker})
    assert os.path.exists(marker)  # the worker really was killed
    h_clean, h_crash = _history(clean), _history(crashed)
    assert [h["epoch"] for h in h_crash] == [1, 2, 3, 4]  # resumed at epoch 3, not restarted from 1
    assert h_crash[0]["val_auroc"] == pytest.approx(h_clean[0]["val_auroc"])  # same seeds, same first epoch
    # same final quality within noise (dropout RNG is not part of the checkpoint)
    assert abs(h_crash[-1]["val_auroc"] - h_clean[-1]["val_auroc"]) < 0.1


def test_checkpoints_every_k_epochs_resume_from_the_last_persisted_one(ray_session, truth_embeddings, tmp_path):
    from raypipe.train.tables import read_embeddings
    from raypipe.train.trainer import fit_torch_trainer

    # Worked by hand: the validation samples are all of one class, so AUROC is undefined (nan) and
    # no epoch is a new best. With 7 epochs and checkpoint_every=3 the persisted epochs are 3 and 6
    # (every 3rd) and 7 (the last); 1, 2, 4 and 5 are not. Killed after epoch 5, the worker restarts
    # from epoch 3's checkpoint (with every epoch persisted it would be 5), trains 4-7 and finishes.
    cfg, meta, ids = _setup(tmp_path, truth_embeddings, "train.epochs=7", "train.checkpoint_every=3",
                            "train.max_failures=1")
    table = read_embeddings(truth_embeddings)
    positive = set(table.sample_id[table.y == 1])
    val = ids["val"] & positive
    assert val
    marker = str(tmp_path / "killed-once")
    result = fit_torch_trainer(cfg, meta, ids["train"], val, "every3", str(tmp_path / "results"),
                               fault_injection={"epoch": 5, "marker": marker})
    assert os.path.exists(marker)  # the worker really was killed
    hist = _history(result)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5, 6, 7]
    assert all(h["val_auroc"] != h["val_auroc"] for h in hist)  # the premise: nan, never a new best
    assert {h["epoch"]: h["resumed_from_epoch"] for h in hist if "resumed_from_epoch" in h} == {4: 3}
    assert result.metrics["epoch"] == 7  # the last report is the last epoch's
    on_disk = sorted(d for d in os.listdir(tmp_path / "results" / "every3") if d.startswith("epoch_"))
    assert set(on_disk) <= {"epoch_0003", "epoch_0006", "epoch_0007"} and "epoch_0007" in on_disk


def test_max_failures_reaches_the_failure_config(ray_session, truth_embeddings, tmp_path):
    from ray.train import TrainingFailedError

    from raypipe.train.trainer import build_torch_trainer, fit_torch_trainer

    cfg, meta, ids = _setup(tmp_path, truth_embeddings)
    default = build_torch_trainer(cfg, meta, ids["train"], ids["val"], "default", str(tmp_path / "results"))
    assert default.run_config.failure_config.max_failures == 2
    cfg5, _, _ = _setup(tmp_path, truth_embeddings, "train.max_failures=5")
    five = build_torch_trainer(cfg5, meta, ids["train"], ids["val"], "five", str(tmp_path / "results"))
    assert five.run_config.failure_config.max_failures == 5
    # and it is what Ray Train obeys: with no retries allowed, one killed worker fails the run
    cfg0, _, _ = _setup(tmp_path, truth_embeddings, "train.max_failures=0", "train.epochs=2")
    with pytest.raises(TrainingFailedError):
        fit_torch_trainer(cfg0, meta, ids["train"], ids["val"], "no-retry", str(tmp_path / "results"),
                          fault_injection={"epoch": 1, "marker": str(tmp_path / "killed")})


def test_running_an_early_stopped_run_again_trains_nothing_more(ray_session, truth_embeddings, tmp_path):
    from raypipe.train.trainer import fit_torch_trainer

    # lr ~ 0: the validation metric cannot improve after epoch 1, so patience 1 stops after epoch 2
    cfg, meta, ids = _setup(tmp_path, truth_embeddings, "train.epochs=6", "train.patience=1", "train.lr=1e-12")
    first = fit_torch_trainer(cfg, meta, ids["train"], ids["val"], "early", str(tmp_path / "results"))
    assert [h["epoch"] for h in _history(first)] == [1, 2]
    again = fit_torch_trainer(cfg, meta, ids["train"], ids["val"], "early", str(tmp_path / "results"))
    assert [h["epoch"] for h in _history(again)] == [1, 2]  # resumed from epoch 2 and stopped, no third epoch


def test_the_worker_honours_a_methods_early_stop_hold(ray_session, truth_embeddings, tmp_path):
    from raypipe.train.trainer import fit_torch_trainer

    # lr ~ 0: without a hold, patience 1 stops after epoch 2 (the test above); OmniFuse's imp_patience 100
    # holds early stopping for 100 epochs after the cascade's last improvement, so all 4 epochs run
    cfg, meta, ids = _setup(tmp_path, truth_embeddings, "train.patience=1", "train.lr=1e-12",
                            "train.method_args.imp_patience=100")
    result = fit_torch_trainer(cfg, meta, ids["train"], ids["val"], "hold", str(tmp_path / "results"))
    assert [h["epoch"] for h in _history(result)] == [1, 2, 3, 4]


def test_a_run_killed_while_held_resumes_inside_the_hold(ray_session, truth_embeddings, tmp_path):
    from raypipe.train.trainer import fit_torch_trainer

    # lr ~ 0: the validation metric does not improve after epoch 1, so patience 1 has run out at epoch 2;
    # imp_patience 100 holds early stopping through epoch 4 (the test above). Killed after epoch 2, the
    # resumed worker must go on inside the hold (3, 4), not stop at once as an early-stopped run does.
    cfg, meta, ids = _setup(tmp_path, truth_embeddings, "train.patience=1", "train.lr=1e-12",
                            "train.method_args.imp_patience=100", "train.max_failures=1")
    marker = str(tmp_path / "killed-once")
    result = fit_torch_trainer(cfg, meta, ids["train"], ids["val"], "held", str(tmp_path / "results"),
                               fault_injection={"epoch": 2, "marker": marker})
    assert os.path.exists(marker)  # the worker really was killed
    hist = _history(result)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert {h["epoch"]: h["resumed_from_epoch"] for h in hist if "resumed_from_epoch" in h} == {3: 2}


def test_epoch_lines_replace_ray_trains_per_report_dump():
    """raypipe prints one short line per epoch; Ray Train V2's per-report INFO dump follows its level."""
    import logging

    from ray.train.v2._internal.execution import context as v2_context

    from raypipe.train.trainer import _epoch_line, _set_report_log_level

    line = _epoch_line({"epoch": 3, "seconds": 1.54, "train_loss": 0.51234, "val_auroc": 0.8}, 30, "auroc", 0.81)
    assert line == "epoch 3/30, train loss 0.5123, val auroc 0.8000 (best 0.8100), 1.5s"
    assert _epoch_line({"epoch": 1, "seconds": 2.0}, 5, "auroc", float("-inf")) == "epoch 1/5, 2.0s"
    assert _epoch_line({"epoch": 1, "seconds": 2.0, "val_auroc": float("nan")}, 5, "auroc", float("-inf"),
                       "concat") == "concat epoch 1/5, val auroc nan, 2.0s"
    before = v2_context.logger.level
    try:
        _set_report_log_level("WARNING")
        assert not v2_context.logger.isEnabledFor(logging.INFO)  # the very logger that writes the dump
        _set_report_log_level("INFO")
        assert v2_context.logger.isEnabledFor(logging.INFO)
    finally:
        v2_context.logger.setLevel(before)


def test_sparse_epoch_lines_keep_the_first_the_bests_every_fifth_and_the_last():
    from raypipe.train.trainer import logs_epoch

    improved = {1, 2, 3, 7}  # epochs with a new best; the run stops early after epoch 12
    shown = [e for e in range(1, 13) if logs_epoch("sparse", e, e == 1, e in improved, e == 12)]
    assert shown == [1, 2, 3, 5, 7, 10, 12]
    assert [e for e in range(1, 13) if logs_epoch(True, e, e == 1, e in improved, e == 12)] == list(range(1, 13))
    assert not any(logs_epoch(False, e, e == 1, True, e == 12) for e in range(1, 13))
    # a resumed run's first epoch (here 9) is shown whatever its number
    assert [e for e in range(9, 13) if logs_epoch("sparse", e, e == 9, False, e == 12)] == [9, 10, 12]


def test_a_bad_label_column_fails_before_ray_starts(truth_embeddings, tmp_path):
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "raypipe")
    r = subprocess.run([exe, "train", "--input", truth_embeddings, "--set", f"run.out_dir={tmp_path}",
                        "--set", "ingest.label_columns=[outcome]"], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert r.returncode == 1 and "['outcome'] not in the embeddings table" in r.stderr, r.stderr
    assert "local Ray" not in r.stderr and not (tmp_path / ".ray").exists()

"""What raypipe's Ray Train fits run with: the controller's poll interval, no preemption watcher and no
placement group cleaner on the one-machine Ray that init_ray started (a failed fit's placement group removed
by raypipe instead), no DatasetManager actor for the in-memory feed; a user's settings win."""

from __future__ import annotations

import json
import os

import pytest

from raypipe.config import load_config

POLL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def test_poll_interval_is_set_and_the_watcher_left_on_a_joined_ray(monkeypatch):
    from raypipe import runtime
    from raypipe.train import trainer

    monkeypatch.delenv(POLL, raising=False)
    monkeypatch.delenv(WATCHER, raising=False)
    monkeypatch.setattr(runtime, "on_own_local_ray", lambda: False)
    assert trainer.ray_train_env() == {POLL: "0.25"}


def test_the_watcher_is_off_on_the_own_local_ray(monkeypatch):
    from raypipe import runtime
    from raypipe.train import trainer

    monkeypatch.delenv(POLL, raising=False)
    monkeypatch.delenv(WATCHER, raising=False)
    monkeypatch.setattr(runtime, "on_own_local_ray", lambda: True)
    assert trainer.ray_train_env() == {POLL: "0.25", WATCHER: "0"}


@pytest.mark.parametrize("own, with_datasets, expected", [
    (False, True, ()),
    (False, False, ("DatasetsCallback",)),
    (True, True, ("PlacementGroupCleanerCallback",)),
    (True, False, ("DatasetsCallback", "PlacementGroupCleanerCallback")),
])
def test_callbacks_left_out(monkeypatch, own, with_datasets, expected):
    from raypipe import runtime
    from raypipe.train import trainer

    monkeypatch.setattr(runtime, "on_own_local_ray", lambda: own)
    assert trainer.callbacks_left_out(with_datasets) == expected


def test_what_the_environment_sets_wins(monkeypatch):
    from raypipe import runtime
    from raypipe.train import trainer

    monkeypatch.setenv(POLL, "2")
    monkeypatch.setenv(WATCHER, "1")
    monkeypatch.setattr(runtime, "on_own_local_ray", lambda: True)
    assert trainer.ray_train_env() == {}


def test_the_environment_is_restored_after_the_block(monkeypatch):
    from raypipe.train import trainer

    monkeypatch.delenv("RAYPIPE_TEST_ONLY_VAR", raising=False)
    with trainer._environment({"RAYPIPE_TEST_ONLY_VAR": "x"}):
        assert os.environ["RAYPIPE_TEST_ONLY_VAR"] == "x"
    assert "RAYPIPE_TEST_ONLY_VAR" not in os.environ
    with pytest.raises(RuntimeError):
        with trainer._environment({"RAYPIPE_TEST_ONLY_VAR": "y"}):
            raise RuntimeError("a failed fit")
    assert "RAYPIPE_TEST_ONLY_VAR" not in os.environ


@pytest.mark.ray
def test_own_local_ray_is_the_one_init_ray_started(ray_session, monkeypatch):
    import ray

    from raypipe import runtime

    # the session's Ray was started by ray.init, not init_ray: not raypipe's own
    monkeypatch.setattr(runtime, "_local_gcs", None)
    assert not runtime.on_own_local_ray()
    monkeypatch.setattr(runtime, "_local_gcs", ray.get_runtime_context().gcs_address)
    assert runtime.on_own_local_ray()
    monkeypatch.setattr(runtime, "_local_gcs", "127.0.0.1:1")  # a Ray started earlier, since shut down
    assert not runtime.on_own_local_ray()


@pytest.fixture(scope="module")
def small_embeddings(tmp_path_factory):
    from raypipe.synth.embeddings import write_truth_embeddings
    from raypipe.synth.latent import generate_truth

    root = tmp_path_factory.mktemp("emb")
    return write_truth_embeddings(generate_truth(n=120, seed=3), str(root / "emb"), dim=8)


def _setup(out, emb, *extra):
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.train.trainer import assign_splits, model_meta

    cfg = load_config(None, [f"run.out_dir={out}", f"train.input={emb}", "train.epochs=2", "train.patience=100",
                             "train.hidden_dim=8", "train.batch_size=16", "train.omnifuse.depth=2",
                             "ray.progress_bars=false", *extra])
    table = read_embeddings(emb)
    task, k = infer_task(table.y)
    split = assign_splits(table, cfg)
    meta = model_meta(cfg, table, task, k)
    ids = {s: set(table.sample_id[split == s]) for s in ("train", "val")}
    return cfg, meta, ids


@pytest.mark.ray
def test_the_memory_feed_leaves_out_only_the_datasets_callback(ray_session, small_embeddings, tmp_path):
    from ray.train.torch import TorchTrainer

    from raypipe.train.trainer import build_torch_trainer

    names = {}
    for feed in ("memory", "ray_data"):
        cfg, meta, ids = _setup(tmp_path, small_embeddings, f"train.feed={feed}")
        trainer = build_torch_trainer(cfg, meta, ids["train"], ids["val"], feed, str(tmp_path / "results"))
        assert isinstance(trainer, TorchTrainer)
        names[feed] = [type(c).__name__ for c in trainer._create_default_callbacks()]
    assert "DatasetsCallback" in names["ray_data"]
    assert "DatasetsCallback" not in names["memory"]
    assert names["memory"] == [n for n in names["ray_data"] if n != "DatasetsCallback"]


@pytest.mark.ray
def test_the_own_local_ray_leaves_out_the_placement_group_cleaner(ray_session, small_embeddings, tmp_path,
                                                                   monkeypatch):
    import ray

    from raypipe import runtime
    from raypipe.train.trainer import build_torch_trainer

    names = {}
    for own in (False, True):
        monkeypatch.setattr(runtime, "_local_gcs", ray.get_runtime_context().gcs_address if own else None)
        cfg, meta, ids = _setup(tmp_path, small_embeddings, "train.feed=ray_data")
        trainer = build_torch_trainer(cfg, meta, ids["train"], ids["val"], f"own{own}", str(tmp_path / "results"))
        names[own] = [type(c).__name__ for c in trainer._create_default_callbacks()]
    assert "PlacementGroupCleanerCallback" in names[False]
    assert names[True] == [n for n in names[False] if n != "PlacementGroupCleanerCallback"]


def _kill_the_controller_once_training(stop, killed, timeout_s=120.0):
    """SIGKILL the Ray Train controller's process once its worker group runs (the test's crash)."""
    import signal
    import time

    from ray._private.state import actors
    from ray.util import placement_group_table

    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        alive = [a for a in actors().values() if a["State"] == "ALIVE"]
        controllers = [a for a in alive if a["ActorClassName"] == "TrainController"]
        training = any(a["ActorClassName"] == "RayTrainWorker" for a in alive)
        reserved = any(pg["state"] == "CREATED" for pg in placement_group_table().values())
        if controllers and training and reserved:
            os.kill(controllers[0]["Pid"], signal.SIGKILL)
            killed.append(controllers[0]["Pid"])
            return
        time.sleep(0.05)


@pytest.mark.ray
def test_a_killed_controller_leaves_no_placement_group_on_the_own_local_ray(ray_session, small_embeddings,
                                                                             tmp_path, monkeypatch):
    import threading
    import time

    import ray
    from ray.util import placement_group_table

    from raypipe import runtime
    from raypipe.train.trainer import fit_torch_trainer

    monkeypatch.setattr(runtime, "_local_gcs", ray.get_runtime_context().gcs_address)  # no cleaner actor
    before = set(placement_group_table())
    cfg, meta, ids = _setup(tmp_path, small_embeddings, "train.feed=memory", "train.epochs=400",
                            "train.patience=1000", "train.max_failures=0")
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_the_controller_once_training, args=(stop, killed), daemon=True)
    killer.start()
    try:
        with pytest.raises(ray.exceptions.RayActorError):
            fit_torch_trainer(cfg, meta, ids["train"], ids["val"], "killed", str(tmp_path / "results"))
    finally:
        stop.set()
        killer.join()
    assert killed, "the controller was not killed"
    new = {k: v["state"] for k, v in placement_group_table().items() if k not in before}
    assert new and all(state == "REMOVED" for state in new.values()), new
    deadline = time.monotonic() + 30  # the workers' CPUs come back
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


@pytest.mark.ray
def test_a_memory_fed_fit_reports_every_epoch_and_restores_the_environment(ray_session, small_embeddings, tmp_path,
                                                                          monkeypatch):
    from raypipe.train.trainer import fit_torch_trainer

    monkeypatch.delenv(POLL, raising=False)
    cfg, meta, ids = _setup(tmp_path, small_embeddings, "train.feed=memory", "train.checkpoint_every=1")
    result = fit_torch_trainer(cfg, meta, ids["train"], ids["val"], "memfed", str(tmp_path / "results"))
    assert POLL not in os.environ
    assert result.metrics["epoch"] == 2
    with result.checkpoint.as_directory() as d:
        assert [h["epoch"] for h in json.load(open(os.path.join(d, "history.json")))] == [1, 2]
    # the run's reports: every epoch persisted, the last one is the result's
    on_disk = sorted(d for d in os.listdir(tmp_path / "results" / "memfed") if d.startswith("epoch_"))
    assert on_disk[-1] == "epoch_0002"

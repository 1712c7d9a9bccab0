"""Ray Train V2 shell around the framework-free loop: `raypipe train`.

Flow (docs/train.md)::

    embeddings table --split (patient-grouped, stratified)--> train / val / test
    TorchTrainer(workers x [build method, DDP, loop.train_epoch, validate, report+checkpoint])
    best checkpoint --> test evaluation on the driver --> run dir

The run directory holds everything later steps need: ``split.parquet``,
``model.pt`` + ``model_meta.json`` (method, modalities, shapes, task, embedding
spec), ``history.json`` (per epoch, incl. the TLA trace), ``metrics.json`` and
``predictions_test.parquet``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

from raypipe.config import Config
from raypipe.train.splits import holdout_mask
from raypipe.train.tables import EmbeddingTable, infer_task, read_embeddings, table_to_arrays

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
META_FILE = "model_meta.json"
STATE_FILE = "train_state.pt"


# ----------------------------------------------------------------------------- splits
def assign_splits(table: EmbeddingTable, cfg: Config) -> np.ndarray:
    """"train"/"val"/"test" per row: test from the table's split column (fixed at ingest) or a
    grouped stratified holdout; val carved from the rest the same way. Seeded by run.seed."""
    seed = cfg.run.seed
    if table.split is not None and np.isin(table.split, ["test"]).any():
        test = table.split == "test"
    else:
        test = holdout_mask(table.sample_id, table.y, fraction=cfg.ingest.test_fraction, seed=seed)
    split = np.where(test, "test", "train").astype(object)
    rest = np.flatnonzero(~test)
    val = holdout_mask(table.sample_id[rest], table.y[rest], fraction=cfg.train.val_fraction, seed=seed + 1)
    split[rest[val]] = "val"
    return split.astype(str)


# ----------------------------------------------------------------------------- tensors
def arrays_to_torch(arrays: dict[str, np.ndarray], modalities: list[str], task: str, device=None) -> dict:
    """{"x_<m>", "mask", "y"} numpy -> the fusion batch {"x": {m: T}, "mask": T, "y": T}."""
    import torch

    x = {m: torch.as_tensor(np.ascontiguousarray(arrays[f"x_{m}"]), dtype=torch.float32, device=device)
         for m in modalities}
    y = arrays["y"]
    y_t = torch.as_tensor(y, dtype=torch.long if task == "multiclass" else torch.float32, device=device)
    return {"x": x, "mask": torch.as_tensor(arrays["mask"], dtype=torch.bool, device=device), "y": y_t}


def model_meta(cfg: Config, table: EmbeddingTable, task: str, n_outputs: int,
               fit_rows: np.ndarray | None = None) -> dict:
    """What ``model_meta.json`` holds. ``fit_rows`` (boolean, per table row) are the rows the model may
    learn from: the regression label variance (``var_y``) comes from them only, never from test labels."""
    y_fit = table.y if fit_rows is None else table.y[np.asarray(fit_rows, dtype=bool)]
    return {
        "method": cfg.train.method,
        "modalities": table.modalities,
        "shapes": {m: list(s) for m, s in table.shapes.items()},
        "task": task,
        "n_outputs": n_outputs,
        "label_columns": table.label_columns,
        "embedding_spec": table.spec,
        # the ingest statistics the inputs were normalised with: raw-cohort inference applies them unchanged
        "ehr_normalisation": table.normalisation.get("ehr"),
        "train_config": cfg.train.model_dump(mode="json"),
        "seed": cfg.run.seed,
        "var_y": (float(np.nanvar(y_fit)) or 1.0) if task == "regression" and len(y_fit) else 1.0,
    }


def build_from_meta(meta: dict):
    """Rebuild the (untrained) fusion method described by ``model_meta.json``."""
    from raypipe.config import TrainConfig
    from raypipe.fusion.registry import build_method
    from raypipe.fusion.base import ModalitySpec

    specs = [ModalitySpec(m, tuple(meta["shapes"][m])) for m in meta["modalities"]]
    return build_method(meta["method"], specs, meta["task"], meta["n_outputs"],
                        TrainConfig.model_validate(meta["train_config"]))


def load_trained(run_dir: str):
    """(method in eval mode, meta) from a run directory or a checkpoint directory."""
    import torch

    with open(os.path.join(run_dir, META_FILE)) as fh:
        meta = json.load(fh)
    method = build_from_meta(meta)
    state = torch.load(os.path.join(run_dir, MODEL_FILE), map_location="cpu", weights_only=True)
    method.load_state_dict(state)
    method.eval()
    return method, meta


# ----------------------------------------------------------------------------- worker loop
def all_gather_objects(obj):
    """Every DDP rank's ``obj`` in rank order (``[obj]`` outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _all_reduce_sum(tensor):
    """Sum a (CPU) statistics tensor over the workers; NCCL needs it on the GPU and back."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    if dist.get_backend() == "nccl":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        return on_gpu.to(tensor.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


#: batch size of the fixed-order passes (validation, hook statistics), as in ``loop.fit``
EVAL_BATCH = 512


def _set_report_log_level(level: str) -> None:
    """Give Ray Train V2's per-report console line the level of its other messages.

    Every ``ray.train.report`` is logged at INFO with the whole metrics dict, by a logger named
    after its source file: outside the ``ray.train`` hierarchy that ``LoggingConfig`` governs.
    """
    try:
        from ray.train.v2._internal.execution import context as v2_context
    except ImportError:  # another Ray layout: nothing to adjust
        return
    logging.getLogger(v2_context.__file__).setLevel(level)


#: without a terminal, ``raypipe train`` logs the first epoch, each new best, every this many and the last
SPARSE_EPOCH_LINES = 5


def logs_epoch(mode: bool | str, epoch: int, first: bool, improved: bool, last: bool) -> bool:
    """Whether rank 0 logs epoch ``epoch`` (1-based): ``mode`` True every epoch, False none, ``"sparse"``
    the first of the run (or of a resumed run), a new best, every :data:`SPARSE_EPOCH_LINES`-th, the last."""
    if mode == "sparse":
        return first or improved or last or epoch % SPARSE_EPOCH_LINES == 0
    return bool(mode)


def _epoch_line(record: dict, epochs: int, main: str, best: float, method: str = "") -> str:
    """One short progress line per epoch (rank 0 of ``raypipe train``)."""
    loss = record.get("train_loss")
    val = record.get(f"val_{main}")
    parts = [f"{method} epoch {record['epoch']}/{epochs}".lstrip()]
    if isinstance(loss, (int, float)):
        parts.append(f"train loss {loss:.4f}")
    if isinstance(val, (int, float)):
        parts.append(f"val {main} {val:.4f}" + (f" (best {best:.4f})" if np.isfinite(best) else ""))
    parts.append(f"{record['seconds']:.1f}s")
    return ", ".join(parts)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: the same loop as `loop.fit`, fed by dataset shards."""
    import ray.train
    import ray.train.torch
    import torch

    from raypipe import console
    from raypipe.train import loop
    from raypipe.train import metrics as M

    console.worker_setup()  # raypipe's lines (the epoch line) reach the driver's console marked
    _set_report_log_level(config.get("train_log_level", "WARNING"))
    meta = config["meta"]
    tc = meta["train_config"]
    modalities, task = meta["modalities"], meta["task"]
    shapes = {m: tuple(s) for m, s in meta["shapes"].items()}
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(meta["seed"] + rank)
    np.random.seed(meta["seed"] + rank)
    device = ray.train.torch.get_device()

    method = build_from_meta(meta)
    optimizer = loop.make_optimizer(method, tc["lr"], tc["weight_decay"])
    start_epoch, history, best, since_best = 0, [], -np.inf, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # resume after a failure: same state as when the checkpoint was taken
        with ckpt.as_directory() as d:
            method.load_state_dict(torch.load(os.path.join(d, MODEL_FILE), map_location="cpu", weights_only=True))
            st = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
            optimizer.load_state_dict(st["optimizer"])
            start_epoch, history, best, since_best = st["epoch"] + 1, st["history"], st["best"], st["since_best"]
            if st.get("method_state") is not None:
                method.load_extra_state(st["method_state"])
        log.info("worker %d resumed from epoch %d", rank, start_epoch)
    resumed_from = start_epoch if ckpt is not None else None
    # Some parameters sit out some steps (e.g. OmniFuse's TLA view, G-Blend's heads): let DDP know.
    model = ray.train.torch.prepare_model(method, parallel_strategy_kwargs={"find_unused_parameters": True})
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, tc["epochs"]))
    for _ in range(start_epoch):
        scheduler.step()
    label_columns = meta["label_columns"]

    # A shard that fits in memory is read once and kept as arrays (re-executing the dataset every
    # epoch costs seconds of scheduling for small cohorts); a larger one streams every epoch.
    cache: dict[str, dict[str, np.ndarray] | None] = {}
    cache_limit = int(config.get("cache_bytes", 2 * 1024**3))

    feed = config.get("feed")  # {"train": ObjectRef, "val": ObjectRef} of Arrow tables, or None (Ray Data)
    world = ctx.get_world_size()

    def _load(name: str) -> dict[str, np.ndarray] | None:
        if name not in cache and feed is not None:
            # this worker's share: every world-th row from its rank, the same count on every worker
            # (as Ray Data's equal streaming split: DDP needs the same number of batches everywhere)
            table = ray.get(feed[name])
            idx = rank + world * np.arange(table.num_rows // world)
            cache[name] = table_to_arrays(table.take(pa.array(idx)), modalities, shapes, label_columns)
        if name not in cache:
            shard = ray.train.get_dataset_shard(name)
            parts, size = [], 0
            for b in shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
                parts.append(table_to_arrays(b, modalities, shapes, label_columns))
                size += sum(v.nbytes for v in parts[-1].values())
                if size > cache_limit:
                    parts = None
                    break
            cache[name] = None if parts is None else (
                {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None)
        return cache[name]

    def batches(name: str, shuffle_seed: int | None):
        arrays = _load(name)
        # training batches of train.batch_size; fixed-order passes (validation, the hooks' mining over the
        # training split) in batches of 512 like the framework-free loop: same results, 8x fewer calls
        bs = tc["batch_size"] if shuffle_seed is not None else max(tc["batch_size"], EVAL_BATCH)
        if arrays is None:  # stream
            shard = ray.train.get_dataset_shard(name)
            kwargs = {}
            if shuffle_seed is not None:
                kwargs = {"local_shuffle_buffer_size": 4 * bs, "local_shuffle_seed": shuffle_seed}
            for b in shard.iter_batches(batch_size=bs, batch_format="pyarrow", **kwargs):
                yield arrays_to_torch(table_to_arrays(b, modalities, shapes, label_columns), modalities, task, device)
            return
        n = len(arrays["mask"])
        order = np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None else np.arange(n)
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            yield arrays_to_torch({k: v[idx] for k, v in arrays.items()}, modalities, task, device)

    hook_ctx = loop.HookContext(all_reduce=_all_reduce_sum, world_size=ctx.get_world_size(), rank=rank,
                                train_batches=lambda: batches("train", None), val_batches=lambda: batches("val", None),
                                p_drop=tc["p_drop"], seed=meta["seed"])
    if task == "regression":
        method.set_label_variance(meta.get("var_y", 1.0))
    main = M.main_metric_name(task)
    if start_epoch and loop.stops_early(method, since_best, tc["patience"]):
        # the checkpoint is that of a run which had already stopped early: nothing left to train
        log.info("worker %d: the resumed run had stopped early at epoch %d", rank, start_epoch)
        return
    every = int(config.get("checkpoint_every", 1))
    upload = (ray.train.CheckpointUploadMode.ASYNC if config.get("checkpoint_async", True)
              else ray.train.CheckpointUploadMode.SYNC)
    persisted = start_epoch  # the last epoch whose checkpoint was handed to Ray Train
    for epoch in range(start_epoch, tc["epochs"]):
        t0 = time.perf_counter()
        stats = loop.train_epoch(model, batches("train", meta["seed"] * 1000 + epoch), optimizer, hook_ctx, epoch,
                                 precision=tc.get("precision", "auto"))
        scheduler.step()
        y_val, p_val = loop.predict_arrays(model, batches("val", None))
        gathered = all_gather_objects((y_val, p_val))
        y_all = np.concatenate([g[0] for g in gathered])
        p_all = np.concatenate([g[1] for g in gathered])
        val = M.compute_metrics(task, y_all, p_all)
        score = float(val.get(main, np.nan))
        improved = score > best + 1e-6
        if improved:
            best, since_best = score, 0
        else:
            since_best += 1
        record = {"epoch": epoch + 1, "seconds": time.perf_counter() - t0,
                  **{f"train_{k}": v for k, v in stats.items() if isinstance(v, (int, float))},
                  **{f"val_{k}": v for k, v in val.items()}}
        if "tla" in stats:
            record["tla"] = stats["tla"]
        if resumed_from is not None and epoch == start_epoch:
            record["resumed_from_epoch"] = resumed_from  # the last persisted epoch a restarted worker loaded
        # every worker must have taken the same hook decisions (lazy subset, blend weights...)
        states = all_gather_objects(json.dumps(method.extra_state(), sort_keys=True, default=str))
        record["workers_agree"] = len(set(states)) == 1
        history.append(record)
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        metrics["best_val"] = best
        # Persist every k epochs, at a new best (Ray keeps the best checkpoints by score: the model
        # the run hands out) and at the last epoch (final or early-stopped); the same decision on
        # every worker (the metric was all-gathered). Only persisted epochs are reported: the
        # others are in history.json, and every report costs a controller poll.
        # early stop: the classifier's patience ran out and the method does not hold it (OmniFuse's
        # imp_patience: the cascade still improves; its NMSE was all-reduced, so every worker agrees)
        stop = loop.stops_early(method, since_best, tc["patience"])
        last = epoch + 1 == tc["epochs"] or stop
        if rank == 0 and logs_epoch(config.get("log_epochs", True), epoch + 1, epoch == start_epoch, improved, last):
            log.info("%s", _epoch_line(record, tc["epochs"], main, best, meta.get("method", "")))
        if improved or last or (epoch + 1) % every == 0:
            checkpoint = None
            if rank == 0:
                tmp = tempfile.mkdtemp(prefix="raypipe-ckpt-")  # removed by Ray once uploaded
                unwrapped = model.module if hasattr(model, "module") else model
                torch.save(unwrapped.state_dict(), os.path.join(tmp, MODEL_FILE))
                torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch, "history": history, "best": best,
                            "since_best": since_best, "method_state": unwrapped.extra_state()},
                           os.path.join(tmp, STATE_FILE))
                with open(os.path.join(tmp, META_FILE), "w") as fh:
                    json.dump({**meta, "epoch": epoch + 1, "val": val}, fh, indent=2, default=float)
                with open(os.path.join(tmp, "history.json"), "w") as fh:
                    json.dump(history, fh, indent=2, default=float)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            persisted = epoch + 1
            # ASYNC: the copy to storage runs in the worker's upload thread, the next epoch starts now
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch + 1:04d}",
                             checkpoint_upload_mode=upload, delete_local_checkpoint_after_upload=True)
        fault = config.get("fault_injection")
        if fault and epoch + 1 == fault["epoch"] and rank == fault.get("rank", 0) and not os.path.exists(fault["marker"]):
            open(fault["marker"], "w").close()  # once: the restarted worker must not die again
            if persisted:  # die after the controller registered the last persisted checkpoint: a known resume point
                _wait_registered(persisted)
            os.kill(os.getpid(), 9)  # SIGKILL, as a crashed node would
        if stop:  # same decision on every worker: the metric was all-gathered
            break


def _wait_registered(epoch: int, timeout_s: float = 120.0) -> None:
    """Fault injection only: wait until Ray Train's controller has registered ``epoch``'s checkpoint.

    A checkpoint counts for a restart once the controller lists it in the run's
    ``checkpoint_manager_snapshot.json`` (docs/cluster.md); the test's crash comes after that.
    Local storage only (the tests').
    """
    import ray.train

    path = os.path.join(ray.train.get_context().get_storage().experiment_fs_path, "checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(path) as fh:
                latest = json.load(fh).get("latest_checkpoint_result") or {}
            if int(latest.get("metrics", {}).get("epoch", 0)) >= epoch:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    log.warning("checkpoint of epoch %d not registered after %.0f s", epoch, timeout_s)


# ----------------------------------------------------------------------------- driver
def _dataset_for(path: str, ids: set[str]):
    import ray.data

    wanted = pa.array(sorted(ids))

    def keep(batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        return batch.filter(pc.is_in(batch.column("sample_id"), value_set=wanted))

    return ray.data.read_parquet(path).map_batches(keep, batch_format="pyarrow", zero_copy_batch=True)


#: train.feed=auto feeds the workers from memory up to this size of the input table (uncompressed)
MEMORY_FEED_BYTES = 256 * 1024**2


def _parquet_bytes(path: str) -> int:
    """Uncompressed size of a Parquet table (its row groups' metadata; nothing else is read)."""
    import pyarrow.dataset as pads

    total = 0
    for frag in pads.dataset(path, format="parquet").get_fragments():
        md = frag.metadata
        total += sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
    return total


def _read_rows(path: str, ids: set[str]) -> pa.Table:
    """The rows of ``ids`` of a Parquet table, in id order."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    table = pads.dataset(path, format="parquet").to_table(filter=pc.field("sample_id").isin(pa.array(sorted(ids))))
    return table.sort_by("sample_id")


def fit_torch_trainer(cfg: Config, meta: dict, train_ids: set[str], val_ids: set[str], name: str,
                      storage_path: str, fault_injection: dict | None = None, log_epochs: bool | str = True):
    """Build (:func:`build_torch_trainer`) and fit the V2 ``TorchTrainer`` of one training run; returns
    Ray Train's ``Result``.

    ``log_epochs``: rank 0 logs one line per epoch (off for Tune's folds, whose trials report
    to Tune instead); ``"sparse"``: the first epoch, each new best, every
    :data:`SPARSE_EPOCH_LINES` and the last (``raypipe train`` without a terminal). Ray Train's own
    console messages follow ``ray.train_log_level``.

    Also the unit of work of a Tune trial's fold (``raypipe.tune.search``): Tune's function
    trainable calls this, never passes a trainer to the ``Tuner``. ``fault_injection``
    ({"epoch", "marker", "rank"}) kills a worker once at that epoch: the fault-tolerance test.
    """
    trainer = build_torch_trainer(cfg, meta, train_ids, val_ids, name, storage_path, fault_injection, log_epochs)
    _start_autoscaling_coordinator()
    cleaner = "PlacementGroupCleanerCallback" not in getattr(trainer, "left_out", ())
    with _environment(ray_train_env()), (contextlib.nullcontext() if cleaner else _placement_groups_removed_on_failure()):
        return trainer.fit()


@contextlib.contextmanager
def _placement_groups_removed_on_failure():
    """Without Ray Train's placement group cleaner (:func:`callbacks_left_out`): when the block fails,
    remove the placement groups created during it that are still there. A controller that shuts
    down removes its own; one that died (killed, out of memory) left its workers' reservation, which
    would hold those CPUs until this process ends. It removes every placement group created while the
    block ran, whoever created it (Ray's public table does not say which actor did): right on the
    one-machine Ray that ``init_ray`` started, where raypipe runs its fits one at a time; a program
    that creates its own placement groups from another thread during a fit should join a Ray it
    started itself (``ray.init()`` before raypipe: Ray's own cleaner is then kept)."""
    from ray.util import placement_group_table

    before = set(placement_group_table())
    try:
        yield
    except BaseException:
        try:
            from ray._raylet import PlacementGroupID
            from ray.util.placement_group import PlacementGroup, remove_placement_group

            for pg_id, info in placement_group_table().items():
                if pg_id not in before and info.get("state") != "REMOVED":
                    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
                    log.info("removed the placement group of a failed fit (%s)", pg_id)
        except Exception as exc:  # the fit's own error is the one to raise
            log.warning("could not remove the placement groups of a failed fit: %s", exc)
        raise


#: How often Ray Train's controller polls the workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, Ray's
#: default 2 s). The controller learns of a report, and of the end of the run, only at a poll: with
#: 2 s a run ended ~2.6 s after its last epoch (the last report at one poll, the end at the next),
#: and a report waits in the worker's one-slot queue until then. A poll is one small actor call.
CONTROLLER_POLL_S = 0.25


def ray_train_env() -> dict[str, str]:
    """The Ray Train settings (environment variables, which the driver hands to the controller and the
    workers) a fit runs with, less those this process's environment already sets: those win.

    - the controller's poll interval, :data:`CONTROLLER_POLL_S`;
    - on the local Ray that ``init_ray`` started (one machine), no preemption watcher: that actor
      process, started with every worker group, moves the workers off a node being drained, and
      a one-machine Ray has no other node.
    """
    from raypipe.runtime import on_own_local_ray

    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(CONTROLLER_POLL_S)}
    if on_own_local_ray():
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return {k: v for k, v in env.items() if k not in os.environ}


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """Set ``env`` in os.environ for the duration of the block (Ray Train reads it when fit starts)."""
    os.environ.update(env)
    try:
        yield
    finally:
        for k in env:
            os.environ.pop(k, None)


def _start_autoscaling_coordinator() -> None:
    """Create Ray Data's AutoscalingCoordinator actor now, if this cluster has none yet.

    Ray Train's controller asks it for the workers' resources as soon as it has started, and waits for
    the answer; on a cluster's first fit that meant waiting for the actor's process to start and import
    after the controller's own. Created here (the same named, detached actor, with the options Ray
    gives it), its start-up overlaps the controller's. Another Ray layout: nothing to do.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return
    try:
        get_or_create_autoscaling_coordinator()
    except Exception as exc:  # the controller creates it itself then
        log.debug("AutoscalingCoordinator not created ahead of the controller: %s", exc)


#: Ray Train's default callbacks raypipe may leave out of a fit, by class name: where Ray 2.60 defines them
_LEAVABLE_CALLBACKS = {
    "DatasetsCallback": "ray.train.v2._internal.callbacks.datasets",
    "PlacementGroupCleanerCallback": "ray.train.v2._internal.callbacks.placement_group_callback",
}
_TRAINER_CLASSES: dict[tuple[str, ...], type] = {}


def callbacks_left_out(with_datasets: bool) -> tuple[str, ...]:
    """Ray Train's default callbacks (class names) a fit leaves out, each an actor process per fit:

    - ``DatasetsCallback`` without Ray Datasets (the in-memory feed): it starts a DatasetManager actor
      for no dataset;
    - ``PlacementGroupCleanerCallback`` on the one-machine Ray that ``init_ray`` started in this
      process (:func:`raypipe.runtime.on_own_local_ray`, the driver). Its detached actor removes the
      workers' placement group should the controller die without shutting down, while the job lives
      on (a Tune trial's fit killed with its trial). Here the job is this process and its Ray ends
      with it; a fit that fails meanwhile has its placement group removed by
      :func:`fit_torch_trainer`. The cost it saves: a third process start (Ray Train's imports, ~2
      CPU-s) beside the worker's on the worker's critical path, a state-API query every second
      while training, and up to ~1 s at the end of every fit (``stop`` waits out its 1 s check).
      Tune's trials (their own processes) and a joined cluster keep it.
    """
    from raypipe.runtime import on_own_local_ray

    out = []
    if not with_datasets:
        out.append("DatasetsCallback")
    if on_own_local_ray():
        out.append("PlacementGroupCleanerCallback")
    return tuple(out)


def _trainer_class(left_out: tuple[str, ...]):
    """``TorchTrainer``, or a subclass whose fits run without Ray Train's default callbacks named in
    ``left_out`` (:func:`callbacks_left_out`); one that this Ray does not define is not left out."""
    import importlib

    from ray.train.torch import TorchTrainer

    classes = []
    for name in left_out:
        try:
            classes.append(getattr(importlib.import_module(_LEAVABLE_CALLBACKS[name]), name))
        except (ImportError, AttributeError):  # another Ray layout: that callback stays
            continue
    if not classes:
        return TorchTrainer
    key = tuple(c.__name__ for c in classes)
    if key not in _TRAINER_CLASSES:
        drop = tuple(classes)

        class _RaypipeTorchTrainer(TorchTrainer):
            """A ``TorchTrainer`` without some of Ray Train's default callbacks (``left_out``)."""

            left_out = key

            def _create_default_callbacks(self):
                return [c for c in super()._create_default_callbacks() if not isinstance(c, drop)]

        _TRAINER_CLASSES[key] = _RaypipeTorchTrainer
    return _TRAINER_CLASSES[key]


def build_torch_trainer(cfg: Config, meta: dict, train_ids: set[str], val_ids: set[str], name: str,
                        storage_path: str, fault_injection: dict | None = None, log_epochs: bool | str = True):
    """The V2 ``TorchTrainer`` of one training run (arguments as :func:`fit_torch_trainer`), not fitted.

    From ``cfg.train``: workers, GPUs, the feed (``train.feed``), the checkpoint cadence and upload
    mode (``train.checkpoint_every``, ``train.checkpoint_async``) and ``FailureConfig(max_failures=
    train.max_failures)``.
    """
    import ray
    import ray.train

    from raypipe.train import metrics as M

    from raypipe.runtime import actor_cpus, cluster_resources

    main = M.main_metric_name(meta["task"])
    # Workers must leave a CPU for Ray Data's read tasks, or the dataset feed never starts.
    cpus = cluster_resources()["CPU"]
    per_worker = {"CPU": actor_cpus(cfg.train.num_workers, cpus) if cpus else 1.0}
    tc = cfg.train
    feed, datasets = None, None
    if tc.feed == "memory" or (tc.feed == "auto" and _parquet_bytes(cfg.train_input) <= MEMORY_FEED_BYTES):
        # the splits' rows, read once here into the object store (on the driver's node, so they
        # outlive a lost worker node); each worker takes its share (train_loop_per_worker)
        feed = {"train": ray.put(_read_rows(cfg.train_input, train_ids)),
                "val": ray.put(_read_rows(cfg.train_input, val_ids))}
    else:
        datasets = {"train": _dataset_for(cfg.train_input, train_ids), "val": _dataset_for(cfg.train_input, val_ids)}
    trainer = _trainer_class(callbacks_left_out(datasets is not None))(
        train_loop_per_worker,
        train_loop_config={"meta": meta, "fault_injection": fault_injection, "log_epochs": log_epochs,
                           "train_log_level": cfg.ray.train_log_level, "feed": feed,
                           "checkpoint_every": tc.checkpoint_every, "checkpoint_async": tc.checkpoint_async},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=f"val_{main}",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=cfg.ray.train_log_level)),
        datasets=datasets,
    )
    return trainer


#: train settings that do not change what a run computes (left out of the run name's fingerprint)
RUN_ONLY_KEYS = ("checkpoint_every", "checkpoint_async", "max_failures", "feed")


def train_run_name(cfg: Config, meta: dict, ids: dict[str, set]) -> str:
    """The Ray Train run name: ``<run.name>-<method>-<fingerprint>``.

    Ray Train V2 resumes a run it finds again under the same storage path and name, which is
    what a crashed or interrupted ``raypipe train`` wants (the same command continues). The
    fingerprint (model metadata incl. the train config, seed and embedding spec, and the split's
    sample ids) makes a changed config or a changed table start a new run instead of resuming
    an old one whose checkpoints do not fit.
    """
    from raypipe.config import fingerprint

    keep = {k: v for k, v in meta.items() if k not in ("var_y",)}
    # how a run is checkpointed, retried and fed does not change what it computes: the same run
    keep["train_config"] = {k: v for k, v in (meta.get("train_config") or {}).items() if k not in RUN_ONLY_KEYS}
    data = {"meta": keep, "split": {s: sorted(v) for s, v in sorted(ids.items())}, "input": cfg.train_input}
    return f"{cfg.run.name}-{cfg.train.method}-{fingerprint(data)}"


def run_train(cfg: Config) -> dict:
    """Train ``cfg.train.method`` with Ray Train V2 and evaluate the best checkpoint on the test split."""
    from raypipe.runtime import init_ray
    from raypipe.train.evaluate import evaluate_test

    # everything that can be wrong with the input fails here, before Ray starts
    table = read_embeddings(cfg.train_input, cfg.ingest.label_columns)
    task, n_outputs = infer_task(table.y, cfg.train.task)
    split = assign_splits(table, cfg)
    run_dir = cfg.train_dir()
    os.makedirs(run_dir, exist_ok=True)
    meta = model_meta(cfg, table, task, n_outputs, fit_rows=split == "train")
    pa_split = pa.table({"sample_id": table.sample_id, "split": split})
    import pyarrow.parquet as pq

    pq.write_table(pa_split, os.path.join(run_dir, "split.parquet"))
    ids = {s: set(table.sample_id[split == s]) for s in ("train", "val", "test")}
    log.info("train %s on %d/%d/%d samples (train/val/test), task %s, modalities %s", cfg.train.method,
             len(ids["train"]), len(ids["val"]), len(ids["test"]), task, table.modalities)

    from raypipe.train import metrics as M

    main = M.main_metric_name(task)
    name = train_run_name(cfg, meta, ids)
    rctx = init_ray(cfg)
    import ray.data

    # The per-epoch feed of a small table is instant; its progress bars would only bury the
    # epoch lines, so they are off while training and restored afterwards.
    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    t0 = time.perf_counter()
    try:
        from raypipe import console

        # a line per epoch on a terminal; into a pipe or log file the first, the new bests, every 5th, the last
        result = fit_torch_trainer(cfg, meta, ids["train"], ids["val"], name, rctx.results_dir,
                                   log_epochs=True if console.interactive(cfg) else "sparse")
    finally:
        ctx.enable_progress_bars = bars
    fit_seconds = time.perf_counter() - t0
    best = result.get_best_checkpoint(f"val_{main}", "max") or result.checkpoint
    if best is None:
        raise RuntimeError(f"training produced no checkpoint (see {rctx.results_dir}/{name})")
    with best.as_directory() as d:
        for f in (MODEL_FILE, META_FILE):
            shutil.copy(os.path.join(d, f), os.path.join(run_dir, f))
    if result.checkpoint is not None:  # the full history lives in the last checkpoint
        with result.checkpoint.as_directory() as d:
            shutil.copy(os.path.join(d, "history.json"), os.path.join(run_dir, "history.json"))

    method, _ = load_trained(run_dir)
    test = table.take(split == "test")
    from raypipe.train import loop

    predict_fn = loop.make_predict_fn(method, task)
    groups = {k: v for k, v in test.groups.items() if k in cfg.ingest.group_columns}
    test_metrics, natural = evaluate_test(predict_fn, test.x, test.mask, test.y, task, table.modalities, groups,
                                          seed=cfg.run.seed, gap_threshold=cfg.report.subgroup_gap_threshold)
    metrics_doc = {"method": cfg.train.method, "task": task, "modalities": table.modalities, "main_metric": main,
                   "n": {k: len(v) for k, v in ids.items()}, "fit_seconds": fit_seconds, "test": test_metrics}
    with open(os.path.join(run_dir, "metrics.json"), "w") as fh:
        json.dump(metrics_doc, fh, indent=2, default=float)
    _write_test_predictions(os.path.join(run_dir, "predictions_test.parquet"), test, natural)
    proj = imputation_projection(method, test)
    if proj is not None:
        proj.to_parquet(os.path.join(run_dir, "projection.parquet"), index=False)
    from raypipe.config import dump_config

    with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
        fh.write(dump_config(cfg))
    return {"ok": True, "method": cfg.train.method, "run_dir": os.path.abspath(run_dir),
            f"test_{main}": test_metrics["natural"].get(main), "fit_seconds": round(fit_seconds, 1),
            "epochs": len(json.load(open(os.path.join(run_dir, "history.json"))))}


def imputation_projection(method, test: EmbeddingTable, max_samples: int = 500):
    """PCA (2-D) of each modality's observed encoding vs its imputation when hidden (OmniFuse Fig. 8).

    Uses test samples that have every modality: the observed slice of v comes from the full input,
    the imputed one from v' with that modality masked. None for methods without imputation.
    """
    import pandas as pd
    import torch

    if not getattr(method, "use_imp_forward", False):
        return None
    full = np.flatnonzero(test.mask.all(axis=1))[:max_samples]
    if len(full) < 3:
        return None
    x = {m: torch.as_tensor(v[full], dtype=torch.float32) for m, v in test.x.items()}
    d = method.hidden_dim
    rows = []
    with torch.no_grad():
        mask = torch.ones(len(full), len(test.modalities), dtype=torch.bool)
        v_obs = torch.cat(method.encode(x, mask), dim=1)
        for i, m in enumerate(test.modalities):
            hidden = mask.clone()
            hidden[:, i] = False
            v_imp, _ = method.impute(torch.cat(method.encode(x, hidden), dim=1))
            both = torch.cat([v_obs[:, i * d:(i + 1) * d], v_imp[:, i * d:(i + 1) * d]]).numpy()
            centred = both - both.mean(0)
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            xy = centred @ vt[:2].T
            for j, kind in enumerate(["observed"] * len(full) + ["imputed"] * len(full)):
                rows.append({"modality": m, "kind": kind, "x": float(xy[j, 0]), "y": float(xy[j, 1])})
    return pd.DataFrame(rows)


def _write_test_predictions(path: str, test: EmbeddingTable, natural: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    cols: dict[str, Any] = {"sample_id": test.sample_id}
    y = test.y
    cols["label"] = y if y.ndim == 1 else list(y)
    cols["probabilities"] = list(np.asarray(natural["probabilities"], np.float32))
    for k, v in natural.items():
        if k.startswith("weight_") or k.startswith("imputed_"):
            cols[k] = np.asarray(v)
    for i, m in enumerate(test.modalities):
        cols[f"mask_{m}"] = test.mask[:, i]
    pq.write_table(pa.table(cols), path)

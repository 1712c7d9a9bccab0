"""Cross-modal retrieval on Ray: `raypipe retrieve fit` and `raypipe retrieve query`.

Flow (docs/retrieve.md)::

    embeddings table --split (table's split column, else a seeded holdout)--> train / val / test
    fit:   TorchTrainer(workers x [projection heads, DDP, symmetric InfoNCE per pair]) -> <out>/model
    query: Ray Data read_parquet -> map_batches(Projector, ActorPoolStrategy) -> projections
           -> HNSW index (hnswlib) over the target modality of every row, exact search beside it
           -> hits.parquet (query_id, rank, hit_id, score), metrics.json, report.html

The maths (heads, loss, ranks, metrics) is in :mod:`raypipe.retrieve.align`.
Every output file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa

from raypipe.config import Config
from raypipe.train.trainer import all_gather_objects

log = logging.getLogger(__name__)

MODEL_FILE = "aligner.pt"
META_FILE = "aligner_meta.json"
SPLIT_FILE = "split.parquet"


# ----------------------------------------------------------------------------- paths and small helpers
def retrieve_input(cfg: Config) -> str:
    return cfg.retrieve.input or cfg.train_input


def retrieve_dir(cfg: Config) -> str:
    return cfg.retrieve.out or cfg.path("retrieve")


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _atomic_write_parquet(path: str, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def retrieval_splits(sample_id: np.ndarray, split_column: np.ndarray | None, test_fraction: float,
                     val_fraction: float, seed: int) -> np.ndarray:
    """"train"/"val"/"test" per row: test from the table's split column (else a seeded holdout of
    ``test_fraction``), val carved from the rest; grouped by sample id, deterministic in ``seed``."""
    from raypipe.train.splits import holdout_mask

    n = len(sample_id)
    if split_column is not None and np.isin(split_column, ["test"]).any():
        test = split_column == "test"
    else:
        test = holdout_mask(sample_id, np.zeros(n), fraction=test_fraction, seed=seed)
    split = np.where(test, "test", "train").astype(object)
    rest = np.flatnonzero(~test)
    val = holdout_mask(sample_id[rest], np.zeros(len(rest)), fraction=val_fraction, seed=seed + 1)
    split[rest[val]] = "val"
    return split.astype(str)


def build_aligner(meta: dict):
    from raypipe.retrieve.align import CrossModalAligner

    model = CrossModalAligner({m: int(np.prod(s)) for m, s in meta["shapes"].items()},
                              [tuple(p) for p in meta["pairs"]], dim=meta["dim"], hidden=meta["hidden"],
                              temperature=meta["temperature"])
    for m, st in (meta.get("standardisation") or {}).items():
        model.heads[m].set_standardisation(st["mean"], st["std"])
    return model


def load_aligner(model_dir: str):
    """(aligner in eval mode, meta) from ``<retrieve out>/model``."""
    import torch

    if not os.path.isfile(os.path.join(model_dir, META_FILE)):
        raise FileNotFoundError(f"{model_dir} holds no fitted retrieval model ({META_FILE}): run "
                                "`raypipe retrieve fit` first")
    with open(os.path.join(model_dir, META_FILE)) as fh:
        meta = json.load(fh)
    model = build_aligner(meta)
    model.load_state_dict(torch.load(os.path.join(model_dir, MODEL_FILE), map_location="cpu", weights_only=True))
    model.eval()
    return model, meta


# ----------------------------------------------------------------------------- fit: Ray Train worker loop
def _arrays(batch: pa.Table, modalities, shapes) -> dict[str, np.ndarray]:
    from raypipe.train.tables import table_to_arrays

    return table_to_arrays(batch, modalities, shapes, [])


def align_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: shuffled batches of the shard, symmetric InfoNCE, AdamW, DDP."""
    import ray.train
    import ray.train.torch
    import torch

    from raypipe import console

    console.worker_setup()
    meta = config["meta"]
    mods = sorted({m for p in meta["pairs"] for m in p})
    shapes = {m: tuple(meta["shapes"][m]) for m in mods}
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(meta["seed"])  # the same initial heads on every worker (DDP broadcasts rank 0's anyway)
    device = ray.train.torch.get_device()

    def load(name: str) -> dict[str, np.ndarray]:
        parts = [_arrays(b, mods, shapes) for b in ray.train.get_dataset_shard(name).iter_batches(
            batch_size=4096, batch_format="pyarrow")]
        if not parts:
            return {"mask": np.zeros((0, len(mods)), bool), **{f"x_{m}": np.zeros((0, *shapes[m]), np.float32)
                                                              for m in mods}}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    data = {"train": load("train"), "val": load("val")}

    def to_torch(a: dict, idx: np.ndarray):
        x = {m: torch.as_tensor(a[f"x_{m}"][idx], device=device) for m in mods}
        present = {m: torch.as_tensor(a["mask"][idx, i], device=device) for i, m in enumerate(mods)}
        return x, present

    aligner = build_aligner(meta)
    model = ray.train.torch.prepare_model(aligner, parallel_strategy_kwargs={"find_unused_parameters": True})
    unwrapped = model.module if hasattr(model, "module") else model
    opt = torch.optim.AdamW(model.parameters(), lr=meta["lr"], weight_decay=meta["weight_decay"])
    bs = meta["batch_size"]
    best, since_best, history = np.inf, 0, []
    # every worker runs the same number of steps (DDP all-reduces each one): the largest shard's count
    n_train = len(data["train"]["mask"])
    steps = max(1, max(int(np.ceil(n / bs)) for n in all_gather_objects(n_train)))
    for epoch in range(meta["epochs"]):
        t0 = time.perf_counter()
        model.train()
        order = np.random.default_rng([meta["seed"], epoch, rank]).permutation(n_train)
        losses = []
        for s in range(steps):
            idx = order[(s * bs) % max(n_train, 1):][:bs] if n_train else order
            x, present = to_torch(data["train"], idx)
            loss = model(x, present)  # through the DDP wrapper: gradients are all-reduced
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.eval()
        val_loss, val_n = 0.0, 0
        with torch.no_grad():
            nv = len(data["val"]["mask"])
            for s in range(0, nv, bs):
                x, present = to_torch(data["val"], np.arange(s, min(s + bs, nv)))
                lv, _ = unwrapped.loss(x, present)
                val_loss += float(lv) * (min(s + bs, nv) - s)
                val_n += min(s + bs, nv) - s
        tot = all_gather_objects((val_loss, val_n))
        val = sum(t[0] for t in tot) / max(1, sum(t[1] for t in tot))
        improved = val < best - 1e-4  # a loss of order log(batch): smaller changes are noise
        best, since_best = (val, 0) if improved else (best, since_best + 1)
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val,
                  "temperature": float(1.0 / unwrapped.logit_scale().detach()), "seconds": time.perf_counter() - t0}
        history.append(record)
        if rank == 0:
            log.info("retrieve fit epoch %d/%d, train loss %.4f, val loss %.4f (best %.4f), temperature %.4f, %.1fs",
                     epoch + 1, meta["epochs"], record["train_loss"], val, best, record["temperature"],
                     record["seconds"])
        last = epoch + 1 == meta["epochs"] or since_best >= meta["patience"]
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            # a checkpoint when the validation loss improved (the best model) and at the end (the history)
            if rank == 0 and (improved or last):
                torch.save(unwrapped.state_dict(), os.path.join(tmp, MODEL_FILE))
                with open(os.path.join(tmp, META_FILE), "w") as fh:
                    json.dump({**meta, "epoch": epoch + 1, "val_loss": val}, fh, indent=2)
                with open(os.path.join(tmp, "history.json"), "w") as fh:
                    json.dump(history, fh, indent=2)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            # Ray Train V2's report is a synchronisation point (about 2 s on a 2-core machine):
            # report when there is a checkpoint to keep, log the other epochs only
            if improved or last:
                ray.train.report({**record, "best_val_loss": best}, checkpoint=checkpoint,
                                 checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
        if last:
            break


def _dataset_for(path: str, ids: set[str]):
    import ray.data

    wanted = pa.array(sorted(ids))

    def keep(batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        return batch.filter(pc.is_in(batch.column("sample_id"), value_set=wanted))

    return ray.data.read_parquet(path).map_batches(keep, batch_format="pyarrow", zero_copy_batch=True)


def run_retrieve_fit(cfg: Config) -> dict:
    """Fit the projection heads of ``retrieve.pairs`` with Ray Train V2; write ``<retrieve out>/model``."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from raypipe.config import fingerprint
    from raypipe.retrieve.align import parse_pairs
    from raypipe.runtime import actor_cpus, cluster_resources, init_ray
    from raypipe.train.tables import read_embeddings

    rc = cfg.retrieve
    rctx = init_ray(cfg)
    src = retrieve_input(cfg)
    table = read_embeddings(src, [])
    pairs = parse_pairs(rc.pairs)
    lacking = sorted({m for p in pairs for m in p} - set(table.modalities))
    if lacking:
        raise ValueError(f"retrieve.pairs name modalities {lacking} that the embeddings table lacks "
                         f"(it has {table.modalities})")
    split = retrieval_splits(table.sample_id, table.split, cfg.ingest.test_fraction, rc.val_fraction, cfg.run.seed)
    idx = {m: i for i, m in enumerate(table.modalities)}
    usable = np.zeros(len(table), bool)
    for a, b in pairs:
        usable |= table.mask[:, idx[a]] & table.mask[:, idx[b]]
    ids = {s: set(table.sample_id[(split == s) & usable]) for s in ("train", "val", "test")}
    if len(ids["train"]) < 2:
        raise ValueError(f"only {len(ids['train'])} training samples have both modalities of a pair {pairs}: "
                         "nothing to align")
    meta = {"pairs": [list(p) for p in pairs], "shapes": {m: list(table.shapes[m]) for m in sorted({*sum(pairs, ())})},
            "dim": rc.dim, "hidden": rc.hidden, "temperature": rc.temperature, "epochs": rc.epochs,
            "batch_size": rc.batch_size, "lr": rc.lr, "weight_decay": rc.weight_decay, "patience": rc.patience,
            "seed": cfg.run.seed, "embedding_spec": table.spec, "input": os.path.abspath(src)}
    # per-feature mean / std of each modality over the training rows that have it (the heads' input scaling)
    meta["standardisation"] = {}
    for m in meta["shapes"]:
        rows = table.x[m][(split == "train") & table.mask[:, idx[m]]].reshape(-1, int(np.prod(table.shapes[m])))
        meta["standardisation"][m] = {"mean": rows.mean(0).astype(float).tolist(),
                                      "std": rows.std(0).astype(float).tolist()}
    log.info("retrieve fit %s on %d/%d samples (train/val) with both modalities; %d test samples held out",
             ", ".join(f"{a}:{b}" for a, b in pairs), len(ids["train"]), len(ids["val"]), len(ids["test"]))
    name = f"{cfg.run.name}-retrieve-{fingerprint({'meta': meta, 'split': {k: sorted(v) for k, v in ids.items()}})}"
    cpus = cluster_resources()["CPU"]
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    t0 = time.perf_counter()
    try:
        trainer = TorchTrainer(
            align_loop_per_worker, train_loop_config={"meta": meta},
            scaling_config=ray.train.ScalingConfig(num_workers=rc.num_workers, use_gpu=cfg.train.use_gpu,
                                                   resources_per_worker={"CPU": actor_cpus(rc.num_workers, cpus)
                                                                         if cpus else 1.0}),
            run_config=ray.train.RunConfig(
                name=name, storage_path=rctx.results_dir,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_loss",
                                                             checkpoint_score_order="min"),
                failure_config=ray.train.FailureConfig(max_failures=2),
                logging_config=ray.train.LoggingConfig(log_level=cfg.ray.train_log_level)),
            datasets={"train": _dataset_for(src, ids["train"]), "val": _dataset_for(src, ids["val"])})
        result = trainer.fit()
    finally:
        ctx.enable_progress_bars = bars
    seconds = time.perf_counter() - t0
    best = result.get_best_checkpoint("val_loss", "min") or result.checkpoint
    if best is None:
        raise RuntimeError(f"retrieve fit produced no checkpoint (see {rctx.results_dir}/{name})")
    out = os.path.join(retrieve_dir(cfg), "model")
    tmp = out.rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with best.as_directory() as d:
        for f in (MODEL_FILE, META_FILE):
            shutil.copy(os.path.join(d, f), os.path.join(tmp, f))
    with (result.checkpoint or best).as_directory() as d:  # the last checkpoint holds the whole history
        shutil.copy(os.path.join(d, "history.json"), os.path.join(tmp, "history.json"))
    _atomic_write_parquet(os.path.join(tmp, SPLIT_FILE), pa.table({"sample_id": table.sample_id, "split": split}))
    with open(os.path.join(tmp, META_FILE)) as fh:
        best_meta = json.load(fh)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"ok": True, "model_dir": os.path.abspath(out), "pairs": [f"{a}:{b}" for a, b in pairs],
            "n_train": len(ids["train"]), "n_val": len(ids["val"]), "best_epoch": best_meta.get("epoch"),
            "best_val_loss": round(float(best_meta.get("val_loss", np.nan)), 4), "fit_seconds": round(seconds, 1)}


# ----------------------------------------------------------------------------- query: Ray Data projection
class Projector:
    """Ray Data callable class: loads the heads once, projects each row's available modalities."""

    def __init__(self, model_dir: str, modalities: list[str]):
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.model, self.meta = load_aligner(model_dir)
        self.modalities = modalities
        self.shapes = {m: tuple(self.meta["shapes"][m]) for m in modalities}
        self.dim = int(self.meta["dim"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        arrays = _arrays(batch, self.modalities, self.shapes)
        n = batch.num_rows
        split = (batch.column("split") if "split" in batch.column_names else pa.nulls(n, pa.string()))
        cols = {"sample_id": batch.column("sample_id"), "split": split.cast(pa.string())}
        for i, m in enumerate(self.modalities):
            present = arrays["mask"][:, i]
            z = np.zeros((n, self.dim), np.float32)
            if present.any():
                with torch.no_grad():
                    z[present] = self.model.project(m, torch.as_tensor(arrays[f"x_{m}"][present])).numpy()
            cols[f"has_{m}"] = pa.array(present)
            cols[f"z_{m}"] = pa.FixedSizeListArray.from_arrays(pa.array(z.ravel()), self.dim)
        return pa.table(cols)


def project_table(cfg: Config, src: str, model_dir: str, modalities: list[str]) -> pa.Table:
    """Every row of ``src`` projected into the shared space (Ray Data, actor pool), sorted by sample id."""
    import ray.data

    from raypipe.runtime import actor_cpus, cluster_resources

    cpus = cluster_resources()["CPU"]
    pool = cfg.retrieve.pool_size or max(1, int(cpus) - 1)  # leave a CPU for the read tasks
    ds = ray.data.read_parquet(src).map_batches(
        Projector, fn_constructor_kwargs={"model_dir": os.path.abspath(model_dir), "modalities": modalities},
        batch_size=cfg.retrieve.batch_rows, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=pool),
        num_cpus=actor_cpus(pool, cpus))
    parts = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    if not parts:
        raise ValueError(f"the embeddings table at {src} has no rows")
    return pa.concat_tables(parts).sort_by("sample_id")


def _stack(col) -> np.ndarray:
    from raypipe.train.tables import fixed_list_to_numpy

    return fixed_list_to_numpy(col, col.type.list_size)[0]


def build_hnsw(vectors: np.ndarray, m: int, ef_construction: int, seed: int, threads: int = -1,
               batch: int | None = None, progress=None):
    """An inner-product HNSW index (hnswlib) over ``vectors``; labels are row numbers.

    ``batch``: add the rows in slices of this many (same index: rows go in in the same order,
    each slice with ``threads`` threads) and call ``progress(rows_added)`` after each slice.
    """
    import hnswlib

    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=max(1, len(vectors)), ef_construction=ef_construction, M=m, random_seed=seed)
    step = batch if batch and batch > 0 else max(1, len(vectors))
    for s in range(0, len(vectors), step):
        index.add_items(vectors[s:s + step], np.arange(s, min(s + step, len(vectors))), num_threads=threads)
        if progress is not None:
            progress(min(s + step, len(vectors)))
    return index


def hnsw_search(index, queries: np.ndarray, k: int, ef: int, threads: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the ``k`` nearest by inner product, best first (hnswlib returns 1 - ip)."""
    index.set_ef(max(ef, k))
    labels, dist = index.knn_query(queries, k=k, num_threads=threads)
    return labels.astype(np.int64), (1.0 - dist).astype(np.float32)


def run_retrieve_query(cfg: Config) -> dict:
    """Query ``retrieve.query_modality`` -> ``retrieve.target_modality``; write hits, metrics and a page."""
    from raypipe.retrieve.align import chance_metrics, exact_search, ranks_from_hits, retrieval_metrics, true_ranks
    from raypipe.runtime import init_ray

    rc = cfg.retrieve
    init_ray(cfg)
    model_dir = os.path.join(retrieve_dir(cfg), "model")
    _, meta = load_aligner(model_dir)
    q_mod, t_mod = rc.query_modality, rc.target_modality
    if q_mod == t_mod or q_mod not in meta["shapes"] or t_mod not in meta["shapes"]:
        raise ValueError(f"query {q_mod} -> {t_mod}: both must be different modalities of the fitted pairs "
                         f"{[':'.join(p) for p in meta['pairs']]}")
    src = retrieve_input(cfg)
    t0 = time.perf_counter()
    proj = project_table(cfg, src, model_dir, [q_mod, t_mod])
    t_proj = time.perf_counter() - t0
    ids = np.asarray(proj.column("sample_id").to_pylist(), dtype=object).astype(str)
    has_q = proj.column(f"has_{q_mod}").to_numpy(zero_copy_only=False).astype(bool)
    has_t = proj.column(f"has_{t_mod}").to_numpy(zero_copy_only=False).astype(bool)
    zq, zt = _stack(proj.column(f"z_{q_mod}")), _stack(proj.column(f"z_{t_mod}"))

    # held out = the fit's test rows (never seen by the heads); rows the fit never saw count as held out too
    import pyarrow.parquet as pq

    fit_split = pq.read_table(os.path.join(model_dir, SPLIT_FILE))
    known = dict(zip(fit_split.column("sample_id").to_pylist(), fit_split.column("split").to_pylist()))
    held_out = np.array([known.get(s, "test") == "test" for s in ids])
    gallery = np.flatnonzero(has_t)
    query_rows = np.flatnonzero(has_q & (held_out if rc.queries == "test" else True))
    if len(gallery) == 0 or len(query_rows) == 0:
        raise ValueError(f"nothing to search: {len(query_rows)} query rows with {q_mod}, {len(gallery)} rows with "
                         f"{t_mod}")
    k = min(rc.k, len(gallery))
    g_vecs, q_vecs = np.ascontiguousarray(zt[gallery]), np.ascontiguousarray(zq[query_rows])

    t1 = time.perf_counter()
    ex_idx, ex_sc = exact_search(q_vecs, g_vecs, k)
    t_exact = time.perf_counter() - t1
    build_s = search_s = 0.0
    if rc.index == "hnsw":
        t1 = time.perf_counter()
        index = build_hnsw(g_vecs, rc.hnsw_m, rc.hnsw_ef_construction, cfg.run.seed)
        build_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        hit_idx, hit_sc = hnsw_search(index, q_vecs, k, rc.hnsw_ef_search)
        search_s = time.perf_counter() - t1
    else:
        hit_idx, hit_sc, search_s = ex_idx, ex_sc, t_exact

    # metrics on the queries whose own partner is in the gallery
    pos_in_gallery = np.full(len(ids), -1)
    pos_in_gallery[gallery] = np.arange(len(gallery))
    partner = pos_in_gallery[query_rows]
    ev = partner >= 0
    ks = sorted({1, 5, 10, k} & set(range(1, k + 1)))
    exact_all = retrieval_metrics(true_ranks(q_vecs[ev], g_vecs, partner[ev]), ks)
    index_topk = retrieval_metrics(ranks_from_hits(hit_idx[ev], partner[ev]), ks)
    index_topk.pop("median_rank")  # only the top k are known: no median rank from the index
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(hit_idx, ex_idx)])) if len(q_vecs) else np.nan

    hits = pa.table({
        "query_id": pa.array(np.repeat(ids[query_rows], k)),
        "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), len(query_rows))),
        "hit_id": pa.array(ids[gallery][hit_idx.ravel()]),
        "score": pa.array(hit_sc.ravel().astype(np.float32)),
    })
    out = os.path.join(retrieve_dir(cfg), f"query_{q_mod}_to_{t_mod}")
    os.makedirs(out, exist_ok=True)
    _atomic_write_parquet(os.path.join(out, "hits.parquet"), hits)
    doc = {"query_modality": q_mod, "target_modality": t_mod, "queries": rc.queries, "index": rc.index, "k": k,
           "n_queries": int(len(query_rows)), "n_evaluated": int(ev.sum()), "gallery_size": int(len(gallery)),
           "exact": exact_all, "index_metrics": index_topk, "chance": chance_metrics(len(gallery), ks),
           "index_vs_exact_topk_overlap": overlap,
           "hnsw": {"M": rc.hnsw_m, "ef_construction": rc.hnsw_ef_construction, "ef_search": rc.hnsw_ef_search}
           if rc.index == "hnsw" else None,
           "seconds": {"projection": t_proj, "exact_search": t_exact, "index_build": build_s, "index_search": search_s},
           "model_dir": os.path.abspath(model_dir), "input": os.path.abspath(src)}
    _atomic_write_text(os.path.join(out, "metrics.json"), json.dumps(doc, indent=2, default=float))
    _atomic_write_text(os.path.join(out, "report.html"), retrieval_page(doc))
    return {"ok": True, "out": os.path.abspath(out), "n_queries": doc["n_evaluated"], "gallery": doc["gallery_size"],
            f"recall@{max(ks)}": round(exact_all[f"recall@{max(ks)}"], 4), "mrr": round(exact_all["mrr"], 4),
            "printed": metrics_text(doc)}


def metrics_text(doc: dict) -> str:
    """The metrics as a small fixed-width table (the CLI prints it)."""
    keys = [k for k in doc["exact"] if k.startswith("recall@")] + ["median_rank", "mrr"]
    rows = [("exact search", doc["exact"]), (f"index ({doc['index']})", doc["index_metrics"]),
            ("chance", doc["chance"])]
    head = f"{doc['query_modality']} -> {doc['target_modality']}: {doc['n_evaluated']} held-out queries, " \
           f"gallery {doc['gallery_size']}"
    lines = [head, f"{'':<16}" + "".join(f"{k:>12}" for k in keys)]
    for name, m in rows:
        lines.append(f"{name:<16}" + "".join(f"{m.get(k, float('nan')):>12.4f}" for k in keys))
    lines.append(f"index top-{doc['k']} overlap with exact search: {doc['index_vs_exact_topk_overlap']:.4f}")
    return "\n".join(lines)


def retrieval_page(doc: dict) -> str:
    """A self-contained HTML page (inline CSS and SVG, no scripts or external files) of the metrics."""
    keys = [k for k in doc["exact"] if k.startswith("recall@")] + ["median_rank", "mrr"]
    rows = [("exact search", doc["exact"]), (f"index ({doc['index']})", doc["index_metrics"]),
            ("chance", doc["chance"])]

    def cell(v):
        return "&ndash;" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"

    table = "<tr><th></th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>" + "".join(
        f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{cell(m.get(k))}</td>" for k in keys) + "</tr>"
        for n, m in rows)
    rk = [k for k in keys if k.startswith("recall@")]
    bars, w = [], 60
    for i, k in enumerate(rk):
        for j, (name, m, colour) in enumerate([("exact", doc["exact"], "#3465a4"), ("chance", doc["chance"], "#aaa")]):
            v = float(m.get(k, 0) or 0)
            x, h = 40 + i * 2.5 * w + j * w, 160 * v
            bars.append(f'<rect x="{x}" y="{180 - h:.1f}" width="{w - 6}" height="{h:.1f}" fill="{colour}"/>'
                        f'<text x="{x + 2}" y="{175 - h:.1f}" font-size="11">{v:.3f}</text>')
        bars.append(f'<text x="{40 + i * 2.5 * w}" y="198" font-size="12">{html.escape(k)}</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{60 + len(rk) * 2.5 * w:.0f}" height="205">'
           '<line x1="35" y1="180" x2="100%" y2="180" stroke="#333"/>' + "".join(bars) + "</svg>")
    title = f"Cross-modal retrieval: {html.escape(doc['query_modality'])} &rarr; {html.escape(doc['target_modality'])}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}</style></head><body>
<h1>{title}</h1>
<p>{doc['n_evaluated']} queries ({html.escape(doc['queries'])} rows whose own {html.escape(doc['target_modality'])}
is in the gallery) against a gallery of {doc['gallery_size']} samples. Rank of the true partner among every
gallery sample (ties count against the query); the index's metrics are from its top {doc['k']} hits.
Top-{doc['k']} overlap of the index with exact search: {doc['index_vs_exact_topk_overlap']:.4f}.</p>
<table>{table}</table>
<h2>Recall@k, exact search vs chance</h2>{svg}
<p style="color:#666">Exact search in numpy; index: {html.escape(doc['index'])}
{html.escape(json.dumps(doc.get('hnsw')))}. Seconds: {html.escape(json.dumps({k: round(v, 3) for k, v in doc['seconds'].items()}))}.</p>
</body></html>
"""


def run_retrieve(cfg: Config, action: str) -> dict:
    """`raypipe retrieve fit|query`."""
    if action == "fit":
        return run_retrieve_fit(cfg)
    if action == "query":
        return run_retrieve_query(cfg)
    raise ValueError(f"unknown retrieve action {action!r}: fit or query")

"""Embedding stage on Ray Data: records -> one embedding row per sample (`raypipe embed`).

::

    samples.parquet (ids, labels, groups, split) --chunks of embed.chunk_samples ids-->
      image records --ActorPool(ImageActor: ResNet, loaded once)--> per-slice vectors
                    --mean/max per series, then per sample--> emb_<m>
      report records --ActorPool(TextActor: BERT-style)--> emb_<m>
      EHR / tabular records --pass-through--> emb_<m> (fixed shape)
    --> <out>.partial/chunk-NNNNN.parquet (atomic) --all chunks--> <out>/part-00000.parquet
    (plus <out>/_errors.parquet and <out>/_embed_summary.json: the leading underscore keeps
    them out of the table when <out> is read as a Parquet dataset)

A crashed run restarted on the same output skips the finished chunks (by sample id
range and embedding spec), so the result is identical to an uninterrupted run. Missing
modalities are null embeddings with ``mask_<m> = False``. The embedding spec (model,
revision, dim, pooling/aggregation, preprocessing) goes into the table's metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from raypipe.config import Config
from raypipe.schema import (EMBEDDING_SPEC_KEY, ERRORS_SCHEMA, NORMALISATION_KEY, embedding_column, embeddings_schema,
                            mask_column, payload_to_array, read_json_metadata, with_json_metadata)

log = logging.getLogger(__name__)

IMAGE_KINDS = ("volume", "image", "geotiff")
PASS_KINDS = ("ehr", "tabular")


# ----------------------------------------------------------------------------- actors
class ImageActor:
    """Ray Data callable class: one ResNet per actor (loaded in __init__), batches of image records."""

    def __init__(self, image_cfg: dict, seed: int, precision: str, threads: int):
        import torch

        from raypipe.embed.image import ImageEmbedder

        torch.set_num_threads(max(1, threads))
        self.embedder = ImageEmbedder(model=image_cfg["model"], weights=image_cfg["weights"],
                                      revision=image_cfg["revision"], input_size=image_cfg["input_size"],
                                      band_projection=image_cfg["band_projection"],
                                      band_indices=image_cfg.get("band_indices"), seed=seed, precision=precision)

    def __call__(self, batch: pa.Table) -> pa.Table:
        keep = ["sample_id", "modality", "source_key", "position"]
        arrays, ok, errs = [], [], []
        shapes = batch.column("shape").to_pylist()
        for i, (p, d, sh) in enumerate(zip(batch.column("payload").to_pylist(), batch.column("dtype").to_pylist(),
                                           shapes)):
            try:
                a = payload_to_array(p, d, sh).astype(np.float32)
                if a.ndim == 2:
                    a = a[None]
                if a.ndim != 3 or not np.isfinite(a).all():
                    raise ValueError(f"image record of shape {a.shape} with non-finite values or wrong rank")
                arrays.append(a)
                ok.append(i)
            except Exception as e:  # noqa: BLE001 - a corrupt record is an error row
                errs.append((i, f"{type(e).__name__}: {e}"))
        out = {k: [] for k in keep + ["embedding", "error"]}
        if arrays:
            # one forward per shape group (different modalities/sizes may share a batch)
            groups: dict[tuple, list[int]] = defaultdict(list)
            for j, a in enumerate(arrays):
                groups[a.shape].append(j)
            vecs: dict[int, np.ndarray] = {}
            for _, js in groups.items():
                emb = self.embedder(np.stack([arrays[j] for j in js]))
                for j, v in zip(js, emb):
                    vecs[j] = v
            for j, i in enumerate(ok):
                for k in keep:
                    out[k].append(batch.column(k)[i].as_py())
                out["embedding"].append(vecs[j].tolist())
                out["error"].append(None)
        for i, msg in errs:
            for k in keep:
                out[k].append(batch.column(k)[i].as_py())
            out["embedding"].append(None)
            out["error"].append(msg)
        return pa.table({**{k: out[k] for k in keep},
                         "embedding": pa.array(out["embedding"], pa.list_(pa.float32())),
                         "error": pa.array(out["error"], pa.string())})


class TextActor:
    """Ray Data callable class: one text encoder per actor, batches of report records."""

    def __init__(self, text_cfg: dict, seed: int, precision: str, threads: int):
        import torch

        from raypipe.embed.text import TextEmbedder

        torch.set_num_threads(max(1, threads))
        self.embedder = TextEmbedder(model=text_cfg["model"], weights=text_cfg["weights"],
                                     revision=text_cfg["revision"], pooling=text_cfg["pooling"],
                                     max_tokens=text_cfg["max_tokens"], seed=seed, precision=precision)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        good = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        emb = self.embedder([texts[i] for i in good]) if good else np.zeros((0, self.embedder.dim), np.float32)
        vec: list = [None] * len(texts)
        err: list = ["empty or missing text"] * len(texts)
        for j, i in enumerate(good):
            vec[i], err[i] = emb[j].tolist(), None
        return pa.table({"sample_id": batch.column("sample_id"), "modality": batch.column("modality"),
                         "source_key": batch.column("source_key"), "position": batch.column("position"),
                         "embedding": pa.array(vec, pa.list_(pa.float32())), "error": pa.array(err, pa.string())})


# ----------------------------------------------------------------------------- helpers
def aggregate(rows: list[tuple[str, int, np.ndarray]], how: str = "mean") -> np.ndarray:
    """Per-slice vectors of one sample and modality -> one vector: within each series, then across series."""
    series: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for key, pos, v in rows:
        series[key].append((pos, v))
    per_series = []
    for key in sorted(series):
        vs = np.stack([v for _, v in sorted(series[key], key=lambda t: t[0])])
        per_series.append(vs.max(0) if how == "max" else vs.mean(0))
    stacked = np.stack(per_series)
    return stacked.max(0) if how == "max" else stacked.mean(0)


def embedding_spec(cfg: Config, shapes: dict[str, tuple], kinds: dict[str, str], dims: dict[str, int]) -> dict:
    spec: dict[str, Any] = {"modalities": {}}
    for m, kind in kinds.items():
        if kind in IMAGE_KINDS:
            ic = cfg.embed.image
            spec["modalities"][m] = {
                "kind": kind, "model": ic.model if ic.weights == "pretrained" else "resnet34-random",
                "weights": ic.weights, "revision": ic.revision, "dim": dims[m], "aggregation": ic.aggregation,
                "preprocessing": {"input_size": ic.input_size, "band_projection": ic.band_projection,
                                  "normalisation": "imagenet", "record_size": cfg.ingest.modalities[m].size,
                                  "window": cfg.ingest.modalities[m].window}}
            if ic.weights == "random":
                spec["modalities"][m]["seed"] = cfg.run.seed
        elif kind == "text":
            tc = cfg.embed.text
            spec["modalities"][m] = {"kind": kind, "model": tc.model, "weights": tc.weights, "revision": tc.revision,
                                     "dim": dims[m], "pooling": tc.pooling, "max_tokens": tc.max_tokens,
                                     "max_words": cfg.ingest.modalities[m].max_words}
        else:
            spec["modalities"][m] = {"kind": kind, "model": "identity", "dim": int(np.prod(shapes[m]))}
    return spec


def check_embedding_spec(expected: dict, schema: pa.Schema) -> None:
    """Raise ValueError unless ``schema`` carries ``expected``'s modalities with the same spec entries."""
    found = read_json_metadata(schema, EMBEDDING_SPEC_KEY) or {}
    fm = found.get("modalities", {})
    for m, want in expected.get("modalities", {}).items():
        if m not in fm:
            raise ValueError(f"embeddings lack modality {m!r} (have {sorted(fm)})")
        diff = sorted(k for k in want if k != "shape" and fm[m].get(k) != want.get(k))
        if diff:
            raise ValueError(f"modality {m!r}: embedding spec differs in {diff}: expected "
                             f"{[want.get(k) for k in diff]}, table has {[fm[m].get(k) for k in diff]}; "
                             "re-embed with the same embed config")


def _spec_hash(spec: dict, ids: list[str]) -> str:
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    h.update("\n".join(ids).encode())
    return h.hexdigest()[:16]


def _pool(cfg: Config, gpus: float, cpus: float) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor): leave at least one CPU for Ray Data's read tasks."""
    ngpu = cfg.embed.num_gpus_per_actor if cfg.embed.num_gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if cfg.embed.pool_size:
        size = cfg.embed.pool_size
    elif ngpu > 0:
        size = max(1, int(gpus // ngpu))
    else:
        size = max(1, int(cpus) - 1) if cpus >= 2 else 1
    from raypipe.runtime import actor_cpus

    return size, actor_cpus(size, cpus), ngpu


# ----------------------------------------------------------------------------- driver
def _embed_chunk(cfg: Config, records_path: str, ids: list[str], kinds: dict[str, str]) -> tuple[dict, list[dict]]:
    """{modality: {sample_id: vector}} for ``ids`` and error rows."""
    import pyarrow.dataset as pads
    import ray.data

    from raypipe.runtime import cluster_resources

    res = cluster_resources()
    size, cpu_per, gpu_per = _pool(cfg, res["GPU"], res["CPU"])
    precision = cfg.embed.precision
    id_filter = pads.field("sample_id").isin(ids)
    out: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    errors: list[dict] = []
    image_mods = [m for m, k in kinds.items() if k in IMAGE_KINDS]
    text_mods = [m for m, k in kinds.items() if k == "text"]
    pass_mods = [m for m, k in kinds.items() if k in PASS_KINDS]

    def read(mods):
        from ray.data.expressions import col

        # records are sorted by sample_id: the predicate skips row groups of other chunks
        return ray.data.read_parquet(records_path).filter(expr=col("sample_id").is_in(ids) & col("modality").is_in(mods))

    if image_mods:
        ds = read(image_mods).map_batches(
            ImageActor, fn_constructor_kwargs={"image_cfg": cfg.embed.image.model_dump(), "seed": cfg.run.seed,
                                               "precision": precision, "threads": max(1, int(cpu_per))},
            batch_size=cfg.embed.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=cpu_per, num_gpus=gpu_per)
        per: dict[tuple[str, str], list] = defaultdict(list)
        for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for r in b.to_pylist():
                if r["error"] is not None:
                    errors.append({"source_path": f"records:{r['sample_id']}/{r['modality']}/{r['position']}",
                                   "stage": "embed", "modality": r["modality"], "error_class": "BadRecord",
                                   "message": r["error"]})
                    continue
                per[(r["sample_id"], r["modality"])].append((r["source_key"], r["position"],
                                                             np.asarray(r["embedding"], np.float32)))
        for (sid, m), rows in per.items():
            out[m][sid] = aggregate(rows, cfg.embed.image.aggregation)
    if text_mods:
        ds = read(text_mods).map_batches(
            TextActor, fn_constructor_kwargs={"text_cfg": cfg.embed.text.model_dump(), "seed": cfg.run.seed,
                                              "precision": precision, "threads": max(1, int(cpu_per))},
            batch_size=cfg.embed.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=cpu_per, num_gpus=gpu_per)
        for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for r in b.to_pylist():
                if r["error"] is not None:
                    errors.append({"source_path": f"records:{r['sample_id']}/{r['modality']}", "stage": "embed",
                                   "modality": r["modality"], "error_class": "BadRecord", "message": r["error"]})
                else:
                    out[r["modality"]][r["sample_id"]] = np.asarray(r["embedding"], np.float32)
    if pass_mods:
        table = pads.dataset(records_path, format="parquet").to_table(
            filter=id_filter & pads.field("modality").isin(pass_mods))
        for r in table.to_pylist():
            try:
                out[r["modality"]][r["sample_id"]] = payload_to_array(r["payload"], r["dtype"], r["shape"]).astype(
                    np.float32)
            except Exception as e:  # noqa: BLE001
                errors.append({"source_path": f"records:{r['sample_id']}/{r['modality']}", "stage": "embed",
                               "modality": r["modality"], "error_class": "BadRecord", "message": str(e)})
    return out, errors


def run_embed(cfg: Config) -> dict:
    """Embed ``cfg.embed_input`` (records dir) into ``cfg.embeddings_dir``; resumable by chunk."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from raypipe.runtime import init_ray

    src = cfg.embed_input
    records_path = os.path.join(src, "records")
    if not os.path.isfile(os.path.join(src, "samples.parquet")):
        raise FileNotFoundError(f"{src} has no samples.parquet: run `raypipe ingest` first or set embed.input")
    init_ray(cfg)
    samples_t = pq.read_table(os.path.join(src, "samples.parquet"))
    samples = samples_t.sort_by("sample_id")
    ids = samples.column("sample_id").to_pylist()
    kinds = {m: c.kind for m, c in cfg.ingest.modalities.items()}
    rec_schema = pads.dataset(records_path, format="parquet")
    present = set(rec_schema.to_table(columns=["modality"]).column("modality").unique().to_pylist())
    kinds = {m: k for m, k in kinds.items() if m in present}
    if len(kinds) < 1:
        raise ValueError(f"no records of the configured modalities {sorted(cfg.ingest.modalities)} in {records_path}")

    out_dir = cfg.embeddings_dir
    partial = out_dir.rstrip("/") + ".partial"
    os.makedirs(partial, exist_ok=True)
    n = cfg.embed.chunk_samples
    chunks = [ids[i:i + n] for i in range(0, len(ids), n)]
    t0 = time.perf_counter()
    all_errors: list[dict] = []
    dims: dict[str, int] = {}
    shapes: dict[str, tuple] = {}
    skipped = 0
    spec_probe = json.dumps({"embed": cfg.embed.model_dump(mode="json"), "kinds": kinds, "seed": cfg.run.seed},
                            sort_keys=True)
    for ci, chunk in enumerate(chunks):
        path = os.path.join(partial, f"chunk-{ci:05d}.parquet")
        tag = _spec_hash({"probe": spec_probe}, chunk)
        if os.path.isfile(path) and (pq.read_schema(path).metadata or {}).get(b"raypipe.chunk") == tag.encode():
            skipped += 1
            continue
        vectors, errors = _embed_chunk(cfg, records_path, chunk, kinds)
        all_errors.extend(errors)
        cols: dict[str, Any] = {"sample_id": chunk}
        for m in kinds:
            got = vectors.get(m, {})
            shape = next(iter(got.values())).shape if got else None
            if shape is not None:
                shapes[m], dims[m] = tuple(shape), int(np.prod(shape))
            width = dims.get(m)
            if width is None:
                continue
            vals = [got[s].reshape(-1).tolist() if s in got else None for s in chunk]
            cols[embedding_column(m)] = pa.array(vals, pa.list_(pa.float32(), width))
            cols[mask_column(m)] = pa.array([s in got for s in chunk])
        table = pa.table(cols)
        table = table.replace_schema_metadata({b"raypipe.chunk": tag.encode(),
                                               b"raypipe.shapes": json.dumps({m: list(s) for m, s in shapes.items()}).encode()})
        pq.write_table(table, path + ".tmp")
        os.replace(path + ".tmp", path)
        log.info("embed: chunk %d/%d done (%d samples)", ci + 1, len(chunks), len(chunk))

    # --- assemble the final table (schema from the spec), atomically
    parts = [pq.read_table(os.path.join(partial, f"chunk-{ci:05d}.parquet")) for ci in range(len(chunks))]
    for p in parts:
        for m, s in json.loads((p.schema.metadata or {}).get(b"raypipe.shapes", b"{}")).items():
            shapes.setdefault(m, tuple(s))
    mods = [m for m in kinds if m in shapes]
    dims = {m: int(np.prod(shapes[m])) for m in mods}
    label_cols = [c for c in cfg.ingest.label_columns if c in samples.column_names]
    group_cols = [c for c in samples.column_names if c not in ("sample_id", *label_cols)]
    spec = embedding_spec(cfg, shapes, {m: kinds[m] for m in mods}, dims)
    schema = embeddings_schema({m: shapes[m] for m in mods}, label_cols, group_cols, spec=spec)
    norm = read_json_metadata(samples_t.schema, NORMALISATION_KEY)
    if norm:
        schema = with_json_metadata(schema, NORMALISATION_KEY, norm)
    emb = pa.concat_tables([p.select([c for c in p.column_names]) for p in parts], promote_options="permissive")
    cols = {"sample_id": samples.column("sample_id")}
    for c in label_cols + group_cols:
        cols[c] = samples.column(c)
    for m in mods:
        ec, mc = embedding_column(m), mask_column(m)
        if ec in emb.column_names:
            cols[ec] = emb.column(ec).cast(pa.list_(pa.float32(), dims[m]))
            cols[mc] = emb.column(mc)
        else:
            cols[ec] = pa.nulls(len(ids), pa.list_(pa.float32(), dims[m]))
            cols[mc] = pa.array([False] * len(ids))
    final = pa.table({f.name: cols[f.name].cast(f.type) if hasattr(cols[f.name], "cast") else cols[f.name]
                      for f in schema}, schema=schema)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    pq.write_table(final, os.path.join(tmp, "part-00000.parquet"))
    err = pa.Table.from_pylist(all_errors, schema=ERRORS_SCHEMA) if all_errors else ERRORS_SCHEMA.empty_table()
    pq.write_table(err, os.path.join(tmp, "_errors.parquet"))
    seconds = time.perf_counter() - t0
    summary = {"ok": True, "samples": len(ids), "modalities": {m: {"dim": dims[m], "present": int(
        final.column(mask_column(m)).to_numpy(zero_copy_only=False).sum())} for m in mods},
        "errors": len(all_errors), "chunks": len(chunks), "chunks_resumed": skipped, "seconds": round(seconds, 1)}
    with open(os.path.join(tmp, "_embed_summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    shutil.rmtree(partial, ignore_errors=True)
    summary["embeddings_dir"] = os.path.abspath(out_dir)
    return summary

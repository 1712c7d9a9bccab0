"""Batch inference on Ray Data: `raypipe infer`.

An actor pool of :class:`Predictor` (model loaded once per actor) maps the
embeddings table to the predictions table (``raypipe.schema.predictions_schema``):
prediction, joint probabilities, per-modality probabilities, label-free
reliability weights and which modalities were imputed. Any missing pattern is
fine: absent modalities are imputed by the model (OmniFuse) or masked out.
The run refuses an input whose modalities or embedding spec differ from the
ones the model was trained on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import numpy as np
import pyarrow as pa

from raypipe.config import Config
from raypipe.schema import EMBEDDING_SPEC_KEY, predictions_schema, read_json_metadata

log = logging.getLogger(__name__)


class SpecMismatchError(ValueError):
    """The input embeddings were not made the way the model's training embeddings were."""


def check_compatible(meta: dict, schema: pa.Schema) -> None:
    """Raise :class:`SpecMismatchError` unless ``schema`` carries the model's modalities and embedding spec."""
    from raypipe.train.tables import modality_shapes

    shapes = modality_shapes(schema)
    want = {m: tuple(s) for m, s in meta["shapes"].items()}
    missing = [m for m in want if m not in shapes]
    if missing:
        raise SpecMismatchError(f"input lacks modalities {missing} the model was trained on "
                                f"(model: {sorted(want)}, input: {sorted(shapes)})")
    for m, s in want.items():
        if tuple(shapes[m]) != s:
            raise SpecMismatchError(f"modality {m}: input embedding shape {list(shapes[m])} != model's {list(s)}")
    spec = read_json_metadata(schema, EMBEDDING_SPEC_KEY) or {}
    trained = meta.get("embedding_spec") or {}
    for m in want:
        a = {k: v for k, v in (trained.get("modalities", {}).get(m) or {}).items() if k != "shape"}
        b = {k: v for k, v in (spec.get("modalities", {}).get(m) or {}).items() if k != "shape"}
        if a and b and a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise SpecMismatchError(f"modality {m}: embedding spec differs from training in {diff} "
                                    f"(trained {[a.get(k) for k in diff]}, input {[b.get(k) for k in diff]}); "
                                    "re-embed the input with the training embedding config")


class Predictor:
    """Ray Data callable class: loads the trained model once, predicts Arrow batches."""

    def __init__(self, run_dir: str, device: str = "cpu", batch_size: int = 1024):
        import torch

        from raypipe import console
        from raypipe.train import loop
        from raypipe.fusion.ensemble import load_model

        console.worker_setup()  # raypipe's warnings from this actor reach the driver's console
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("infer.num_gpus_per_actor > 0 but this actor sees no CUDA device")
        self.method, self.meta = load_model(run_dir)  # one fusion method or an ensemble (train.method=auto)
        self.method.to(device)
        self.modalities = self.meta["modalities"]
        self.shapes = {m: tuple(s) for m, s in self.meta["shapes"].items()}
        self.predict = loop.make_predict_fn(self.method, self.meta["task"], device=device)
        self.schema = predictions_schema(self.modalities, self.meta["n_outputs"])
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        from raypipe.train.tables import table_to_arrays

        # one conversion per (large) Ray Data batch; the model sees chunks of infer.batch_size
        for i, name in enumerate(batch.column_names):
            if name.startswith("emb_"):
                batch = batch.set_column(i, batch.schema.field(i), values_in_place(batch.column(i)))
        arrays = table_to_arrays(batch, self.modalities, self.shapes, [])
        n, bs = batch.num_rows, self.batch_size
        parts = [self.predict({m: arrays[f"x_{m}"][i:i + bs] for m in self.modalities}, arrays["mask"][i:i + bs])
                 for i in range(0, n, bs)]
        out = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return predictions_table(batch.column("sample_id"), out, self.modalities, self.meta["task"], self.schema)


def values_in_place(column):
    """A fixed-size list column whose values array's nulls all lie in null lists (what pyarrow's Parquet
    reader makes of an absent embedding), without that values validity bitmap (zero-copy), so that
    ``train.tables.fixed_list_to_numpy`` reads the values in place and zeroes the null rows instead of
    filtering, flattening and scattering them (2.0 -> ~0.7 us a row for 4 x 64-d with 10-30 % absent).
    Any other column is returned as it is."""
    chunks = []
    for c in (column.chunks if isinstance(column, pa.ChunkedArray) else [column]):
        chunks.append(c)
        if not pa.types.is_fixed_size_list(c.type) or not c.null_count:
            continue
        width, n = c.type.list_size, len(c)
        values = c.values.slice(c.offset * width, n * width)
        if values.null_count != c.null_count * width or not pa.types.is_floating(values.type):
            continue  # a null element in a present embedding (or values under a null list): left as it is
        bits = np.unpackbits(np.frombuffer(values.buffers()[0], np.uint8), bitorder="little")
        if not bits[values.offset:values.offset + n * width].reshape(n, width)[np.asarray(c.is_valid())].all():
            continue
        plain = pa.Array.from_buffers(values.type, len(values), [None, values.buffers()[1]], offset=values.offset)
        chunks[-1] = pa.FixedSizeListArray.from_arrays(plain, type=c.type, mask=c.is_null())  # its own value field
    return pa.chunked_array(chunks, type=column.type) if isinstance(column, pa.ChunkedArray) else chunks[0]


def predictions_table(sample_id, out: dict[str, np.ndarray], modalities, task: str, schema: pa.Schema) -> pa.Table:
    """Assemble the predictions table from the model's traced outputs."""
    probs = np.asarray(out["probabilities"], np.float32)
    k = probs.shape[1]
    if task == "regression":
        prediction = probs[:, 0].astype(np.float64)
    elif task == "multilabel":
        prediction = (probs >= 0.5).astype(np.float64) @ (2.0 ** np.arange(k))  # label bitmask
    else:
        prediction = probs.argmax(axis=1).astype(np.float64)

    def fixed(a):
        a = np.asarray(a, np.float32).reshape(len(probs), k)
        return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), k)

    cols = {"sample_id": sample_id, "prediction": pa.array(prediction), "probabilities": fixed(probs)}
    n = len(probs)
    for m in modalities:
        cols[f"prob_{m}"] = fixed(out.get(f"prob_{m}", np.full((n, k), np.nan)))
        cols[f"weight_{m}"] = pa.array(np.asarray(out.get(f"weight_{m}", np.full(n, np.nan)), np.float32))
        cols[f"imputed_{m}"] = pa.array(np.asarray(out.get(f"imputed_{m}", np.zeros(n, bool)), bool))
    return pa.table(cols, schema=schema)


def input_columns(modalities, schema: pa.Schema) -> list[str]:
    """The embeddings-table columns a prediction reads: ids, the model's embeddings and their masks."""
    from raypipe.schema import embedding_column, mask_column

    cols = ["sample_id"]
    for m in modalities:
        cols += [c for c in (embedding_column(m), mask_column(m)) if c in schema.names]
    return cols


def row_group_batches(path: str, filesystem, row_groups: list[int], columns: list[str], rows: int):
    """Arrow tables of up to ``rows`` rows from some row groups of one Parquet file, in file order.

    One thread, the file decoded once in page order: Ray Data's multi-threaded Parquet scanner
    took ~15 CPU-s for the 840 MB one-row-group table of infer_bench against ~3 here.
    """
    import pyarrow.parquet as pq

    with filesystem.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        for b in pf.iter_batches(batch_size=rows, row_groups=row_groups, columns=columns, use_threads=False):
            yield pa.Table.from_batches([b])


def row_group_units(src: str, columns: list[str]):
    """The read units of an embeddings table: ``(path, row group, rows, bytes of columns)`` in (file name,
    row group) order, with the table's schema and filesystem. Reads the Parquet footers only."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    dataset = pads.dataset(src, format="parquet")  # the listing check_compatible used (skips _*/.* files)
    fs = dataset.filesystem
    units = []
    for path in sorted(dataset.files):
        with fs.open_input_file(path) as fh:
            md = pq.ParquetFile(fh).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            idx = [i for i in range(rg.num_columns) if rg.column(i).path_in_schema.split(".")[0] in columns]
            units.append((path, g, rg.num_rows, sum(rg.column(i).total_uncompressed_size for i in idx)))
    return units, dataset.schema, fs


def embeddings_datasource(src: str, columns: list[str], rows: int, units=None):
    """A Ray Data datasource over an embeddings table: one read task per Parquet row group, in
    (file name, row group) order, each yielding blocks of ``rows`` rows of ``columns`` only."""
    import functools

    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    units, schema, fs = units or row_group_units(src, columns)

    class EmbeddingsTable(Datasource):
        num_read_units = max(1, sum(1 for u in units if u[2]))
        num_rows = sum(u[2] for u in units)

        def estimate_inmemory_data_size(self):
            return sum(u[3] for u in units)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [ReadTask(functools.partial(row_group_batches, path, fs, [g], columns, rows),
                             BlockMetadata(num_rows=n, size_bytes=size, exec_stats=None, input_files=[path]),
                             schema=pa.schema([schema.field(c) for c in columns]))
                    for path, g, n, size in units if n]

    return EmbeddingsTable()


class RowGroupPredictor(Predictor):
    """A :class:`Predictor` that reads its own input: each call gets (file, row group) units of the
    embeddings table and yields the predictions of each unit's rows, ``rows`` at a time."""

    def __init__(self, run_dir: str, filesystem, columns: list[str], rows: int, device: str = "cpu",
                 batch_size: int = 1024):
        super().__init__(run_dir, device=device, batch_size=batch_size)
        self.filesystem, self.columns, self.rows = filesystem, columns, rows

    def __call__(self, units: dict):
        for path, group in zip(units["path"], units["row_group"]):
            for table in row_group_batches(str(path), self.filesystem, [int(group)], self.columns, self.rows):
                yield super().__call__(table)


def reads_in_actors(units, gpus: float, block_bytes: int | None) -> bool:
    """Whether the predictor actors read their own row groups (:class:`RowGroupPredictor`) rather than
    being fed by read tasks: on a CPU pool whose row groups each fit in one Ray Data block.

    A read task hands each such group to one actor as one block anyway (Ray Data joins a task's
    batches into blocks of up to ``target_max_block_size``); reading in the actor saves the read
    tasks' worker and moving every input row through the object store (~1 GB, ~3 CPU-s of ~30 for
    infer_bench's 1,000,000 rows on 2 cores). A larger group is split by Ray Data into blocks that
    several actors share; GPU actors are fed by read tasks on the CPUs (an actor reading would leave
    its GPU idle meanwhile).
    """
    return not gpus and (block_bytes is None or max((u[3] for u in units), default=0) <= block_bytes)


def run_infer(cfg: Config) -> dict:
    """Predict every sample of ``infer.input`` (an embeddings table) with the run in ``infer.checkpoint``."""
    import pyarrow.dataset as pads
    import ray.data

    from raypipe.runtime import actor_cpus, cluster_resources, init_ray

    init_ray(cfg)
    run_dir = cfg.infer.checkpoint or cfg.train_dir()
    if not os.path.isfile(os.path.join(run_dir, "model_meta.json")):
        raise FileNotFoundError(f"{run_dir} is not a trained run (no model_meta.json): run `raypipe train` "
                                "first or pass --checkpoint RUN_DIR")
    with open(os.path.join(run_dir, "model_meta.json")) as fh:
        meta = json.load(fh)
    src = cfg.infer.input or cfg.embeddings_dir
    out = cfg.infer.out or cfg.path("predictions")
    stages: dict = {}
    if os.path.isfile(os.path.join(src, "manifest.csv")):  # a raw cohort: ingest and embed it first
        src, stages = embed_raw_cohort(cfg, src, meta, out)
    schema = pads.dataset(src, format="parquet").schema
    check_compatible(meta, schema)
    res = cluster_resources()
    gpus = cfg.infer.num_gpus_per_actor
    if gpus > 0:
        if res.get("GPU", 0) < gpus:
            raise ValueError(f"infer.num_gpus_per_actor={gpus:g} but the cluster has {res.get('GPU', 0):g} GPUs")
        pool = cfg.infer.pool_size or max(1, int(res["GPU"] // gpus))
    else:
        # one actor per CPU of the cluster (actor_cpus reserves a fraction, so that a read task always
        # fits when the table's row groups are read by read tasks; see reads_in_actors)
        pool = cfg.infer.pool_size or max(1, int(res["CPU"]))
    t0 = time.perf_counter()
    batch_rows = max(cfg.infer.rows_per_actor_batch, cfg.infer.batch_size)
    columns = input_columns(meta["modalities"], schema)
    units, schema, fs = row_group_units(src, columns)  # tables are written in row groups of ~64 MB (raypipe.tables)
    if not any(u[2] for u in units):  # counted from the Parquet footers; Ray Data would write nothing at all
        raise ValueError("the input embeddings table has no rows: nothing to predict")
    kwargs = {"run_dir": os.path.abspath(run_dir), "device": "cuda" if gpus else "cpu",
              "batch_size": cfg.infer.batch_size}
    if reads_in_actors(units, gpus, ray.data.DataContext.get_current().target_max_block_size):
        readable = [{"path": p, "row_group": g} for p, g, n, _ in units if n]
        ds = ray.data.from_items(readable, override_num_blocks=len(readable))
        udf, batch, fmt = RowGroupPredictor, 1, "numpy"
        kwargs.update(filesystem=fs, columns=columns, rows=batch_rows)
    else:
        # one read task (one thread) per row group; never re-split a read task's output: Ray Data's default
        # would split a one-row-group table's stream into ~270 small blocks that pace the read by the
        # driver's loop
        source = embeddings_datasource(src, columns, batch_rows, units=(units, schema, fs))
        ds = ray.data.read_datasource(source, override_num_blocks=source.num_read_units)
        udf, batch, fmt = Predictor, batch_rows, "pyarrow"
    ds = ds.map_batches(udf, fn_constructor_kwargs=kwargs, batch_size=batch, batch_format=fmt,
                        compute=ray.data.ActorPoolStrategy(size=pool), num_cpus=actor_cpus(pool, res["CPU"]),
                        num_gpus=gpus or None)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # Written by the driver as the predictions stream in (a block at a time: memory stays bounded), into
    # one file in input order. Ray Data yields the blocks in input order (preserve_order, set by
    # init_ray) and embeddings tables are sorted by id, so no sort is needed; its write_parquet did not
    # keep that order (2.60: files read back in name order were out of id order, seen at 1,000,000 rows
    # and, under load, on a 300-row table of 9 row groups).
    import pyarrow.parquet as pq

    out_schema = predictions_schema(meta["modalities"], meta["n_outputs"])
    rows = 0
    # no dictionary encoding: ids are unique and the floats nearly so (pyarrow tried a dictionary for every
    # column: 1.4 CPU-s of the driver for 1,000,000 rows and a larger file; 0.4 without)
    with pq.ParquetWriter(os.path.join(tmp, "part-00000.parquet"), out_schema, compression="zstd",
                          use_dictionary=False) as writer:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.write_table(block if block.schema.equals(out_schema) else block.cast(out_schema))
            rows += block.num_rows
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    seconds = time.perf_counter() - t0
    return {"ok": True, "predictions": os.path.abspath(out), "rows": rows, "seconds": round(seconds, 2),
            "predictions_per_second": round(rows / max(seconds, 1e-9), 1), **stages}


def _with(cfg: Config, section: str, **values) -> Config:
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})


def embed_raw_cohort(cfg: Config, cohort: str, meta: dict, out: str) -> tuple[str, dict]:
    """Ingest and embed a raw cohort (manifest.csv inside) for a trained model; returns (embeddings dir, summaries).

    The config's ingest/embed sections must describe the embeddings the model was trained on:
    that is checked from the configuration (model configs only, no weights) before any file is
    read. The EHR statistics are the training cohort's, stored in the model's metadata (or
    ``ingest.ehr.normalisation`` when set), applied unchanged. Records and embeddings go to
    ``<out>.inputs/`` and are kept (a resumed embed skips what is already written).
    """
    from raypipe.embed.pipeline import PASS_KINDS, embedding_spec, modality_kinds, run_embed
    from raypipe.ingest.pipeline import run_ingest
    from raypipe.schema import embeddings_schema

    kinds = modality_kinds(cfg, meta["modalities"])
    lacking = [m for m in meta["modalities"] if m not in kinds]
    if lacking:
        raise SpecMismatchError(f"the model was trained on modalities {lacking} that ingest.modalities of this config "
                                "lacks: run infer with the config the model was trained with")
    pass_shapes = {m: meta["shapes"][m] for m, k in kinds.items() if k in PASS_KINDS}
    spec, shapes = embedding_spec(cfg, kinds, pass_shapes)
    check_compatible(meta, embeddings_schema(shapes, [], [], spec=spec))  # fail before hours of embedding
    work = out.rstrip("/") + ".inputs"
    os.makedirs(work, exist_ok=True)
    ehr = cfg.ingest.ehr
    if not ehr.normalisation and meta.get("ehr_normalisation"):
        path = os.path.join(work, "ehr_normalisation.json")
        with open(path, "w") as fh:
            json.dump(meta["ehr_normalisation"], fh, indent=2, sort_keys=True)
        ehr = ehr.model_copy(update={"normalisation": path})
    records, embeddings = os.path.join(work, "records"), os.path.join(work, "embeddings")
    c = _with(_with(cfg, "ingest", input=os.path.abspath(cohort), out=records, ehr=ehr), "embed", input=records,
              out=embeddings)
    log.info("infer: raw cohort %s -> ingest -> embed -> predict (intermediate tables in %s)", cohort, work)
    ing = run_ingest(c)
    if not ing.get("ok"):
        raise RuntimeError(f"ingest of {cohort} failed its checks (see {records}/ingest_summary.json and "
                           "errors.parquet): no predictions written")
    emb = run_embed(c)
    if not emb.get("ok"):
        raise RuntimeError(f"embedding of {cohort} exceeded the error budget (see {embeddings}/_errors.parquet)")
    return embeddings, {"inputs": work, "ingest": {k: ing[k] for k in ("files_seen", "files_ingested",
                                                                       "files_quarantined") if k in ing},
                        "embed_errors": emb.get("errors")}

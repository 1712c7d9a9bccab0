"""Embedding stage on Ray Data: records -> one embedding row per sample (``raypipe embed``).

::

    samples.parquet (ids, labels, groups, split) --sorted, chunks of embed.chunk_samples ids-->
      image records --[read + filter + decode + re-block] (CPU tasks: payload -> 3 channels, resize,
                      ImageNet norm; one block per model batch)
                    --ActorPool(ImageActor: ResNet loaded once, inference_mode, GPU: autocast+channels_last)
                    --> per-slice vectors --mean/max/all per series, then per sample--> emb_<m>
      text records  --ActorPool(TextActor: BERT-style encoder, CLS/mean pooling)--> emb_<m>
      EHR / tabular records --pass-through (fixed shape)--> emb_<m>

    one Ray Data pass (one actor pool) per model family for the whole run; as soon as all
    records of a chunk are back: <out>.partial/chunk-N.<family>.parquet (+ .errors.parquet)
    per chunk, then chunk-N.parquet (families + pass-through, final schema; the commit marker)
    --all chunks, streamed (one row group per chunk)--> <out>/part-00000.parquet, <out>/_errors.parquet,
    <out>/_embed_summary.json

The decode stage is fused with the Parquet read into one task operator; Ray Data's
streaming executor runs it on the CPUs concurrently with the model actors, so decoding
and resizing overlap with the GPU. ``_errors.parquet`` and ``_embed_summary.json``
start with an underscore so that reading ``<out>`` as a Parquet dataset sees only the table.

Guarantees
- every sample of samples.parquet gets a row (sorted by sample_id); a modality a
  sample lacks (or whose records all failed) is a null embedding with
  ``mask_<m> = False``, never a zero vector;
- a record that cannot be embedded (corrupt payload, wrong rank or shape,
  non-finite values, empty text, duplicates) becomes an ``errors`` row; the run goes on;
- the embedding spec (per modality: model, revision, weights, dim, shape, pooling
  or aggregation, preprocessing) is stored under ``EMBEDDING_SPEC_KEY``;
  :func:`check_embedding_spec` is the check later stages call;
- resumable: every partial file is written under a temporary name and renamed, and
  tagged with a hash of the spec, the batch size, the records' file list and the
  chunk's ids. A restarted run skips committed chunks and finished family parts;
  since the models' outputs do not depend on batch composition (see image.py and
  text.py), the final table is byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raypipe.config import Config
from raypipe.schema import (EMBEDDING_SPEC_KEY, ERRORS_SCHEMA, NORMALISATION_KEY, TASK_KEY, embedding_column,
                            TENSOR_PREFIX, embeddings_schema, mask_column, payload_to_array, read_json_metadata,
                            tensor_chunks, tensor_column, tensor_rows, to_float)

log = logging.getLogger(__name__)

IMAGE_KINDS = ("volume", "image", "geotiff")
TEXT_KINDS = ("text",)
PASS_KINDS = ("ehr", "tabular")
KEY_COLUMNS = ("sample_id", "modality", "source_key", "position")
CHUNK_TAG_KEY = b"raypipe.embed_chunk"
OUTPUT_FILE = "part-00000.parquet"
ERRORS_FILE = "_errors.parquet"
SUMMARY_FILE = "_embed_summary.json"


class EmbeddingSpecMismatch(ValueError):
    """An embeddings table was not made the way the consumer (a trained model) expects."""


# ----------------------------------------------------------------------------- spec check
def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def check_embedding_spec(expected: Mapping[str, Any], table_schema: pa.Schema) -> None:
    """Raise :class:`EmbeddingSpecMismatch` (a ValueError) unless the table was embedded as ``expected`` says.

    ``expected`` is an embedding spec as stored in a table's metadata
    (``{"modalities": {m: {...}}}``; a bare ``{m: {...}}`` is accepted too), e.g.
    the one a model was trained on. Every modality of ``expected`` must be in
    the table and every key it lists (model, revision, dim, shape, pooling,
    preprocessing, ...) must be equal; extra modalities or keys in the table are fine.
    """
    found = read_json_metadata(table_schema, EMBEDDING_SPEC_KEY)
    if found is None:
        raise EmbeddingSpecMismatch("the table has no embedding spec in its metadata "
                                    f"({EMBEDDING_SPEC_KEY.decode()}): is it an embeddings table written by "
                                    "`raypipe embed`?")
    want_mods = expected.get("modalities", expected) if isinstance(expected, Mapping) else {}
    have_mods = found.get("modalities", {})
    problems = []
    for m, want in want_mods.items():
        if m not in have_mods:
            problems.append(f"the table lacks modality {m!r} (it has {sorted(have_mods)})")
            continue
        have = have_mods[m]
        for k in sorted(want):
            if _normalise(want[k]) != _normalise(have.get(k)):
                problems.append(f"{m}.{k}: expected {want[k]!r}, table has {have.get(k)!r}")
    if problems:
        raise EmbeddingSpecMismatch("embedding spec mismatch: " + "; ".join(problems)
                                    + ". Re-embed the records with the embed config the model was trained with.")


# ----------------------------------------------------------------------------- CPU stage
def _binary_views(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
    """The values of a binary column as zero-copy uint8 views (None for nulls).

    ``to_pylist()`` would copy every payload into a Python ``bytes`` (200 KB per 224x224
    float32 slice), and ``Scalar.as_buffer()`` costs about as much; views of the Arrow data
    buffer cost nothing.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[np.ndarray | None] = []
    for arr in chunks:
        if len(arr) == 0:
            continue
        if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):  # e.g. binary_view
            out.extend(arr.to_pylist())
            continue
        off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
        _, offsets, data = arr.buffers()
        offs = np.frombuffer(offsets, off_type, count=len(arr) + 1, offset=arr.offset * np.dtype(off_type).itemsize)
        values = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        out.extend(values[offs[j]:offs[j + 1]] if valid[j] else None for j in range(len(arr)))
    return out


def _fill(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src (broadcasting 1 channel to 3); a uint8 record (schema 2) is scaled by 1/255 on the
    way. float -> float16 through torch: numpy's conversion is scalar (~130 us per 224x224 slice here),
    torch's vectorised (~10 us)."""
    if src.dtype == np.uint8:
        if dst.dtype == np.float32:
            np.multiply(src, np.float32(1.0 / 255.0), out=dst, dtype=np.float32)
            return
        src = to_float(src)
    if dst.dtype == np.float16:
        from raypipe.embed.image import tensor_view

        tensor_view(dst).copy_(tensor_view(src))
    else:
        np.copyto(dst, src)


def _record_arrays(batch: pa.Table, skip: np.ndarray | None = None) -> list[np.ndarray | None]:
    """Each row's stored array (its dtype, zero-copy): from the row's ``tensor_<modality>`` column
    (records schema 2) or else its ``payload`` bytes (``dtype``/``shape``; schema 1 and fallbacks).
    Raises nothing: a row without either is None. Rows where ``skip`` is True are left None
    (the caller has them already)."""
    n = batch.num_rows
    out: list[np.ndarray | None] = [None] * n
    for name in batch.column_names:
        if name.startswith(TENSOR_PREFIX):
            for i, a in enumerate(tensor_rows(batch.column(name))):
                if a is not None and (skip is None or not skip[i]):
                    out[i] = a
    if "payload" in batch.column_names and batch.column("payload").null_count < n:
        payloads = _binary_views(batch.column("payload"))
        dtypes = batch.column("dtype").to_pylist()
        shapes = batch.column("shape").to_pylist()
        for i in range(n):
            if out[i] is None and payloads[i] is not None and (skip is None or not skip[i]):
                if dtypes[i] is None or shapes[i] is None:
                    out[i] = ValueError("record without dtype/shape")  # type: ignore[assignment]
                    continue
                try:
                    out[i] = payload_to_array(payloads[i], dtypes[i], shapes[i])
                except Exception as e:  # noqa: BLE001 - reported per row by the caller
                    out[i] = e  # type: ignore[assignment]
    return out


def _tensor_runs(batch: pa.Table, input_size: int) -> tuple[list[tuple[int, np.ndarray]], np.ndarray]:
    """Records of schema 2 that need no per-record work: runs of consecutive rows of a ``tensor_<m>``
    column whose tensors already are (1 or 3, ``input_size``, ``input_size``) (or 2-D of that size) and
    need no check (uint8 is always finite; float runs are checked here in one pass).

    Returns ``[(first row, (k, C, S, S) zero-copy view)]`` and a mask of the rows they cover; every
    other row takes the per-record path (resize, band projection, errors)."""
    n = batch.num_rows
    covered = np.zeros(n, bool)
    runs: list[tuple[int, np.ndarray]] = []
    for name in batch.column_names:
        if not name.startswith(TENSOR_PREFIX):
            continue
        start = 0
        for values, valid in tensor_chunks(batch.column(name)):
            k = len(values)
            if values.ndim == 3:
                values = values[:, None]
            if values.ndim != 4 or values.shape[1] not in (1, 3) or values.shape[2:] != (input_size, input_size):
                start += k
                continue
            if valid is None:
                spans = [(0, k)]
            else:  # runs of valid rows: edges where the mask flips
                edges = np.flatnonzero(np.diff(np.concatenate(([False], valid, [False])).astype(np.int8)))
                spans = list(zip(edges[::2].tolist(), edges[1::2].tolist()))
            for a, b in spans:
                run = values[a:b]
                if run.dtype != np.uint8 and not np.isfinite(run).all():
                    continue  # a non-finite record in the run: the per-record path reports which one
                runs.append((start + a, run))
                covered[start + a:start + b] = True
            start += k
    return runs, covered


def decode_image_batch(batch: pa.Table, input_size: int, band_projection: str = "mean_groups",
                       band_indices: Sequence[int] | None = None, pixel_dtype: str = "float32"
                       ) -> dict[str, np.ndarray]:
    """Ray Data task (CPU): image records -> ``pixels`` (N, 1 or 3, S, S) in [0, 1] and ``error``.

    ``pixel_dtype`` is float32, or float16 when the model runs under fp16/bf16 autocast on
    a GPU anyway (half the bytes through the object store and over PCIe).

    A record that cannot be decoded keeps zero pixels and a non-empty ``error``;
    the model stage skips it and the driver turns it into an errors row (the
    zeros never reach the table).

    The usual case (records schema 2 at the model's size) is converted a run of rows at a time,
    one vectorised operation over the tensor column's buffer and no Python per record; the
    values are the same as the per-record path's (elementwise, the same operations).
    """
    from raypipe.embed.image import preprocess_images

    n = batch.num_rows
    runs, covered = _tensor_runs(batch, input_size)
    arrays = _record_arrays(batch, skip=covered) if not covered.all() else [None] * n
    errors = [""] * n
    by_shape: dict[tuple, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for i in range(n):
        if covered[i]:
            continue
        try:
            a = arrays[i]
            if isinstance(a, Exception):
                raise a
            if a is None:
                raise ValueError("image record without payload/dtype/shape")
            if a.ndim == 2:
                a = a[None]
            if a.ndim != 3:
                raise ValueError(f"image record of shape {list(a.shape)}: expected (C, H, W)")
            if a.dtype == np.uint8:  # schema 2: round(255 * v), always finite; scaled in _fill
                by_shape[a.shape].append((i, a))
                continue
            a = a.astype(np.float32, copy=False)
            if not np.isfinite(a).all():
                raise ValueError("image record with non-finite values")
            by_shape[a.shape].append((i, a))
        except Exception as e:  # noqa: BLE001 - a corrupt record is data, not a crash
            errors[i] = f"{type(e).__name__}: {e}"
    # model input in [0, 1] (normalised by the model stage): one channel when every record has one
    channels = 1 if (all(shape[0] == 1 for shape in by_shape) and all(r.shape[1] == 1 for _, r in runs)) else 3
    # zeros cost nothing extra (fresh zero pages, written once anyway) and cover every failed row
    pixels = np.zeros((n, channels, input_size, input_size), np.dtype(pixel_dtype))
    for first, run in runs:  # (k, 1 or C, S, S) -> pixels[first:first + k], broadcasting 1 channel to 3
        _fill(pixels[first:first + len(run)], run)
    for shape, rows in by_shape.items():
        try:
            if shape[1:] == (input_size, input_size) and shape[0] in (1, channels):
                # the usual case (ingest already resized): each record straight into the output,
                # (1, S, S) broadcast to 3 channels in a mixed batch; no stacked copy
                for i, a in rows:
                    _fill(pixels[i], a)
                continue
            idx = [i for i, _ in rows]
            pixels[idx] = preprocess_images(np.stack([to_float(a) for _, a in rows]), input_size, band_projection, band_indices,
                                            normalize=False, keep_gray=True)  # (k, 1, S, S) broadcasts to 3
        except Exception as e:  # noqa: BLE001 - e.g. band_indices out of range for these records
            for i, _ in rows:
                errors[i] = f"{type(e).__name__}: {e}"
                pixels[i] = 0  # a partial fast-path fill must not travel on
    out = {k: batch.column(k).to_numpy(zero_copy_only=False) for k in KEY_COLUMNS}
    out["pixels"] = pixels
    out["error"] = np.array(errors, dtype=object)
    return out


def _row_groups(md: Any, mods: Sequence[str], ids: Sequence[str] | None) -> list[int]:
    """Row groups of a records file (Parquet metadata ``md``) that may hold records of ``mods`` (and of
    ``ids``, sorted), from the key columns' min/max statistics; a group without statistics is kept."""
    col = {md.schema.column(i).path: i for i in range(md.num_columns)}  # leaf paths: key columns are flat
    keep = []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)

        def overlaps(name: str, wanted: Sequence[str]) -> bool:
            st = rg.column(col[name]).statistics if name in col else None
            if st is None or not st.has_min_max or not isinstance(st.min, str) or not isinstance(st.max, str):
                return True
            j = bisect.bisect_left(wanted, st.min)
            return j < len(wanted) and wanted[j] <= st.max

        if overlaps("modality", sorted(mods)) and (ids is None or overlaps("sample_id", ids)):
            keep.append(g)
    return keep


def read_image_files(paths: pa.Table, columns: Sequence[str], mods: Sequence[str], ids: Sequence[str] | None,
                     rows: int, filesystem: Any = None, **kwargs: Any) -> Iterable[dict[str, np.ndarray]]:
    """Ray Data task: records files -> :func:`decode_image_batch` output, ``rows`` records at a time.

    Each file is read with ``pq.ParquetFile.iter_batches(batch_size=rows)``: Parquet's list reader then
    holds one batch's levels and values at a time. (Arrow's dataset scanner, which ``read_parquet`` uses,
    decodes a whole row group first: a tensor column's int32 values and two int16 level arrays per pixel,
    8x the group's bytes in fresh memory; benchmarks/RESULTS.md, issue 17.) Row groups are pruned by the
    key columns' statistics and the modality / sample-id filter is applied per batch, so the records read
    are those ``read_parquet(...).filter(...)`` would give. ``ids``: sorted, or None for all."""
    import pyarrow.parquet as pq

    wanted_mods = pa.array(list(mods), pa.string())
    wanted_ids = None if ids is None else set(ids)  # a Python set once per task, not a hash table per batch
    for path in paths.column("path").to_pylist():
        with pq.ParquetFile(path, filesystem=filesystem) as pf:
            groups = _row_groups(pf.metadata, mods, ids)
            cols = [c for c in columns if c in pf.schema_arrow.names]
            batches = (pf.iter_batches(batch_size=max(1, rows), row_groups=groups, columns=cols, use_threads=False)
                       if groups else [])
            for rb in batches:
                t = pa.Table.from_batches([rb])
                mask = pc.is_in(t.column("modality"), value_set=wanted_mods)
                if wanted_ids is not None:
                    mask = pc.and_(mask, pa.array([v in wanted_ids for v in t.column("sample_id").to_pylist()]))
                n = pc.sum(mask).as_py() or 0
                if n == 0:
                    continue
                if n < t.num_rows:
                    t = t.filter(mask)
                yield decode_image_batch(t, **kwargs)


# ----------------------------------------------------------------------------- actors
def _ok_rows(errors: np.ndarray) -> np.ndarray:
    return np.array([not e for e in errors], dtype=bool)


class ImageActor:
    """Ray Data callable class: one ResNet per actor (loaded once in ``__init__``), decoded pixel batches in."""

    def __init__(self, image_cfg: dict, seed: int, precision: str, threads: int, batch_size: int,
                 device: str | None = None):
        import torch

        from raypipe import console
        from raypipe.embed.image import ImageEmbedder

        console.worker_setup()  # raypipe's warnings from this actor reach the driver's console
        torch.set_num_threads(max(1, threads))
        # device None: CUDA when this actor was given a GPU (Ray hides the GPUs from the others)
        self.embedder = ImageEmbedder.from_config(image_cfg, seed=seed, device=device, precision=precision,
                                                  fixed_batch=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = _ok_rows(batch["error"])
        emb = np.zeros((len(ok), self.embedder.dim), np.float32)  # rows with an error are dropped by the driver
        pixels = batch["pixels"]
        if pixels.dtype == object:  # decode batches of 1 and of 3 channels met in one block: all to 3
            pixels = np.stack([np.broadcast_to(p, (3,) + p.shape[1:]) for p in pixels])
        if ok.all():  # the usual case: no boolean-index copy of the whole pixel batch
            emb = self.embedder.embed_pixels(pixels)
        elif ok.any():
            emb[ok] = self.embedder.embed_pixels(pixels[ok])
        return {**{k: batch[k] for k in KEY_COLUMNS}, "embedding": emb, "error": batch["error"]}


class TextActor:
    """Ray Data callable class: one text encoder per actor, batches of report records."""

    def __init__(self, text_cfg: dict, seed: int, precision: str, threads: int, device: str | None = None):
        import torch

        from raypipe import console
        from raypipe.embed.text import TextEmbedder

        console.worker_setup()  # raypipe's warnings from this actor reach the driver's console
        torch.set_num_threads(max(1, threads))
        self.embedder = TextEmbedder.from_config(text_cfg, seed=seed, device=device, precision=precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = list(batch["text"])
        errors = np.array(["" if isinstance(t, str) and t.strip() else "ValueError: empty or missing report text"
                           for t in texts], dtype=object)
        ok = _ok_rows(errors)
        emb = np.zeros((len(texts), self.embedder.dim), np.float32)
        if ok.any():
            emb[ok] = self.embedder([t for t, good in zip(texts, ok) if good])
        return {**{k: batch[k] for k in KEY_COLUMNS}, "embedding": emb, "error": errors}


# ----------------------------------------------------------------------------- aggregation
def aggregate(rows: Iterable[tuple[str, int, np.ndarray]], how: str = "mean", keep_slices: int = 16) -> np.ndarray:
    """Per-slice vectors of one sample and modality -> its embedding.

    ``rows`` are (series key, position, vector). ``mean``/``max``: within each
    series, then across the sample's series -> (dim,). ``all``: every slice,
    series in key order and slices in position order, resampled along the slice
    axis to exactly ``keep_slices`` (nearest index: repeats or skips slices, never
    pads with zeros) -> (keep_slices, dim).
    """
    series: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for key, pos, v in rows:
        series[key].append((int(pos), np.asarray(v, np.float32)))
    if not series:
        raise ValueError("aggregate() needs at least one slice")
    ordered = [np.stack([v for _, v in sorted(series[k], key=lambda t: t[0])]) for k in sorted(series)]
    if how == "all":
        stacked = np.concatenate(ordered)
        idx = np.floor(np.linspace(0, len(stacked) - 1, keep_slices) + 0.5).astype(int)
        return stacked[idx]
    if how == "max":
        return np.stack([s.max(0) for s in ordered]).max(0)
    if how == "mean":
        return np.stack([s.mean(0, dtype=np.float64) for s in ordered]).mean(0).astype(np.float32)
    raise ValueError(f"unknown aggregation {how!r} (mean, max, all)")


# ----------------------------------------------------------------------------- plan
def modality_kinds(cfg: Config, present: Iterable[str] | None = None) -> dict[str, str]:
    """{modality: kind} of the configured modalities (restricted to ``present`` when given)."""
    kinds = {m: c.kind for m, c in cfg.ingest.modalities.items()}
    if present is not None:
        present = set(present)
        kinds = {m: k for m, k in kinds.items() if m in present}
    return kinds


def pool_plan(cfg: Config, resources: Mapping[str, float], can_grow: bool = False) -> dict[str, Any]:
    """Actors per model, CPUs/GPUs per actor, torch threads and batch size for this cluster.

    ``embed.pool_size``/``num_gpus_per_actor``/``batch_size`` win when set. Otherwise:
    two actors per GPU (batch 256), or on a CPU-only cluster one single-threaded actor
    per CPU (batch 32). One process per core beats one process with a thread per core
    (convolutions scale better across processes than across intra-op threads), and the
    decode work is about 3 % of a CPU model's: an actor per CPU "but one" left half of a
    2-core machine idle. The CPU *resource* each actor asks for is capped
    (:func:`raypipe.runtime.actor_cpus`) so that the pool never holds every logical CPU:
    Ray Data's file listing and read/decode tasks ask for one, and without it the
    pipeline hangs. Each actor still runs exactly ``threads`` torch threads.

    ``can_grow``: the cluster was joined (an autoscaler may add nodes), so GPUs it lacks *now*
    are a warning, not an error: its GPU nodes may start at zero and come up when the pool asks
    for them. The derived defaults only see the GPUs present now; on such a cluster set
    ``embed.num_gpus_per_actor`` and ``embed.pool_size`` (configs/lung.yaml does).
    """
    from raypipe.runtime import actor_cpus

    cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    e = cfg.embed
    # Two actors per GPU by default: one actor's host work (copy into the pinned buffer, reading
    # the result back) then overlaps with the other's kernels (H100: 9,100 vs 7,400 slices/s).
    ngpu = e.num_gpus_per_actor if e.num_gpus_per_actor is not None else (0.5 if gpus >= 1 else 0.0)
    if e.pool_size:
        size = int(e.pool_size)
    elif ngpu > 0:
        size = max(1, int(gpus // ngpu))
    else:
        size = max(1, int(cpus))
    if ngpu > 0 and size * ngpu > gpus + 1e-9:
        what = f"embed.pool_size={size} actors x {ngpu:g} GPU each need {size * ngpu:g} GPUs, the cluster has {gpus:g}"
        if not can_grow:
            raise ValueError(f"{what}{' (no GPU)' if not gpus else ''}: lower embed.pool_size or "
                             "embed.num_gpus_per_actor, or set embed.num_gpus_per_actor=0 for CPU actors (the pool "
                             "would wait forever)")
        log.warning("embed: %s now; the pool waits for the autoscaler to add GPU nodes (on a fixed-size cluster, "
                    "lower embed.pool_size or embed.num_gpus_per_actor)", what)
    cpu_per = actor_cpus(size, cpus)
    return {"size": size, "num_cpus": cpu_per, "num_gpus": float(ngpu), "threads": max(1, int(cpu_per)),
            "batch_size": int(e.batch_size or (256 if ngpu > 0 else 32))}


def embedding_spec(cfg: Config, kinds: Mapping[str, str], pass_shapes: Mapping[str, Sequence[int]]
                   ) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(spec, shapes): what each modality's embedding is and how it was made. Loads model configs, not weights."""
    from raypipe.embed.image import image_model_info

    spec: dict[str, Any] = {"modalities": {}}
    shapes: dict[str, tuple[int, ...]] = {}
    image_info = text_info = None
    for m, kind in kinds.items():
        ing = cfg.ingest.modalities.get(m)
        if kind in IMAGE_KINDS:
            ic = cfg.embed.image
            image_info = image_info or image_model_info(ic)
            dim = image_info["dim"]
            shapes[m] = (ic.keep_slices, dim) if ic.aggregation == "all" else (dim,)
            entry = {"kind": kind, "model": image_info["model"], "revision": image_info["revision"],
                     "weights": ic.weights, "dim": dim, "pooling": "resnet-avgpool", "aggregation": ic.aggregation,
                     "preprocessing": {"input_size": ic.input_size, "channels": "gray->repeat3",
                                       "band_projection": ic.band_projection, "band_indices": ic.band_indices,
                                       "normalisation": "imagenet",
                                       "record_size": ing.size if ing else None,
                                       "window": list(ing.window) if ing and ing.window else None}}
            if ic.aggregation == "all":
                entry["keep_slices"] = ic.keep_slices
            if ic.weights == "random":
                entry["seed"] = cfg.run.seed
        elif kind in TEXT_KINDS:
            from raypipe.embed.text import text_model_info

            tc = cfg.embed.text
            text_info = text_info or text_model_info(tc)
            shapes[m] = (text_info["dim"],)
            entry = {"kind": kind, "model": tc.model, "revision": text_info["revision"], "weights": tc.weights,
                     "dim": text_info["dim"], "pooling": tc.pooling,
                     "preprocessing": {"max_tokens": tc.max_tokens, "max_words": ing.max_words if ing else None}}
            if tc.weights == "random":
                entry["seed"] = cfg.run.seed
        else:
            shapes[m] = tuple(int(s) for s in pass_shapes[m])
            entry = {"kind": kind, "model": "identity", "revision": None, "dim": int(np.prod(shapes[m])),
                     "pooling": "none", "preprocessing": {"source": "ingest"}}
        spec["modalities"][m] = entry
    return spec, shapes


def _records_fingerprint(records_path: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(records_path)):
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(f"{os.path.relpath(p, records_path)}:{os.path.getsize(p)}\n".encode())
    return h.hexdigest()[:16]


def _chunk_tag(spec: dict, plan: Mapping[str, Any], fingerprint: str, ids: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps({"spec": spec, "batch_size": plan["batch_size"], "records": fingerprint},
                                  sort_keys=True).encode())
    h.update("\n".join(ids).encode())
    return h.hexdigest()[:24]


def _error_row(sid: str, modality: str, key: str, position: Any, error: str) -> dict:
    cls, _, msg = error.partition(": ")
    return {"source_path": f"records:{sid}/{modality}/{key}/{position}", "stage": "embed", "modality": modality,
            "error_class": cls or "EmbedError",
            "message": (msg or error) + " (fix or drop the record upstream and re-run ingest; the sample keeps its "
                                        "other modalities)"}


# ----------------------------------------------------------------------------- model families, streamed
#: model families run as actor pools; pass-through kinds are read on the driver
FAMILIES = {"image": IMAGE_KINDS, "text": TEXT_KINDS}


def _family_dataset(cfg: Config, family: str, records_path: str, mods: list[str], ids: list[str] | None,
                    plan: Mapping[str, Any], model_stage: bool = True):
    """read (+ filter) -> [CPU decode, in the read tasks] -> model actor pool, as one Ray Dataset.

    ``model_stage=False`` stops before the actor pool: the CPU feed alone (``embed_bench.py --feed-only``
    measures how many slices per second the host can hand to the model actors).
    """
    import ray.data
    from ray.data.expressions import col

    columns = ([*KEY_COLUMNS, "payload", "dtype", "shape", *_tensor_columns(records_path, mods)]
               if family == "image" else [*KEY_COLUMNS, "text"])
    if family != "image":  # text records: no tensor columns, Ray's Parquet reader with the filter pushed down
        pred = col("modality").is_in(mods)
        if ids is not None:
            pred = pred & col("sample_id").is_in(ids)
        ds = ray.data.read_parquet(records_path).select_columns(columns).filter(expr=pred)
    # Start-up: a CPU pool (one actor per CPU) starts one actor short and Ray Data adds the last one
    # as batches queue up. With every actor importing torch + transformers at once, the listing and
    # read tasks had no core of their own and the first result came later (2 cores, i.e. one actor
    # first and the second after it: 10.6-11.6 -> 8.7-10.0 s). GPU pools start whole: their host has
    # CPUs to spare, and a GPU without its actor idles.
    size = int(plan["size"])
    strategy = (ray.data.ActorPoolStrategy(min_size=size - 1, max_size=size, initial_size=size - 1)
                if size > 1 and not plan["num_gpus"] else ray.data.ActorPoolStrategy(size=size))
    pool = dict(compute=strategy, num_cpus=plan["num_cpus"],
                num_gpus=plan["num_gpus"], batch_size=plan["batch_size"])
    common = {"seed": cfg.run.seed, "precision": cfg.embed.precision, "threads": plan["threads"]}
    # One block per model batch (streaming, no shuffle): a few large files would otherwise reach the
    # pool as a few blocks and leave actors idle.
    rebatch = {"target_num_rows_per_block": plan["batch_size"]}
    if family == "image":
        ic = cfg.embed.image
        half = plan["num_gpus"] > 0 and cfg.embed.precision != "fp32"
        # Decoding runs inside the read tasks (Ray Data fuses read -> decode -> repartition into one task
        # operator), on the CPUs beside the model actors, so it overlaps with the model. The decode asks
        # for 1 CPU like the read; should the actors ask for exactly that too, Ray Data would fuse the
        # task stage into the actors and serialise decode and model again, so then it asks for less.
        decode_cpus = 0.5 if (plan["num_cpus"] == 1.0 and not plan["num_gpus"]) else None
        # One task per records file reads it batch by batch and decodes each batch (read_image_files):
        # no Parquet footer actors or listing task per run, and a tensor column's row group is never
        # decoded whole (see read_image_files).
        import pyarrow.dataset as pads

        src = pads.dataset(records_path, format="parquet")
        files = sorted(src.files)
        ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, len(files)))
        ds = ds.map_batches(read_image_files, batch_format="pyarrow", batch_size=1, num_cpus=decode_cpus,
                            fn_kwargs={"columns": columns, "mods": list(mods),
                                       "ids": None if ids is None else sorted(ids), "rows": plan["batch_size"],
                                       "filesystem": src.filesystem, "input_size": ic.input_size,
                                       "band_projection": ic.band_projection, "band_indices": ic.band_indices,
                                       "pixel_dtype": "float16" if half else "float32"})
        if not model_stage:
            return ds.repartition(**rebatch)
        return ds.repartition(**rebatch).map_batches(ImageActor, batch_format="numpy", **pool, fn_constructor_kwargs={
            "image_cfg": ic.model_dump(), "batch_size": plan["batch_size"], **common})
    ds = ds.repartition(**rebatch)
    if not model_stage:
        return ds
    return ds.map_batches(TextActor, batch_format="numpy", **pool,
                          fn_constructor_kwargs={"text_cfg": cfg.embed.text.model_dump(), **common})


def _tensor_columns(records_path: str, mods: Sequence[str]) -> list[str]:
    """The ``tensor_<m>`` columns of ``mods`` that the records table has (none in schema 1 records)."""
    import pyarrow.dataset as pads

    names = set(pads.dataset(records_path, format="parquet").schema.names)
    return [tensor_column(m) for m in mods if tensor_column(m) in names]


def _part_path(partial: str, ci: int, family: str) -> tuple[str, str]:
    base = os.path.join(partial, f"chunk-{ci:05d}.{family}")
    return base + ".parquet", base + ".errors.parquet"


def _write_atomic(table: pa.Table, path: str) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path + ".tmp")
    os.replace(path + ".tmp", path)


def _write_family_part(partial: str, ci: int, family: str, tag: bytes, vectors: Mapping[tuple[str, str], np.ndarray],
                       errors: list[dict], seen: int) -> None:
    """One chunk's results of one model family: (sample_id, modality, embedding) rows; errors written first."""
    part, err = _part_path(partial, ci, family)
    keys = sorted(vectors)
    table = pa.table({"sample_id": pa.array([k[0] for k in keys], pa.string()),
                      "modality": pa.array([k[1] for k in keys], pa.string()),
                      "embedding": pa.array([np.asarray(vectors[k], np.float32).reshape(-1) for k in keys],
                                            pa.list_(pa.float32()))})
    _write_atomic(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), err)
    _write_atomic(table.replace_schema_metadata({CHUNK_TAG_KEY: tag, b"raypipe.records_seen": str(seen).encode()}),
                  part)


def _has_part(path: str, tag: bytes, errors_path: str | None = None) -> bool:
    import pyarrow.parquet as pq

    if not os.path.isfile(path) or (errors_path and not os.path.isfile(errors_path)):
        return False
    try:
        return (pq.read_schema(path).metadata or {}).get(CHUNK_TAG_KEY) == tag
    except Exception:  # noqa: BLE001 - a torn or foreign file is redone
        return False


def _finish_family_chunk(family: str, cfg: Config, rows: Mapping[tuple[str, str], list], errors: list[dict]
                         ) -> dict[tuple[str, str], np.ndarray]:
    """Per-record vectors of one chunk -> one embedding per (sample, modality)."""
    out: dict[tuple[str, str], np.ndarray] = {}
    for (sid, m), recs in sorted(rows.items()):
        if family == "image":
            out[(sid, m)] = aggregate(recs, cfg.embed.image.aggregation, cfg.embed.image.keep_slices)
            continue
        recs = sorted(recs, key=lambda r: (r[0], r[1]))
        out[(sid, m)] = recs[0][2]  # one report per sample and modality: the first by (source_key, position)
        for key, pos, _ in recs[1:]:
            errors.append(_error_row(sid, m, key, pos, "DuplicateRecord: more than one report for this sample"))
    return out


def _stream_family(cfg: Config, family: str, records_path: str, mods: list[str], chunks: Mapping[int, list[str]],
                   all_chunks: bool, plan: Mapping[str, Any], partial: str, tags: Mapping[int, bytes]) -> int:
    """Embed ``family``'s records of ``chunks`` in ONE Ray Data pass (one actor pool for the whole run).

    Each chunk's part is written as soon as all of its records have come back, so
    a crash loses at most the chunks in flight. Returns the number of records embedded.
    """
    import pyarrow.dataset as pads

    chunk_of = {s: ci for ci, ids in chunks.items() for s in ids}
    id_filter = None if all_chunks else [s for ids in chunks.values() for s in ids]
    flt = pads.field("modality").isin(mods)
    if id_filter is not None:
        flt = flt & pads.field("sample_id").isin(id_filter)
    index = pads.dataset(records_path, format="parquet").to_table(columns=["sample_id"], filter=flt)
    remaining = Counter(chunk_of[s] for s in index.column("sample_id").to_pylist() if s in chunk_of)
    rows: dict[int, dict[tuple[str, str], list]] = defaultdict(lambda: defaultdict(list))
    errors: dict[int, list[dict]] = defaultdict(list)
    seen: Counter = Counter()

    def finish(ci: int) -> None:
        vectors = _finish_family_chunk(family, cfg, rows.pop(ci, {}), errors[ci])
        _write_family_part(partial, ci, family, tags[ci], vectors, errors.pop(ci, []), seen[ci])
        log.info("embed: %s part of chunk %d written (%d records)", family, ci, seen[ci])

    for ci in chunks:
        if not remaining[ci]:
            finish(ci)  # nothing of this family in the chunk: an empty part
    if not sum(remaining.values()):
        return 0
    ds = _family_dataset(cfg, family, records_path, mods, id_filter, plan)
    total = 0
    # prefetch_batches=0: with the default (1) the iterator hands over block i only once block i+1
    # exists, so every chunk (and the first result) waited one whole model batch longer than needed
    for b in ds.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=0):
        emb = np.asarray(b["embedding"], np.float32)
        for i, (sid, m, key, pos, err) in enumerate(zip(b["sample_id"].tolist(), b["modality"].tolist(),
                                                        b["source_key"].tolist(), b["position"].tolist(),
                                                        b["error"].tolist())):
            ci = chunk_of.get(sid)
            if ci is None:
                continue  # records of samples not in samples.parquet are not embedded
            if err:
                errors[ci].append(_error_row(sid, m, key, pos, err))
            else:
                rows[ci][(sid, m)].append((key, pos, emb[i].copy()))
            seen[ci] += 1
            total += 1
            remaining[ci] -= 1
            if remaining[ci] == 0:
                finish(ci)
    short = {ci: n for ci, n in remaining.items() if n > 0}
    if short:
        raise RuntimeError(f"embed: the {family} pipeline returned fewer records than the records table holds "
                           f"(missing per chunk: {short}); re-run to resume")
    return total


# ----------------------------------------------------------------------------- one chunk
def _pass_through(records_path: str, ids: list[str], mods: list[str], pass_shapes: Mapping[str, Sequence[int]]
                  ) -> tuple[dict[tuple[str, str], np.ndarray], list[dict], int]:
    """EHR/tabular records of ``ids``, unchanged (shape-checked); one per sample and modality."""
    import pyarrow.dataset as pads

    if not mods:
        return {}, [], 0
    table = pads.dataset(records_path, format="parquet").to_table(
        columns=[*KEY_COLUMNS, "payload", "dtype", "shape", *_tensor_columns(records_path, mods)],
        filter=pads.field("sample_id").isin(ids) & pads.field("modality").isin(mods))
    table = table.sort_by([(k, "ascending") for k in KEY_COLUMNS])
    out: dict[tuple[str, str], np.ndarray] = {}
    errors: list[dict] = []
    arrays = _record_arrays(table)
    for i, r in enumerate(table.select(KEY_COLUMNS).to_pylist()):
        sid, m = r["sample_id"], r["modality"]
        try:
            if isinstance(arrays[i], Exception):
                raise arrays[i]
            if arrays[i] is None:
                raise ValueError("record without payload/dtype/shape")
            a = to_float(arrays[i]).astype(np.float32, copy=True)  # float16 EHR widened (exact)
            if tuple(a.shape) != tuple(pass_shapes[m]):
                raise ValueError(f"shape {list(a.shape)} differs from the modality's {list(pass_shapes[m])}")
            if (sid, m) in out:
                raise LookupError("more than one record for this sample")
            out[(sid, m)] = a
        except Exception as e:  # noqa: BLE001 - a bad record is an errors row
            cls = "DuplicateRecord" if isinstance(e, LookupError) else type(e).__name__
            errors.append(_error_row(sid, m, r["source_key"], r["position"], f"{cls}: {e}"))
    return out, errors, table.num_rows


def _fixed_list(values: Mapping[str, np.ndarray], ids: Sequence[str], width: int) -> tuple[pa.Array, pa.Array]:
    present = np.array([s in values for s in ids], dtype=bool)
    flat = np.zeros((len(ids), width), np.float32)  # storage under the null mask only: never read as data
    for j, s in enumerate(ids):
        if present[j]:
            flat[j] = np.asarray(values[s], np.float32).reshape(-1)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width, mask=pa.array(~present))
    return arr, pa.array(present)


def _embed_chunk(ci: int, ids: list[str], samples_part: pa.Table, schema: pa.Schema,
                 shapes: Mapping[str, tuple[int, ...]], kinds: Mapping[str, str], records_path: str,
                 pass_shapes: Mapping[str, Sequence[int]], partial: str, tag: bytes) -> None:
    """Assemble chunk ``ci``: the model families' parts + the pass-through records -> its final rows (atomic)."""
    import pyarrow.parquet as pq

    vectors: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    errors: list[dict] = []
    seen = 0
    used_parts = []
    for family, fam_kinds in FAMILIES.items():
        if not any(k in fam_kinds for k in kinds.values()):
            continue
        part, err = _part_path(partial, ci, family)
        t = pq.read_table(part)
        seen += int((t.schema.metadata or {}).get(b"raypipe.records_seen", b"0"))
        for sid, m, v in zip(t.column("sample_id").to_pylist(), t.column("modality").to_pylist(),
                             t.column("embedding").to_numpy(zero_copy_only=False)):
            vectors[m][sid] = v
        errors += pq.read_table(err).to_pylist()
        used_parts += [part, err]
    passed, pass_errors, n_pass = _pass_through(records_path, ids, [m for m, k in kinds.items() if k in PASS_KINDS],
                                                pass_shapes)
    for (sid, m), v in passed.items():
        vectors[m][sid] = v
    errors += pass_errors
    seen += n_pass
    cols: dict[str, pa.Array] = {}
    for f in schema:
        if f.name in samples_part.column_names:
            cols[f.name] = samples_part.column(f.name).cast(f.type)
    for m in shapes:
        cols[embedding_column(m)], cols[mask_column(m)] = _fixed_list(vectors.get(m, {}), ids, int(np.prod(shapes[m])))
    table = pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)
    errors.sort(key=lambda r: (r["source_path"], r["error_class"]))
    path = os.path.join(partial, f"chunk-{ci:05d}.parquet")
    # errors first: the chunk file is the commit marker of the whole chunk
    _write_atomic(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), path.replace(".parquet", ".errors.parquet"))
    _write_atomic(table.replace_schema_metadata({**schema.metadata, CHUNK_TAG_KEY: tag,
                                                 b"raypipe.records_seen": str(seen).encode()}), path)
    for p in used_parts:
        os.remove(p)


# ----------------------------------------------------------------------------- driver
def _scan_records(records_path: str, kinds: Mapping[str, str]) -> tuple[set[str], dict[str, tuple[int, ...]]]:
    """Modalities present, and the common shape of each pass-through modality (the most frequent one)."""
    import pyarrow.dataset as pads

    t = pads.dataset(records_path, format="parquet").to_table(columns=["modality", "shape"])
    present = set(t.column("modality").unique().to_pylist())
    pass_mods = [m for m, k in kinds.items() if k in PASS_KINDS and m in present]
    shapes: dict[str, tuple[int, ...]] = {}
    if pass_mods:
        counts: dict[str, Counter] = defaultdict(Counter)
        for m, s in zip(t.column("modality").to_pylist(), t.column("shape").to_pylist()):
            if m in pass_mods and s:
                counts[m][tuple(s)] += 1
        for m in pass_mods:
            if counts[m]:  # most frequent; ties -> the smallest shape, deterministically
                shapes[m] = sorted(counts[m].items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    return present, shapes


def run_embed(cfg: Config) -> dict:
    """Embed ``cfg.embed_input`` (records dir) into ``cfg.embeddings_dir``; resumable by chunk. Returns a summary.

    The summary has ``ok`` (errors within ``ingest.error_budget`` of the records),
    per-modality ``dim``/``shape``/``present`` counts, ``records``, ``errors``,
    ``chunks``/``chunks_resumed``/``parts_resumed``, the actor ``pool`` plan and the paths.
    """
    import pyarrow.parquet as pq

    from raypipe.runtime import cluster_resources, init_ray

    t0 = time.perf_counter()
    src = cfg.embed_input
    records_path = os.path.join(src, "records")
    samples_path = os.path.join(src, "samples.parquet")
    if not os.path.isfile(samples_path) or not os.path.isdir(records_path):
        raise FileNotFoundError(f"{src} has no samples.parquet and records/: run `raypipe ingest` first "
                                "or point embed.input at an ingest output")
    samples_raw = pq.read_table(samples_path)
    samples = samples_raw.sort_by("sample_id")
    ids = samples.column("sample_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError(f"{samples_path}: duplicate sample_id values; every sample must appear once")

    present, pass_shapes = _scan_records(records_path, modality_kinds(cfg))
    kinds = modality_kinds(cfg, present)
    if not kinds:
        raise ValueError(f"no records of the configured modalities {sorted(cfg.ingest.modalities)} in "
                         f"{records_path} (it has {sorted(present)}): check ingest.modalities")
    absent = sorted(set(cfg.ingest.modalities) - set(kinds))
    if absent:
        log.warning("embed: configured modalities without any records are left out of the table: %s", absent)

    rctx = init_ray(cfg)
    # a joined cluster may be autoscaling: GPUs it lacks now may come when the pool asks for them
    plan = pool_plan(cfg, cluster_resources(), can_grow=rctx.address is not None)
    spec, shapes = embedding_spec(cfg, kinds, pass_shapes)
    label_cols = [c for c in cfg.ingest.label_columns if c in samples.column_names]
    missing_labels = sorted(set(cfg.ingest.label_columns) - set(label_cols))
    if missing_labels:
        log.warning("embed: label columns %s not in samples.parquet", missing_labels)
    group_cols = [c for c in samples.column_names if c not in ("sample_id", *label_cols)]
    label_types = {samples.schema.field(c).type for c in label_cols}
    label_type = label_types.pop() if len(label_types) == 1 else pa.float64()
    schema = embeddings_schema(shapes, label_cols, group_cols, spec=spec, label_type=label_type)
    extra_meta = {k: v for k, v in (samples_raw.schema.metadata or {}).items() if k in (NORMALISATION_KEY, TASK_KEY)}
    schema = schema.with_metadata({**schema.metadata, **extra_meta})

    out_dir = cfg.embeddings_dir.rstrip("/")
    partial = out_dir + ".partial"
    os.makedirs(partial, exist_ok=True)
    fingerprint = _records_fingerprint(records_path)
    n = cfg.embed.chunk_samples
    chunks = [ids[i:i + n] for i in range(0, len(ids), n)]
    tags = {ci: _chunk_tag(spec, plan, fingerprint, chunk).encode() for ci, chunk in enumerate(chunks)}
    chunk_file = {ci: os.path.join(partial, f"chunk-{ci:05d}.parquet") for ci in range(len(chunks))}
    todo = [ci for ci in range(len(chunks))
            if not _has_part(chunk_file[ci], tags[ci], chunk_file[ci].replace(".parquet", ".errors.parquet"))]
    log.info("embed: %d samples in %d chunks (%d to do), modalities %s, pool %s", len(ids), len(chunks), len(todo),
             kinds, {k: round(v, 3) if isinstance(v, float) else v for k, v in plan.items()})
    parts_resumed = 0
    for family, fam_kinds in FAMILIES.items():
        mods = [m for m, k in kinds.items() if k in fam_kinds]
        if not mods or not todo:
            continue
        need = {ci: chunks[ci] for ci in todo
                if not _has_part(_part_path(partial, ci, family)[0], tags[ci], _part_path(partial, ci, family)[1])}
        parts_resumed += len(todo) - len(need)
        if need:
            _stream_family(cfg, family, records_path, mods, need, len(need) == len(chunks), plan, partial, tags)
    for ci in todo:
        _embed_chunk(ci, chunks[ci], samples.slice(ci * n, len(chunks[ci])), schema, shapes, kinds, records_path,
                     pass_shapes, partial, tags[ci])
        log.info("embed: chunk %d/%d committed", ci + 1, len(chunks))

    # --- assemble: every chunk already has the final schema. Streamed, one row group per chunk, so the
    # driver holds one chunk at a time however many samples there are.
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    records_seen, n_samples, n_errors = 0, 0, 0
    present_counts = {m: 0 for m in shapes}
    with pq.ParquetWriter(os.path.join(tmp, OUTPUT_FILE), schema) as table_out, \
            pq.ParquetWriter(os.path.join(tmp, ERRORS_FILE), ERRORS_SCHEMA) as errors_out:
        for ci in range(len(chunks)):
            p = pq.read_table(chunk_file[ci])
            records_seen += int((p.schema.metadata or {}).get(b"raypipe.records_seen", b"0"))
            table_out.write_table(p.replace_schema_metadata(schema.metadata))
            n_samples += p.num_rows
            for m in shapes:
                present_counts[m] += int(pc.sum(p.column(mask_column(m))).as_py() or 0)
            errs = pq.read_table(chunk_file[ci].replace(".parquet", ".errors.parquet"))
            errors_out.write_table(errs.cast(ERRORS_SCHEMA))
            n_errors += errs.num_rows
    error_rate = n_errors / records_seen if records_seen else 0.0
    summary = {
        "ok": error_rate <= cfg.ingest.error_budget,
        "samples": n_samples,
        "modalities": {m: {"kind": kinds[m], "dim": int(np.prod(shapes[m])), "shape": list(shapes[m]),
                           "present": present_counts[m]} for m in shapes},
        "modalities_without_records": absent,
        "records": records_seen,
        "errors": n_errors,
        "error_rate": round(error_rate, 6),
        "chunks": len(chunks),
        "chunks_resumed": len(chunks) - len(todo),
        "parts_resumed": parts_resumed,
        "pool": plan,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    with open(os.path.join(tmp, SUMMARY_FILE), "w") as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
    # swap in: the old table (if any) stays until the new one is in place
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)
    summary["embeddings_dir"] = os.path.abspath(out_dir)
    summary["errors_path"] = os.path.join(summary["embeddings_dir"], ERRORS_FILE)
    if not summary["ok"]:
        log.warning("embed: %d of %d records failed (%.1f%% > error budget %.1f%%); see %s", n_errors,
                    records_seen, 100 * error_rate, 100 * cfg.ingest.error_budget, summary["errors_path"])
    return summary

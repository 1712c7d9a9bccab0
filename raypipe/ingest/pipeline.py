"""Ingestion on Ray: raw cohort -> records, samples and errors tables (`raypipe ingest`).

::

    manifest + labels (optional) --(driver)--> samples (pseudonymous ids, grouped stratified test split;
                                               without labels.csv: every manifest patient, null labels)
    train EHR files --statistics pass (Ray Data)--> means/stds (or a saved ehr_normalisation.json)
    work items sorted by (sample_id, modality, source_key, position); a patient's DICOM files of one
    modality form one item (series grouping, anatomical order and slice selection happen in its task)
        --decode pass (one Ray task per block of items, per-item try/except)--> records + error rows
        --each task writes--> records/part-NNNNN.parquet (streamed; one file per task, in key order)
    errors.parquet   samples.parquet   ehr_normalisation.json   ingest_summary.json

Every manifest file ends in exactly one state: ingested, quarantined (an ``errors``
row with the reason), empty-as-missing (an empty report) or not selected (a DICOM
slice the selection policy skipped); the summary reconciles the counts per modality.
The work items are sorted before decoding, a (patient, modality) never straddles two
tasks and each task sorts its own rows, so the records come out sorted by id without
a global sort, and memory stays flat as the cohort grows: decoded pixels stream from
the decode tasks into Parquet files. Outputs are written to a temporary directory and
renamed into place when complete; an existing output folder is replaced only when it
carries raypipe's marker of an earlier ingest run (:func:`raypipe.ingest.safety.check_output_dir`).

Safety (docs/ingest.md, "Security and privacy"): each task confines its paths to the
input root and opens regular files only (:func:`raypipe.ingest.safety.confine`), the
decoders check declared sizes against ``ingest.limits``, messages come from a fixed
vocabulary, every float payload is checked finite, and a decode task that dies (e.g.
killed by Ray's memory monitor) is not retried by Ray: its items are decoded again one
per task, and an item whose own task dies too (its second death) becomes a
``ResourceLimit`` row (an ``UnexpectedError`` row when the task raised instead). An output
that cannot be written (a full disk, permissions) is not an input's fault: the stage stops
with :class:`OutputWriteError` (cause and output folder) and quarantines nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from raypipe.config import Config
from raypipe.ids import pseudonym, resolve_secret
from raypipe.ingest import safety
from raypipe.ingest.common import DecodeError, check_finite
from raypipe.schema import (ERRORS_SCHEMA, NORMALISATION_KEY, RECORDS_SCHEMA, ROW_GROUP_BYTES, TENSOR_PREFIX,
                            quantise_unit, records_schema, samples_schema, tensor_column, with_json_metadata)

log = logging.getLogger(__name__)

#: everything the decode pass emits: a record (RECORDS columns) or an error, tagged with its file
ROW_SCHEMA = pa.schema([
    pa.field("kind", pa.string()), pa.field("file", pa.int64()),
    *[f for f in RECORDS_SCHEMA],
    pa.field("error_class", pa.string()), pa.field("message", pa.string()),
]).with_metadata(None)
UNEXPECTED = "UnexpectedError"
#: Parquet settings of the records files: statistics (for predicate pushdown) and dictionaries on the
#: key columns only; zstd everywhere (uint8 pixels compress by a further ~10-40 %, measured in
#: benchmarks/ingest_bench.py); row groups of at most ROW_GROUP_BYTES of array data, so a large file
#: (a large ``ingest.items_per_task``) splits into row groups that readers fetch in parallel
KEY_COLUMNS = ["sample_id", "modality", "source_key", "position"]
PARQUET_OPTIONS = dict(
    use_dictionary=["sample_id", "modality", "source_key", "dtype"],
    write_statistics=KEY_COLUMNS,
    compression="zstd",
)
#: stored dtype of each kind's arrays: images as ``ingest.payload_dtype`` (set per run), EHR float16
#: (standardised values: 3 significant digits), tabular covariates float32 (raw values, e.g. 12345.6)
EHR_DTYPE = "float16"
IMAGE_KINDS = ("volume", "image", "geotiff")
#: error classes that mean "this modality is missing for the patient", not a bad file
MISSING_CLASSES = {"EmptyReport"}
#: the file states the summary reconciles
STATES = ("ingested", "quarantined", "empty_as_missing", "not_selected")
#: cost of reading a DICOM header without pixel data, in decoded slices (measured about 0.15-0.3)
HEADER_READ_WEIGHT = 0.25
#: the ``split`` of every sample of a cohort ingested without labels.csv (inference)
UNLABELLED_SPLIT = "infer"
#: Ray's own retries of a decode task whose worker dies (Ray Data's default for its tasks is unlimited,
#: max_retries=-1). For a task killed by the memory monitor Ray keeps a separate budget,
#: task_oom_retries, unlimited by default and used whenever max_retries != 0: any value but 0
#: loops forever on a file that always exhausts memory. The driver does the one retry itself
#: (the dead task's items again, one per task), so that a killed item becomes an error row.
DECODE_TASK_RETRIES = 0
#: seconds between the decode pass's reads of the cluster's CPU count
CLUSTER_POLL_S = 1.0


class OutputWriteError(OSError):
    """An output of the stage cannot be written: the output location is at fault (a full disk, no permission,
    a read-only file system...), never an input file, so the stage stops instead of quarantining its inputs.
    Carries the OS error's number and the C library's text for it only (an exception's own text may name a
    path)."""


#: what an errno means for a user who has to fix the output location
_OUTPUT_CAUSES = {"ENOSPC": "no space left on device", "EDQUOT": "disk quota exceeded",
                  "EACCES": "permission denied", "EPERM": "permission denied", "EROFS": "read-only file system",
                  "ENOENT": "the folder does not exist (on a cluster: is it on storage every node shares?)",
                  "EIO": "I/O error", "EFBIG": "file too large for the file system"}


def _output_error(err: OSError) -> OutputWriteError:
    """``err`` (raised while writing an output) as an :class:`OutputWriteError`: its errno only. pyarrow's
    OSErrors carry no errno attribute but put ``[errno N]`` in their text: the number alone is taken."""
    import errno as errno_names

    num = err.errno
    if num is None:
        m = re.search(r"errno (\d+)", str(err), re.IGNORECASE)
        num = int(m.group(1)) if m else None
    name = errno_names.errorcode.get(num, "") if num is not None else ""
    what = _OUTPUT_CAUSES.get(name) or (os.strerror(num).lower() if num is not None else type(err).__name__)
    return OutputWriteError(num, f"{what} ({name})" if name else what)


def _output_failure(err: OutputWriteError, records_dir: str) -> OutputWriteError:
    """The stage's error for an output that cannot be written: the cause and the output location (the
    configured folder, ``ingest.out``), never an input."""
    return OutputWriteError(err.errno, (
        f"ingest stopped: its outputs cannot be written under {records_dir} (ingest.out; default "
        f"run.out_dir/records): {err.strerror}. The inputs are not at fault and none was quarantined; the "
        "partial output was removed and any earlier output there is unchanged. Free space or fix the folder's "
        "permissions (or set ingest.out to another location), then run again"))


# ----------------------------------------------------------------------------- UDFs (run in Ray tasks)
def _decode_item(it: dict, mod_cfg: dict, ehr_cfg: dict, stats: dict | None,
                 limits: safety.Limits | None = None) -> Iterable[dict]:
    """One work item (``path`` already confined) -> record dicts (RECORDS columns, ``meta`` as a dict)."""
    from raypipe.ingest import dicom, ehr, geotiff, image2d, nifti, report, tabular

    limits = limits or safety.DEFAULT_LIMITS
    fmt, kind = it["format"], mod_cfg["kind"]
    size, window, sel = mod_cfg["size"], mod_cfg["window"], mod_cfg["slices"]
    base = {"sample_id": it["sample_id"], "modality": it["modality"], "source_key": it["source_key"]}
    if kind == "volume" and fmt == "nifti":
        return [{**base, "position": pos, "array": img, "meta": meta}
                for pos, img, meta in nifti.decode_volume(it["path"], size, window, sel["policy"], sel["n"], sel["k"],
                                                          mod_cfg["frame"], limits)]
    if kind == "image" and fmt in ("png", "jpeg", "image"):
        img, meta = image2d.decode_image(it["path"], size, mod_cfg["channels"], limits)
        return [{**base, "position": 0, "array": img, "meta": meta}]
    if kind == "image" and fmt == "dicom":  # e.g. a DX/CR chest X-ray: one image per file
        img, meta = dicom.decode_slice(it["path"], size, window, limits=limits)
        if mod_cfg["channels"] == "rgb":
            img = np.repeat(img, 3, axis=0)
        return [{**base, "position": 0, "array": img, "meta": meta}]
    if kind == "geotiff" and fmt == "geotiff":
        return [{**base, "position": pos, "array": img, "meta": meta}
                for pos, img, meta in geotiff.decode_scene(it["path"], size, mod_cfg["bands"], mod_cfg["percentiles"],
                                                           limits)]
    if kind == "ehr" and fmt == "csv":
        out = []
        ranges = ehr.outlier_ranges(ehr_cfg.get("outlier_ranges"))
        for pos, (_, x, meta) in enumerate(ehr.discretise_stays(it["path"], ehr_cfg["step_hours"],
                                                               ehr_cfg["window_hours"], ranges,
                                                               limits.max_table_bytes)):
            if stats:
                x = ehr.standardise(x, stats)
            meta["standardised"] = bool(stats)
            out.append({**base, "position": pos, "array": x, "meta": meta})
        return out
    if kind == "text" and fmt == "text":
        return [{**base, "position": 0, "text": report.read_report(it["path"], mod_cfg["max_words"],
                                                                   limits.max_report_bytes),
                 "meta": {"max_words": mod_cfg["max_words"]}}]
    if kind == "tabular" and fmt == "csv":
        vec, cols = tabular.read_row(it["path"], it["source_id"], limits.max_table_bytes)
        return [{**base, "position": 0, "array": vec, "meta": {"columns": cols}}]
    if not fmt:
        raise safety.fail("UnsupportedFormat", f"no format column and {safety.extension(it['rel'])}")
    known = fmt in {"dicom", "nifti", "png", "jpeg", "image", "geotiff", "csv", "text"}
    raise safety.fail("UnsupportedFormat", f"format {fmt if known else 'not one raypipe reads'} cannot feed a "
                                           f"{kind} modality", extension=safety.extension(it["rel"]).lstrip("."))


def _decode_dicom_group(it: dict, mod_cfg: dict, source_secret: bytes, root: str,
                        limits: safety.Limits | None = None, dtype: str | None = None) -> Iterable[dict]:
    """One patient's DICOM files of one modality -> record, error and not-selected rows (one parse per file
    where possible: see :func:`raypipe.ingest.dicom.decode_series`); each record's array in its stored
    ``dtype`` (:func:`_stored`), converted as soon as it is checked so that the float slice is freed."""
    from raypipe.ingest import dicom

    sel = mod_cfg["slices"]
    base = {"sample_id": it["sample_id"], "modality": it["modality"]}
    file_of, paths = {}, []
    for rel, fid in zip(it["group_paths"], it["group_files"]):
        try:
            path = safety.confine(root, rel)
        except DecodeError as err:
            yield {**base, "kind": "error", "file": fid, "source_key": it["source_key"], "position": 0,
                   "error_class": err.error_class, "message": str(err)}
            continue
        if path in file_of:  # two manifest rows naming one file (e.g. through a symlink): decoded once
            yield {**base, "kind": "error", "file": fid, "source_key": it["source_key"], "position": 0,
                   "error_class": "UnsupportedFormat",
                   "message": safety.message("UnsupportedFormat", "the same file is listed twice for this patient")}
            continue
        file_of[path] = fid
        paths.append(path)
    slices, errors, unselected = dicom.decode_series(
        paths, mod_cfg["size"], mod_cfg["window"], sel["policy"], sel["n"], sel["k"],
        expected=dicom.EXPECTED_MODALITY.get(it["modality"]), limits=limits)
    keys: dict[str, str] = {}
    for sl in slices:
        key = keys.get(sl.series_uid) or keys.setdefault(sl.series_uid, pseudonym(source_secret, sl.series_uid))
        try:
            check_finite(sl.image, "record")
        except DecodeError as err:
            errors.append((sl.path, err))
            continue
        array, sl.image = _stored(sl.image, dtype), None
        yield {**base, "kind": "record", "file": file_of[sl.path], "source_key": key, "position": sl.position,
               "array": array, "meta": json.dumps(sl.meta, sort_keys=True)}
    for path, err in errors:
        yield {**base, "kind": "error", "file": file_of[path], "source_key": it["source_key"], "position": 0,
               "error_class": err.error_class, "message": str(err)}
    for path in unselected:
        yield {**base, "kind": "skip", "file": file_of[path], "source_key": it["source_key"], "position": 0}


def _decode_batch(batch: pa.Table, modalities: dict, ehr_cfg: dict, stats: dict | None,
                  source_secret: bytes = b"", root: str = "/", limits: dict | None = None,
                  store_dtypes: dict | None = None) -> pa.Table:
    """map_batches UDF: decode each item with its own try/except (a bad file becomes an error row).

    Each path is confined to ``root`` first (regular files only); every record's array is checked
    finite before it is emitted. The rows come out sorted by the output key: a DICOM group's series
    keys are only known once its files are read, so the task sorts its own rows (the groups never
    straddle tasks). ``store_dtypes`` (modality -> dtype, :func:`store_dtypes`) sets each array's stored
    dtype; the arrays travel on in it (uint8 images: a quarter of float32's bytes).
    """
    lim = safety.Limits.of(limits)
    rows: list[dict] = []
    for it in batch.to_pylist():
        head = {"file": it["file"], "sample_id": it["sample_id"], "modality": it["modality"],
                "source_key": it["source_key"], "position": it["position"]}
        try:
            if it["format"] == "dicom_series":
                rows.extend(_decode_dicom_group(it, modalities[it["modality"]], source_secret, root, lim,
                                                (store_dtypes or {}).get(it["modality"])))
                rows.append({**head, "kind": "done"})
                continue
            it = {**it, "path": safety.confine(root, it["rel"])}
            recs = list(_decode_item(it, modalities[it["modality"]], ehr_cfg, stats, lim))
            for rec in recs:  # no non-finite float payload is ever written
                if rec.get("array") is not None and rec["array"].dtype.kind == "f":
                    check_finite(rec["array"], "record")
            dtype = (store_dtypes or {}).get(it["modality"])
            for rec in recs:
                rec["meta"] = json.dumps(rec.get("meta") or {}, sort_keys=True)
                if rec.get("array") is not None:  # stored dtype now: the float array is freed with the item
                    rec["array"] = _stored(rec["array"], dtype)
                rows.append({**head, **rec, "kind": "record"})
            rows.append({**head, "kind": "done"})
        except BaseException as e:  # noqa: BLE001 - quarantine, never crash the run
            if isinstance(e, safety.FATAL):  # a Rust panic is a BaseException: caught too
                raise
            err = e if isinstance(e, DecodeError) else safety.unexpected(e)
            cls, msg = err.error_class, str(err)
            # a failed group: every file of it gets the error row, so that each still ends in a state
            for fid in (it["group_files"] or [it["file"]]):
                rows.append({**head, "file": fid, "kind": "error", "error_class": cls, "message": msg})
            rows.append({**head, "kind": "done"})
    # records first (their own key order), then the other rows: the writer takes the records as a slice
    rows.sort(key=lambda r: (r["kind"] != "record", r["sample_id"], r["modality"], r["source_key"], r["position"],
                             r["file"]))
    return _rows_table(rows, store_dtypes)


def store_dtypes(modalities: dict, payload_dtype: str = "uint8") -> dict[str, str]:
    """Stored dtype per array modality: images ``payload_dtype``, EHR float16, tabular float32."""
    out = {}
    for m, c in modalities.items():
        kind = c["kind"] if isinstance(c, dict) else c.kind
        if kind in IMAGE_KINDS:
            out[m] = payload_dtype
        elif kind == "ehr":
            out[m] = EHR_DTYPE
        elif kind == "tabular":
            out[m] = "float32"
    return out


def declared_tensors(modalities: dict, ehr_cfg: dict, dtypes: dict[str, str]) -> dict[str, tuple[str, list[int]]]:
    """The modalities whose record shape the config fixes -> (stored dtype, shape): their arrays go to a
    ``tensor_<modality>`` column (fixed-shape tensor). Image slices (C, size, size) with C = 1, 3 (rgb) or
    the number of selected geotiff bands; EHR stays (steps, features). Others (tabular rows, geotiff with
    every band) keep ``payload`` bytes, as does any record whose shape differs from the declared one."""
    from raypipe.ingest.ehr import N_FEATURES

    out = {}
    for m, c in modalities.items():
        c = c if isinstance(c, dict) else c.model_dump(mode="json")
        s = int(c["size"])
        if c["kind"] == "volume":
            out[m] = (dtypes[m], [1, s, s])
        elif c["kind"] == "image":
            out[m] = (dtypes[m], [3 if c["channels"] == "rgb" else 1, s, s])
        elif c["kind"] == "geotiff" and c.get("bands"):
            out[m] = (dtypes[m], [len(c["bands"]), s, s])
        elif c["kind"] == "ehr":
            out[m] = (dtypes[m], [int(round(ehr_cfg["window_hours"] / ehr_cfg["step_hours"])), N_FEATURES])
    return out


def _stored(a: np.ndarray, dtype: str | None) -> np.ndarray:
    """``a`` in its stored dtype: uint8/float16/float32 of a [0, 1] image (:func:`raypipe.schema.quantise_unit`);
    float16 values beyond its range (an unstandardised EHR value above 65504) stay float32."""
    if dtype is None or a.dtype == np.dtype(dtype):
        return a
    if dtype == "uint8":
        return quantise_unit(a, "uint8")
    if dtype == "float16" and a.size and float(np.abs(a).max()) > float(np.finfo(np.float16).max):
        return a
    return a.astype(np.dtype(dtype))


def _rows_table(rows: list[dict], dtypes: dict | None = None) -> pa.Table:
    """ROW_SCHEMA table of ``rows``; a row's ``array`` (numpy) becomes its payload/dtype/shape,
    stored as ``dtypes[modality]`` (unchanged for a modality not in it).

    The payload column is assembled from the arrays with a single copy (no intermediate bytes
    object per record): decoded pixels are most of what a task moves.
    """
    arrays = [r.get("array") for r in rows]
    cols = {name: [r.get(name) for r in rows] for name in ROW_SCHEMA.names}
    if any(a is not None for a in arrays):
        chunks, sizes = [], []
        for i, a in enumerate(arrays):
            if a is None:
                p = cols["payload"][i]
                chunks.append(np.frombuffer(p, np.uint8) if p is not None else None)
            else:
                a = np.ascontiguousarray(_stored(a, (dtypes or {}).get(rows[i]["modality"])))
                if a.dtype.byteorder == ">":
                    a = a.astype(a.dtype.newbyteorder("<"))
                chunks.append(a.reshape(-1).view(np.uint8))
                cols["dtype"][i], cols["shape"][i] = a.dtype.name, list(a.shape)
            sizes.append(0 if chunks[-1] is None else chunks[-1].size)
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        if offsets[-1] < 2**31 - 1:  # binary offsets are int32; beyond, let Arrow chunk the column
            data = np.concatenate([c for c in chunks if c is not None]) if offsets[-1] else np.zeros(0, np.uint8)
            valid = np.array([c is not None for c in chunks])
            payload = pa.Array.from_buffers(
                pa.binary(), len(rows), [pa.array(valid).buffers()[1] if not valid.all() else None,
                                         pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)],
                null_count=int((~valid).sum()))
            cols["payload"] = payload
        else:
            cols["payload"] = [None if c is None else c.tobytes() for c in chunks]
    return pa.table(cols, schema=ROW_SCHEMA)


def _ehr_sums_batch(batch: pa.Table, ehr_cfg: dict, root: str = "/", limits: dict | None = None) -> pa.Table:
    """Per-batch sums of the continuous EHR channels of training stays (files that fail are skipped here
    and quarantined by the decode pass; the same confinement, limits and outlier ranges apply)."""
    from raypipe.ingest import ehr

    lim = safety.Limits.of(limits)
    ranges = ehr.outlier_ranges(ehr_cfg.get("outlier_ranges"))
    cols = ehr.CONTINUOUS_COLUMNS
    s, sq, n = np.zeros(len(cols)), np.zeros(len(cols)), 0.0
    for rel in batch.column("path").to_pylist():
        try:
            path = safety.confine(root, rel)
            stays = ehr.discretise_stays(path, ehr_cfg["step_hours"], ehr_cfg["window_hours"], ranges,
                                         lim.max_table_bytes)
        except BaseException as err:  # noqa: BLE001 - reported by the decode pass
            if isinstance(err, safety.FATAL):  # a Rust panic is a BaseException: caught too
                raise
            continue
        for _, x, _ in stays:
            v = x[:, cols].astype(np.float64)
            s += v.sum(0)
            sq += (v ** 2).sum(0)
            n += v.shape[0]
    first = batch.column("path")[0].as_py() if batch.num_rows else ""
    return pa.table({"first": [first], "s": [s.tolist()], "sq": [sq.tolist()], "n": [n]})


def _binary_views(arr: pa.Array) -> list[np.ndarray | None]:
    """Zero-copy uint8 views of a binary array's values (None for nulls)."""
    if len(arr) == 0:
        return []
    _, offsets, data = arr.buffers()
    offs = np.frombuffer(offsets, np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    values = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return [values[offs[j]:offs[j + 1]] if valid[j] else None for j in range(len(arr))]


def records_table(rec: pa.Table, tensors: dict[str, tuple[str, list[int]]]) -> pa.Table:
    """The records columns of decode rows, in :func:`raypipe.schema.records_schema` ``(tensors)``: a record of a
    declared modality whose dtype and shape match the declaration moves from ``payload`` to ``tensor_<m>``."""
    schema = records_schema(tensors)
    base = rec.select(RECORDS_SCHEMA.names).cast(RECORDS_SCHEMA)
    n = base.num_rows
    mods = base.column("modality").to_pylist()
    dts = base.column("dtype").to_pylist()
    shapes = base.column("shape").to_pylist()
    col = base.column("payload")
    payload = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if isinstance(payload, pa.ChunkedArray):  # beyond 2 GB of payload: Arrow keeps chunks
        views = [None if v is None else np.frombuffer(v, np.uint8) for v in payload.to_pylist()]
    else:
        views = _binary_views(payload)
    moved = np.zeros(n, bool)
    cols = {}
    for m, (dt, shape) in sorted(tensors.items()):
        dtype, size = np.dtype(dt), int(np.prod(shape))
        nb = size * dtype.itemsize
        valid = np.array([mods[i] == m and dts[i] is not None and np.dtype(dts[i]) == dtype and list(shapes[i] or []) == list(shape)
                          and views[i] is not None and views[i].size == nb for i in range(n)], bool)
        if n and valid.all() and not isinstance(payload, pa.ChunkedArray):
            # every row moves (a one-modality task): the payloads lie back to back in one buffer, used as is
            start = int(np.frombuffer(payload.buffers()[1], np.int32, count=1, offset=payload.offset * 4)[0])
            values = np.frombuffer(payload.buffers()[2], np.uint8, count=n * nb, offset=start)
        else:
            values = np.zeros(n * nb, np.uint8)  # null slots: untouched zero pages, never written to Parquet
            for i in np.flatnonzero(valid):
                values[i * nb:(i + 1) * nb] = views[i]
        storage = pa.FixedSizeListArray.from_arrays(pa.array(values.view(dtype)), size, mask=pa.array(~valid))
        cols[tensor_column(m)] = pa.ExtensionArray.from_storage(schema.field(tensor_column(m)).type, storage)
        moved |= valid
    if moved.all():
        payload = pa.nulls(n, pa.binary())
    elif moved.any():  # the moved rows' bytes are dropped (only the others' are copied)
        payload = pa.array([None if moved[i] or views[i] is None else views[i].tobytes() for i in range(n)],
                           pa.binary())
    arrays = [payload if f.name == "payload" else cols[f.name] if f.name in cols else base.column(f.name)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """:data:`PARQUET_OPTIONS` for a records table of ``schema``: also BYTE_STREAM_SPLIT-encode the values of
    its 8-bit tensor columns.

    Parquet has no 8-bit type: a uint8 tensor is a list of INT32 values, PLAIN 4 bytes per pixel.
    BYTE_STREAM_SPLIT writes each of the 4 bytes of the values as its own stream: three streams are
    zeros, which zstd removes, so the file is as small as with a dictionary (27.0 vs 27.3 KB per CT
    slice, 39 KB PLAIN) while writing costs ~40 % less CPU than dictionary encoding (550 vs 930-1,010
    us per 224x224 slice) and reading no more (360-370 vs 385-400 us); benchmarks/RESULTS.md, issue 17.
    Readers: pyarrow >= 17, duckdb, polars (tests/test_records_compact.py checks pyarrow and pandas)."""
    split = [f"{f.name}.list.element" for f in schema  # the values' path (Parquet's compliant list layout)
             if f.name.startswith(TENSOR_PREFIX) and isinstance(f.type, pa.FixedShapeTensorType)
             and f.type.value_type.bit_width == 8]
    return {**PARQUET_OPTIONS, **({"use_byte_stream_split": split} if split else {})}


def write_records(table: pa.Table, path: str) -> None:
    """Write a records table with :func:`parquet_options`, row groups of at most :data:`ROW_GROUP_BYTES`."""
    import pyarrow.parquet as pq

    per_row = table.nbytes / max(1, table.num_rows)
    # atomic: a task killed while writing leaves a hidden temporary file (readers skip dot files), never a
    # truncated part
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    try:
        pq.write_table(table, tmp, row_group_size=max(1, int(ROW_GROUP_BYTES // max(1.0, per_row))),
                       **parquet_options(table.schema))
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: the partial temporary would hold on to the space
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _write_task_rows(rows: pa.Table, out_dir: str, name: str, tensors: dict | None = None) -> dict:
    """Write the records among one decode task's rows to ``out_dir/<name>.parquet``; returns its errors, the
    files it ingested or did not select and the work items it finished (``done``)."""
    import pyarrow.compute as pc

    if not rows.num_rows:
        return {"files": [], "errors": [], "not_selected": [], "records": 0, "done": []}
    is_rec = pc.equal(rows.column("kind"), "record")
    n_rec = pc.sum(is_rec).as_py() or 0
    # _decode_batch puts the records first: a slice, no copy of their pixels
    rec = rows.slice(0, n_rec) if n_rec and pc.all(is_rec.slice(0, n_rec)).as_py() else rows.filter(is_rec)
    if n_rec:
        table = records_table(rec, tensors or {})
        try:
            write_records(table, os.path.join(out_dir, f"{name}.parquet"))
        except OSError as err:  # the output's fault (full disk, permissions), not an input's: the stage stops
            raise _output_error(err) from None
    other = [] if n_rec == rows.num_rows else \
        rows.select(["kind", "file", "error_class", "message"]).filter(pc.invert(is_rec)).to_pylist()
    return {"files": sorted(set(rec.column("file").to_pylist())), "records": n_rec,
            "errors": [{k: r[k] for k in ("file", "error_class", "message")} for r in other
                       if r["kind"] == "error"],
            "not_selected": sorted({r["file"] for r in other if r["kind"] == "skip"}),
            "done": sorted({r["file"] for r in other if r["kind"] == "done"})}


def _decode_and_write(decode: Any, block: pa.Table, out_dir: str, name: str, fn_kwargs: dict,
                      tensors: dict | None = None) -> dict:
    """One decode task: ``decode`` (:func:`_decode_batch`) over ``block``, its records written to
    ``out_dir/<name>.parquet``; returns :func:`_write_task_rows`' summary (a few KB, never the pixels)."""
    return _write_task_rows(decode(block, **fn_kwargs), out_dir, name, tensors)


# ----------------------------------------------------------------------------- driver helpers
def _samples(cfg: Config, secret: bytes, root: str, manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """The samples table (sample_id, labels, groups, split) and the patient id -> sample id map.

    Without ``labels.csv`` (an unlabelled cohort, e.g. for inference) every patient of the manifest
    is a sample: label columns null, group columns ``"unknown"``, split ``"infer"``.
    """
    from raypipe.ingest.manifest import read_labels
    from raypipe.train.splits import holdout_mask

    labels = read_labels(root, cfg.ingest.label_columns, cfg.ingest.group_columns)
    if labels is None:
        pids = sorted(set(manifest["patient_id"].astype(str)))
        df = pd.DataFrame({"patient_id": pids})
        for c in cfg.ingest.label_columns:
            df[c] = np.full(len(df), np.nan)
        for g in cfg.ingest.group_columns:
            df[g] = "unknown"
        df["split"] = UNLABELLED_SPLIT
        log.info("ingest: no labels.csv in %s: %d unlabelled samples from the manifest (split %r)", root, len(df),
                 UNLABELLED_SPLIT)
    else:
        df = labels.copy()
    ids = {pid: pseudonym(secret, pid) for pid in df["patient_id"]}
    df.insert(0, "sample_id", df["patient_id"].map(ids))
    if labels is not None:
        y = df[cfg.ingest.label_columns[0]].to_numpy()
        test = np.zeros(len(df), bool)
        if cfg.ingest.test_fraction > 0:
            sid = df["sample_id"].to_numpy()
            try:
                test = holdout_mask(sid, y, fraction=cfg.ingest.test_fraction, seed=cfg.run.seed)
            except ValueError as err:  # e.g. a small cohort with a label value held by one patient
                log.warning("cannot stratify the test split by label (%s); splitting by patient only", err)
                try:
                    test = holdout_mask(sid, np.zeros(len(df)), fraction=cfg.ingest.test_fraction, seed=cfg.run.seed)
                except ValueError as err2:
                    raise ValueError(f"ingest.test_fraction={cfg.ingest.test_fraction}: {err2}; "
                                     "lower it or set 0") from None
        df["split"] = np.where(test, "test", "train")
    df = df.drop(columns=["patient_id"]).sort_values("sample_id").reset_index(drop=True)
    return df, ids


def source_key_secret(secret: bytes) -> bytes:
    """The key of the ``source_key`` hashes, derived from the run's secret (HMAC with a fixed label).

    The decode tasks need it (a DICOM series' key is known only once its files are read); giving
    them this derived key instead of the secret keeps the sample ids out of their reach.
    """
    return hmac.new(secret, b"raypipe/source_key/v1", hashlib.sha256).hexdigest().encode()


def _num_blocks(n_items: int, per_task: int) -> int:
    # depends on the input only (not on the cluster), so the output files are the same everywhere
    return max(1, math.ceil(n_items / per_task))


def _item_weight(it: dict, mods: dict) -> float:
    """Rough decode cost of a work item, in slices: a NIfTI volume yields many, a report almost nothing."""
    c = mods[it["modality"]]
    if it["format"] == "dicom_series":
        n, sel = len(it["group_files"]), c["slices"]
        picked = {"all": n, "every_k": n / max(1, sel["k"])}.get(sel["policy"], min(n, sel["n"]))
        return picked + HEADER_READ_WEIGHT * (n - picked)  # a header-only read of the others
    if it["format"] == "nifti":
        return float(c["slices"]["n"]) if c["slices"]["policy"] in ("even", "central") else 32.0
    if it["format"] == "geotiff":
        return 8.0
    if c["kind"] in ("text", "tabular"):
        return 0.25
    return 1.0


def _task_blocks(work: list[dict], mods: dict, per_task: int) -> list[pa.Table]:
    """Consecutive runs of the (sorted) work items of about ``per_task`` slices each: one Ray task per block.

    The cut points depend on the items only, never on the cluster, so each task -- and the Parquet
    file it writes -- holds the same records on a laptop and on a cluster.
    """
    blocks, current, weight = [], [], 0.0
    for i, it in enumerate(work):
        current.append(it)
        weight += _item_weight(it, mods)
        nxt = work[i + 1] if i + 1 < len(work) else None
        # a (sample, modality) run stays in one task: a DICOM group's records are sorted within it
        if weight >= per_task and (nxt is None or (nxt["sample_id"], nxt["modality"]) != (it["sample_id"],
                                                                                          it["modality"])):
            blocks.append(current)
            current, weight = [], 0.0
    if current:
        blocks.append(current)
    return [pa.Table.from_pylist(b) for b in blocks]


@contextlib.contextmanager
def _remote_args_accepted():
    """Ray 2.60 deprecates map_batches' free ``ray_remote_args`` but has no named parameter for
    ``max_retries`` yet (named ones: num_cpus, memory, ...); the bound on retries matters more than the
    warning, which is silenced here only."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated.*")
        yield


@contextlib.contextmanager
def _tolerate_dead_tasks():
    """Let a pass finish when some of its tasks die (``max_errored_blocks`` unlimited for the pass).

    Every per-file failure is caught inside the UDFs, so the only blocks that can fail are tasks whose
    worker died (killed for memory, a crash in native code); the driver notices their missing results.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old = ctx.max_errored_blocks
    ctx.max_errored_blocks = -1
    try:
        yield
    finally:
        ctx.max_errored_blocks = old


@contextlib.contextmanager
def _unordered():
    """Run a pass without Ray Data's output reordering (``preserve_order``).

    The statistics pass does not need it: its sums are reduced on the driver order-independently.
    Reordering only makes finished tasks wait for slower ones.
    """
    import ray.data

    opts = ray.data.DataContext.get_current().execution_options
    old = opts.preserve_order
    opts.preserve_order = False
    try:
        yield
    finally:
        opts.preserve_order = old


def _load_stats(path: str) -> dict:
    from raypipe.ingest.ehr import CONTINUOUS_COLUMNS

    with open(path) as fh:
        stats = json.load(fh)
    stats = stats.get("ehr", stats)
    if stats.get("columns") != CONTINUOUS_COLUMNS or len(stats.get("mean", [])) != len(CONTINUOUS_COLUMNS):
        raise ValueError(f"{path}: not an ehr_normalisation.json of this feature layout (columns "
                         f"{CONTINUOUS_COLUMNS}); use the file written by the ingest run of the training data")
    return stats


def _fit_stats(train_items: list[dict], cfg: Config, root: str) -> dict:
    """EHR statistics of the training split (a Ray Data pass that returns sums only).

    A statistics task that dies (e.g. killed for memory) drops its files' sums with a warning; the
    decode pass then quarantines those files itself.
    """
    import ray.data

    from raypipe.ingest.ehr import fit_normalisation

    if not train_items:
        return {}
    with _unordered(), _tolerate_dead_tasks():
        ds = ray.data.from_items([{"path": it["rel"]} for it in train_items],
                                 override_num_blocks=_num_blocks(len(train_items), cfg.ingest.items_per_task))
        with _remote_args_accepted():
            sums = ds.map_batches(_ehr_sums_batch, fn_kwargs={"ehr_cfg": cfg.ingest.ehr.model_dump(), "root": root,
                                                             "limits": cfg.ingest.limits.model_dump()},
                                  batch_format="pyarrow", batch_size=None, max_retries=DECODE_TASK_RETRIES)
        sums = sums.take_all()
    expected = min(len(train_items), _num_blocks(len(train_items), cfg.ingest.items_per_task))
    if len(sums) < expected:
        log.warning("ingest: %d of %d EHR statistics tasks died (e.g. killed for memory): the statistics leave "
                    "their files out; the decode pass reports those files", expected - len(sums), expected)
    sums.sort(key=lambda r: r["first"])  # a fixed summation order: the same statistics bytes every run
    n = float(sum(r["n"] for r in sums))
    if n == 0:
        return {}
    s = np.sum([r["s"] for r in sums], axis=0)
    sq = np.sum([r["sq"] for r in sums], axis=0)
    stats = fit_normalisation(np.asarray(s), np.asarray(sq), n)
    stats["fitted_on"] = "train"
    return stats


def _dicom_groups(dicom_items: list[dict]) -> list[dict]:
    """One work item per (patient, modality) holding its DICOM files: series grouping, anatomical order and
    slice selection happen inside the decode task (:func:`raypipe.ingest.dicom.decode_series`), which reads
    each file once where it can -- no separate header pass over the cohort."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for it in dicom_items:
        groups[(it["sample_id"], it["modality"])].append(it)
    out = []
    for (sid, modality), its in sorted(groups.items()):
        its = sorted(its, key=lambda it: it["file"])
        out.append({**its[0], "format": "dicom_series", "source_key": "", "position": 0,
                    "group_files": [it["file"] for it in its], "group_paths": [it["rel"] for it in its]})
    return out


# ----------------------------------------------------------------------------- entry point
def run_ingest(cfg: Config, manifest: pd.DataFrame | None = None) -> dict:
    """Ingest ``cfg.ingest_input`` into ``cfg.records_dir``; returns the reconciliation summary.

    ``manifest``: a manifest table (patient_id, modality, format, path; e.g. inferred by a folder scan)
    in place of the input's manifest.csv or folder convention.

    The summary's ``ok`` is False when the reconciliation fails or the quarantined share of
    files exceeds ``ingest.error_budget`` (the CLI then exits non-zero).
    """
    import pyarrow.parquet as pq

    from raypipe.ingest.manifest import prepare_manifest, read_manifest
    from raypipe.runtime import init_ray

    secret = resolve_secret(cfg)
    root = os.path.realpath(cfg.ingest_input)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"cohort directory {root} does not exist: run `raypipe synth` or set ingest.input")
    records_dir = os.path.abspath(cfg.records_dir)
    safety.check_output_dir(records_dir, [root], "ingest")  # before any work: never delete what is not ours
    manifest = read_manifest(root) if manifest is None else prepare_manifest(manifest)
    unlabelled = not os.path.isfile(os.path.join(root, "labels.csv"))
    has_ehr = any(c.kind == "ehr" and (manifest["modality"] == m).any() for m, c in cfg.ingest.modalities.items())
    if unlabelled and has_ehr and not cfg.ingest.ehr.normalisation:
        raise ValueError(f"{root} has no labels.csv (an unlabelled cohort: nothing to fit the EHR statistics on) "
                         "but has EHR files: set ingest.ehr.normalisation to the ehr_normalisation.json written "
                         "by the ingest run of the training data")
    source_secret = source_key_secret(secret)
    path_secret = safety.path_key(secret)
    plain = cfg.privacy.plain_paths
    samples, ids = _samples(cfg, secret, root, manifest)  # labels checked before Ray starts
    init_ray(cfg)
    train_ids = set(samples.loc[samples["split"] == "train", "sample_id"])
    mods = {k: v.model_dump(mode="json") for k, v in cfg.ingest.modalities.items()}
    limits = cfg.ingest.limits.model_dump()
    dtypes = store_dtypes(mods, cfg.ingest.payload_dtype)
    tensors = declared_tensors(mods, cfg.ingest.ehr.model_dump(), dtypes)
    # ingest.tensor_columns=false: every array as raw `payload` bytes (same dtypes, zstd) instead of the
    # fixed-shape tensor columns. Parquet stores a tensor as a nested list (levels per pixel): reading a
    # 224x224 uint8 slice costs ~2x the CPU of the same bytes as one binary value, which halves what a
    # host can feed a GPU (benchmarks/RESULTS.md, issue 17); the price is arrays that pandas & co. see
    # as bytes.
    if not cfg.ingest.tensor_columns:
        tensors = {}

    # --- one entry per manifest file; files of unconfigured modalities are counted as skipped
    files: list[dict] = []
    skipped: Counter = Counter()
    items: list[dict] = []
    errors: list[dict] = []  # {"file", "error_class", "message"}
    for row in manifest.itertuples(index=False):
        if row.modality not in mods:
            skipped[row.modality] += 1
            continue
        pid, rel = str(row.patient_id), str(row.path)
        line = int(getattr(row, "row", 0) or 0)
        sid = (ids.get(pid) or pseudonym(secret, pid)) if pid.strip() else ""
        f = {"file": len(files), "modality": row.modality, "public_path": safety.pseudonymous_path(rel, path_secret, plain),
             "patient_id": pid, "sample_id": sid, "line": line}
        files.append(f)
        if not pid.strip():
            errors.append({"file": f["file"], "error_class": "MissingId", "message": safety.message("MissingId")})
            continue
        if pid not in ids:
            errors.append({"file": f["file"], "error_class": "NoLabel", "message": safety.message("NoLabel")})
            continue
        items.append({"file": f["file"], "sample_id": sid, "source_id": pid, "modality": row.modality,
                      "format": str(row.format or ""), "rel": rel, "position": 0,
                      "source_key": pseudonym(source_secret, rel), "train": sid in train_ids,
                      "group_files": None, "group_paths": None})
    log.info("ingest: %d files of %d modalities, %d patients", len(files), len({f["modality"] for f in files}),
             len(samples))

    states: dict[int, str] = {}
    dicom_items = [it for it in items if it["format"] == "dicom" and mods[it["modality"]]["kind"] == "volume"]
    dicom_files = {it["file"] for it in dicom_items}
    work = [it for it in items if it["file"] not in dicom_files]
    work += _dicom_groups(dicom_items)
    # sorted by the output key: block i is written to part-i, so the records need no global sort
    work.sort(key=lambda it: (it["sample_id"], it["modality"], it["source_key"], it["position"], it["file"]))

    # --- EHR statistics: fitted on the training split only, or loaded unchanged
    ehr_mods = {m for m, c in mods.items() if c["kind"] == "ehr"}
    ehr_items = [it for it in work if it["modality"] in ehr_mods]
    if cfg.ingest.ehr.normalisation:
        stats = _load_stats(cfg.ingest.ehr.normalisation)
        stats["fitted_on"] = f"loaded: {os.path.basename(cfg.ingest.ehr.normalisation)}"
    else:
        stats = _fit_stats([it for it in ehr_items if it["train"]], cfg, root)
    if stats and not (np.isfinite(stats["mean"]).all() and np.isfinite(stats["std"]).all()):
        raise ValueError("EHR normalisation statistics are not finite: refit them (a saved file may be damaged)")
    if ehr_items and not stats:
        log.warning("no training-split EHR stays: EHR records are written unstandardised (meta standardised=false)")

    parent = os.path.dirname(records_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".ingest-", dir=parent)
    except OSError as err:
        raise _output_failure(_output_error(err), records_dir) from None
    try:
        n_records = 0
        rec_dir = os.path.join(tmp, "records")
        os.makedirs(rec_dir)
        if work:
            for it in work:
                it.pop("train", None)
            fn_kwargs = {"modalities": mods, "ehr_cfg": cfg.ingest.ehr.model_dump(), "stats": stats or None,
                         "source_secret": source_secret, "root": root, "limits": limits, "store_dtypes": dtypes}
            blocks = _task_blocks(work, mods, cfg.ingest.items_per_task)
            results, failures = _decode_pass(blocks, rec_dir, "part", fn_kwargs, tensors)
            if len(blocks) > 1 and not results and DIED not in failures.values():
                raise _internal_failure(failures.values(), records_dir)  # not the inputs: every task raised
            lost = [it for run in _lost_items(work, results) for it in run]
            if lost:  # the failed tasks' items again, one per task, to find the culprit(s)
                log.warning("ingest: decoding the %d work items of the failed decode task(s) again, one per task",
                            len(lost))
                again, failures = _decode_pass([pa.Table.from_pylist([it]) for it in lost], rec_dir, "part-retry",
                                               fn_kwargs, tensors)
                if not results and not again and set(failures.values()) - {DIED}:
                    raise _internal_failure(failures.values(), records_dir)
                results += again
                for j, cause in sorted(failures.items()):  # an item whose own task failed too
                    it = lost[j]
                    if cause == DIED:
                        cls, msg = "ResourceLimit", safety.message(
                            "ResourceLimit", "its Ray task died twice (killed for memory or crashed): lower "
                            "ingest.limits or give the workers more memory")
                    else:
                        cls, msg = UNEXPECTED, safety.message(
                            UNEXPECTED, f"its decode task raised {cause} outside the per-file decoding, also "
                            "when this work item was decoded alone")
                    for fid in it["group_files"] or [it["file"]]:
                        errors.append({"file": fid, "error_class": cls, "message": msg})
            for ret in results:
                n_records += ret["records"]
                errors.extend(ret["errors"])
                for fid in ret["files"]:
                    states[fid] = "ingested"
            for ret in results:
                for fid in ret["not_selected"]:
                    states.setdefault(fid, "not_selected")  # a multi-frame file with another frame chosen: ingested
        if not n_records:
            pq.write_table(records_schema(tensors).empty_table(), os.path.join(rec_dir, "part-00000.parquet"))

        # --- file states, errors table, summary
        err_rows = []
        for e in errors:
            f = files[e["file"]]
            if states.get(e["file"]) != "ingested":
                states[e["file"]] = "empty_as_missing" if e["error_class"] in MISSING_CLASSES else "quarantined"
            # the fixed sentence of the class (+ facts); a manifest line number lets the user find the file
            msg = safety.public_message(e["error_class"], e["message"])
            if f["line"]:
                msg += f" (manifest.csv line {f['line']})"
            err_rows.append({"source_path": f["public_path"], "stage": "ingest", "modality": f["modality"],
                             "error_class": e["error_class"], "message": msg})
        err_df = pd.DataFrame(err_rows, columns=ERRORS_SCHEMA.names).sort_values(
            ["modality", "source_path", "error_class", "message"], kind="stable")
        pq.write_table(pa.Table.from_pandas(err_df, schema=ERRORS_SCHEMA, preserve_index=False),
                       os.path.join(tmp, "errors.parquet"))

        label_cols, group_cols = cfg.ingest.label_columns, cfg.ingest.group_columns
        sschema = samples_schema(label_cols, group_cols + ["split"])
        if stats:
            sschema = with_json_metadata(sschema, NORMALISATION_KEY, {"ehr": stats})
        pq.write_table(pa.Table.from_pandas(samples[sschema.names], schema=sschema, preserve_index=False),
                       os.path.join(tmp, "samples.parquet"))
        with open(os.path.join(tmp, "ehr_normalisation.json"), "w") as fh:
            json.dump(stats, fh, indent=2, sort_keys=True)
        summary = summarise(files, states, errors, skipped, n_records, len(samples), cfg.ingest.error_budget)
        summary["labelled"] = not unlabelled
        with open(os.path.join(tmp, "ingest_summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2, sort_keys=True)
        safety.write_marker(tmp, "ingest")
        _swap_into_place(tmp, records_dir, [root])
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # writing an output failed (a decode task's part, or a table written here): the output location's
        # fault, one clear error (Ray's connection errors are OSErrors too: passed on as they are)
        if isinstance(err, OSError) and not isinstance(err, (ConnectionError, TimeoutError)):
            raise _output_failure(err if isinstance(err, OutputWriteError) else _output_error(err),
                                  records_dir) from None
        raise
    log.info("ingest: %d files seen, %d ingested, %d quarantined, %d records -> %s", summary["files_seen"],
             summary["files_ingested"], summary["files_quarantined"], n_records, records_dir)
    return {**summary, "records_dir": records_dir, "printed": reconciliation_table(summary)}


def _decode_pass(blocks: list[pa.Table], rec_dir: str, prefix: str, fn_kwargs: dict,
                 tensors: dict | None = None) -> tuple[list[dict], dict[int, str]]:
    """One decode pass over ``blocks`` (one Ray task each) into ``rec_dir/<prefix>-NNNNN.parquet`` (NNNNN: the
    block's index, so the files are in key order); returns the results of the tasks that finished and, per
    block whose task did not, why (:func:`_task_failure`: ``DIED`` or the type of the exception it raised;
    the caller decodes those items again). A task that could not write its part (:class:`OutputWriteError`)
    stops the pass: the tasks in flight are cancelled and waited for, and the error is raised.

    Plain Ray tasks, at most a few per CPU in flight, each writing its own file and returning a small
    summary: the pass needs none of Ray Data's streaming machinery (no block moves between tasks). With
    Ray Data (from_arrow -> map_batches -> a datasink) its executor loop, per-task bookkeeping and
    per-execution helper actors cost 0.5-0.7 ms of CPU per CT slice beyond the decode and write, and the
    pass ran at half the speed (benchmarks/ingest_bench.py, 2 CPUs; notes in benchmarks/RESULTS.md, issue 17).
    """
    import ray

    os.makedirs(rec_dir, exist_ok=True)
    task = _decode_task_fn()
    kwargs_ref = ray.put(fn_kwargs)
    decode = _decode_batch  # looked up now: a test may replace it
    pending: dict = {}
    results: list[dict] = []
    failures: dict[int, str] = {}
    todo = list(enumerate(blocks))[::-1]
    cpus, read_at = 1, -math.inf
    with _progress(len(blocks), "ingest: decode") as bar:
        while todo or pending:
            # bounded (memory stays flat however many blocks), and read again as it goes (at most every
            # CLUSTER_POLL_S: each read is a GCS call, ~3 ms of driver CPU): a cluster that an autoscaler grows
            # (it sees the queued tasks as demand) gets more tasks in flight
            if time.monotonic() - read_at >= CLUSTER_POLL_S:
                cpus, read_at = max(1, int(ray.cluster_resources().get("CPU", 1))), time.monotonic()
            while todo and len(pending) < 2 * cpus:
                i, block = todo.pop()
                pending[task.remote(decode, block, rec_dir, f"{prefix}-{i:05d}", kwargs_ref, tensors)] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    results.append(ray.get(ref))
                except ray.exceptions.RayError as err:  # the worker died (e.g. killed for memory) or the task raised
                    cause = _task_failure(err)
                    if isinstance(cause, OutputWriteError):  # the output's fault: no input is retried or blamed
                        _abandon(list(pending))
                        raise cause from None
                    failures[i] = cause
                    # its items are decoded again: a part it may have finished before dying would duplicate them
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(rec_dir, f"{prefix}-{i:05d}.parquet"))
                bar.update(1)
    if failures:
        log.warning("ingest: %d of %d decode tasks failed (%s)", len(failures), len(blocks),
                    ", ".join(f"{n} {c}" for c, n in sorted(Counter(failures.values()).items())))
        for f in os.listdir(rec_dir):  # what a killed task was writing (write_records' temporary files)
            if f.startswith(".") and f.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(rec_dir, f))
    return results, failures


def _internal_failure(causes: Iterable[str], records_dir: str) -> RuntimeError:
    """The stage's error when no decode task finished and they raised (outside the per-file handling):
    raypipe's fault, not the inputs', so nothing is quarantined."""
    names = ", ".join(sorted(set(causes) - {DIED}))
    return RuntimeError(f"ingest stopped: every decode task raised {names} outside the per-file decoding: a bug in "
                        f"raypipe, not a bad input (none was quarantined; nothing was written to {records_dir}); "
                        "please report it")


#: :func:`_task_failure` of a task whose worker died (killed by Ray's memory monitor or the OS, a crash in
#: native code, a lost node) or that ran out of memory in Python
DIED = "died"


def _task_failure(err: BaseException) -> str | OutputWriteError:
    """Why a decode task has no result: the :class:`OutputWriteError` it raised, :data:`DIED`, or the type
    name of another exception it raised (outside the per-file handling: raypipe's own glue; never its text,
    which may quote an input)."""
    import ray

    if not isinstance(err, ray.exceptions.RayTaskError):  # WorkerCrashedError, OutOfMemoryError, NodeDiedError...
        return DIED
    cause = err.cause
    if isinstance(cause, OutputWriteError):
        return cause
    if isinstance(cause, MemoryError):
        return DIED
    return type(cause).__name__ if cause is not None else "an exception"


def _abandon(refs: list) -> None:
    """Cancel the decode tasks of ``refs`` and wait (a minute at most) until they end, so that none writes
    into the temporary output after the driver removes it."""
    import ray

    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref)
    if refs:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=60)
        for ref in ready:  # fetched, so that Ray does not log them as unhandled errors
            with contextlib.suppress(Exception):
                ray.get(ref)


_DECODE_TASK = None


def _decode_task_fn():
    """:func:`_decode_and_write` as a Ray remote function (made once per process): never retried by Ray
    (:data:`DECODE_TASK_RETRIES`), spread over the nodes as Ray Data spreads its tasks."""
    global _DECODE_TASK
    if _DECODE_TASK is None:
        import ray

        _DECODE_TASK = ray.remote(_decode_and_write).options(
            num_cpus=1, max_retries=DECODE_TASK_RETRIES, retry_exceptions=False, scheduling_strategy="SPREAD")
    return _DECODE_TASK


def _progress(total: int, desc: str):
    """A bar of decode tasks when Ray Data's progress bars are on (``ray.progress_bars`` on a terminal)."""
    import ray.data

    from raypipe import console

    return console.progress(total, desc, ray.data.DataContext.get_current().enable_progress_bars, unit="task")


def _lost_items(work: list[dict], results: list[dict]) -> list[list[dict]]:
    """The work items no finished task reported on, in runs of consecutive items (one per dead task)."""
    done = {fid for ret in results for fid in ret["done"]}
    runs: list[list[dict]] = []
    prev_lost = False
    for it in work:
        lost = it["file"] not in done
        if lost:
            if not prev_lost:
                runs.append([])
            runs[-1].append(it)
        prev_lost = lost
    return runs


def _swap_into_place(tmp: str, final: str, inputs: list[str] | None = None) -> None:
    """Rename the finished ``tmp`` directory to ``final``. A previous output is moved aside first, then
    removed -- only after :func:`raypipe.ingest.safety.check_output_dir` finds raypipe's marker of an
    earlier ingest run in it and nothing else (checked again here: the folder may have changed). When the
    last rename fails, the earlier output is moved back: ``final`` then holds what it held before."""
    safety.check_output_dir(final, inputs or [], "ingest")
    old = None
    if os.path.lexists(final):
        old = tempfile.mkdtemp(prefix=".ingest-old-", dir=os.path.dirname(final))
        os.rmdir(old)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old:  # the earlier output goes back where it was (the error says it is unchanged)
            os.replace(old, final)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def summarise(files: list[dict], states: dict[int, str], errors: list[dict], skipped: Counter, n_records: int,
              n_samples: int, budget: float) -> dict:
    """Per-modality reconciliation: every file seen is in exactly one state; error budget verdict."""
    per: dict[str, dict[str, Any]] = {}
    by_class: dict[str, Counter] = defaultdict(Counter)
    for e in errors:
        if states.get(e["file"]) == "quarantined":
            by_class[files[e["file"]]["modality"]][e["error_class"]] += 1
    lost = 0
    for f in files:
        m = per.setdefault(f["modality"], {"seen": 0, **{s: 0 for s in STATES}})
        m["seen"] += 1
        state = states.get(f["file"])
        if state in STATES:
            m[state] += 1
        else:
            lost += 1  # a bug: a file neither ingested nor reported
    for mod, m in per.items():
        m["reconciled"] = m["seen"] == sum(m[s] for s in STATES)
        m["quarantined_by_class"] = dict(sorted(by_class[mod].items()))
    total = {s: sum(m[s] for m in per.values()) for s in ("seen", *STATES)}
    rate = total["quarantined"] / total["seen"] if total["seen"] else 0.0
    reconciled = lost == 0 and all(m["reconciled"] for m in per.values())
    within = rate <= budget
    return {"ok": bool(reconciled and within), "reconciled": bool(reconciled), "files_seen": total["seen"],
            "files_ingested": total["ingested"], "files_quarantined": total["quarantined"],
            "files_empty_as_missing": total["empty_as_missing"], "files_not_selected": total["not_selected"],
            "records": int(n_records), "samples": n_samples, "per_modality": dict(sorted(per.items())),
            "error_rate": round(rate, 4), "error_budget": budget, "within_error_budget": bool(within),
            "skipped_modalities": dict(sorted(skipped.items()))}


def reconciliation_table(summary: dict) -> str:
    """The human-readable reconciliation the CLI prints."""
    head = f"{'modality':<12}{'seen':>8}{'ingested':>10}{'quarantined':>13}{'empty':>7}{'not sel.':>10}  ok"
    lines = ["files seen = ingested + quarantined + empty (missing modality) + not selected (slice policy)", head]
    for m, v in summary["per_modality"].items():
        lines.append(f"{m:<12}{v['seen']:>8}{v['ingested']:>10}{v['quarantined']:>13}{v['empty_as_missing']:>7}"
                     f"{v['not_selected']:>10}  {'yes' if v['reconciled'] else 'NO'}")
    lines.append(f"{'total':<12}{summary['files_seen']:>8}{summary['files_ingested']:>10}"
                 f"{summary['files_quarantined']:>13}{summary['files_empty_as_missing']:>7}"
                 f"{summary['files_not_selected']:>10}  {'yes' if summary['reconciled'] else 'NO'}")
    verdict = "within" if summary["within_error_budget"] else "EXCEEDS"
    lines.append(f"quarantined {summary['error_rate']:.2%} of files: {verdict} the error budget of "
                 f"{summary['error_budget']:.2%}; {summary['records']} records for {summary['samples']} samples")
    return "\n".join(lines)

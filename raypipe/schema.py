"""Arrow schemas of the tables that flow between raypipe's stages.

This module is the contract between stages (see docs/design.md): a stage reads
and writes only these tables, so a user can stop after any stage and inspect
or replace its output with pandas, polars or duckdb.

Tables
------
records      one row per decoded unit (image slice, 2-D image, satellite
             patch, EHR stay tensor, report text). An array whose shape the
             ingest config fixes (image slices, EHR stays) is stored in the
             modality's ``tensor_<modality>`` column, Arrow's canonical
             fixed-shape tensor type (``arrow.fixed_shape_tensor``), so pandas,
             pyarrow and ``ray.data.read_parquet`` read it as an array; any
             other array (tabular rows, a record whose shape differs from the
             declared one, records of schema version 1) travels as raw
             little-endian bytes in ``payload``. ``dtype`` and ``shape`` are
             filled for every array record. Images are uint8 by default
             (``value / 255`` is the windowed intensity in [0, 1]), EHR float16:
             :func:`record_array` reads any of them back as float32.
samples      one row per sample (patient / region): label(s) and group
             columns (site, sex, age band, ...) and ``split`` ("train"/"test",
             or "infer" for a cohort without labels.csv, whose labels are null
             and groups "unknown"). Written by ingest beside the records;
             ``sample_id`` joins it to every other table.
errors       one row per rejected input (quarantine); counts reconcile.
embeddings   one row per sample, one embedding column per modality plus an
             availability mask; the embedding spec lives in table metadata.
predictions  one row per sample: prediction, probabilities, per-modality
             probabilities, reliability weights, imputed flags.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

# ---------------------------------------------------------------- metadata keys
#: JSON describing how an embeddings table was made (per modality: model,
#: revision, dim, pooling, preprocessing). Later stages refuse a mismatch.
EMBEDDING_SPEC_KEY = b"raypipe.embedding_spec"
#: JSON with the normalisation statistics fitted on the training split
#: (EHR means/stds) so that inference applies them unchanged.
NORMALISATION_KEY = b"raypipe.normalisation"
#: JSON describing the task: {"type": "binary"|"multiclass"|"multilabel"|"regression", ...}
TASK_KEY = b"raypipe.task"
#: Version of these schemas; bump on an incompatible change.
SCHEMA_VERSION_KEY = b"raypipe.schema_version"
SCHEMA_VERSION = "1"
#: records tables: 2 = compact payloads (uint8 images, float16 EHR) and ``tensor_<modality>`` columns
RECORDS_SCHEMA_VERSION = "2"

# ---------------------------------------------------------------- records
RECORDS_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),  # keyed hash of the source id
        pa.field("modality", pa.string(), nullable=False),  # config name: ct, pet, ehr, report, cxr, sat...
        pa.field("source_key", pa.string(), nullable=False),  # keyed hash of series UID / file, never raw
        pa.field("position", pa.int32(), nullable=False),  # anatomical slice order / patch index / 0
        pa.field("payload", pa.binary()),  # raw C-order array bytes; null for text
        pa.field("dtype", pa.string()),  # numpy dtype string of payload, e.g. "float32"
        pa.field("shape", pa.list_(pa.int32())),  # array shape of payload
        pa.field("text", pa.string()),  # report text; null for arrays
        pa.field("meta", pa.string()),  # JSON, PHI-free (spacing, window, SUV flag, geotransform...)
    ],
    metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()},
)

#: prefix of a modality's fixed-shape tensor column in the records table
#: in-memory bytes of table data per Parquet row group, for every table raypipe writes (records, embeddings,
#: the synthetic tables): a reader that splits a file by row group (infer's read path, Ray Data, DuckDB) reads
#: a large table in parallel, where pyarrow's default (one group per file up to 1,048,576 rows) is one serial
#: read task. 64 MB is ~62,000 rows of 4 x 64-d float32 embeddings.
ROW_GROUP_BYTES = 64 * 1024**2


def row_group_rows(table: pa.Table) -> int:
    """Rows per Parquet row group so that a group holds about :data:`ROW_GROUP_BYTES` of ``table``'s data."""
    return max(1, int(ROW_GROUP_BYTES * table.num_rows // max(1, table.nbytes)))


TENSOR_PREFIX = "tensor_"


def tensor_column(modality: str) -> str:
    """Name of ``modality``'s fixed-shape tensor column in the records table."""
    return f"{TENSOR_PREFIX}{modality}"


def records_schema(tensors: Mapping[str, tuple[str, Sequence[int]]] | None = None) -> pa.Schema:
    """The records schema with one ``tensor_<modality>`` column per entry of ``tensors``
    (modality -> (numpy dtype name, shape)), typed ``pa.fixed_shape_tensor(dtype, shape)``.

    Without ``tensors`` this is :data:`RECORDS_SCHEMA` (every array as ``payload`` bytes)."""
    fields = list(RECORDS_SCHEMA)
    for m, (dtype, shape) in sorted((tensors or {}).items()):
        fields.append(pa.field(tensor_column(m), pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(dtype)),
                                                                       [int(s) for s in shape])))
    return pa.schema(fields, metadata={SCHEMA_VERSION_KEY: RECORDS_SCHEMA_VERSION.encode()})


# ---------------------------------------------------------------- errors
ERRORS_SCHEMA = pa.schema(
    [
        # relative to the input root, every component a keyed hash (privacy.plain_paths: as written)
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # ingest | embed | infer ...
        pa.field("modality", pa.string()),
        pa.field("error_class", pa.string(), nullable=False),  # e.g. UnsupportedTransferSyntax
        pa.field("message", pa.string(), nullable=False),  # fixed sentence per class + non-identifying facts
    ],
    metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()},
)


def samples_schema(label_columns: Sequence[str], group_columns: Sequence[str],
                   label_type: pa.DataType = pa.float64()) -> pa.Schema:
    """Schema of the samples table: id, label column(s), group columns (strings)."""
    fields = [pa.field("sample_id", pa.string(), nullable=False)]
    fields += [pa.field(c, label_type) for c in label_columns]
    fields += [pa.field(c, pa.string()) for c in group_columns]
    return pa.schema(fields, metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()})


def embedding_column(modality: str) -> str:
    """Name of the embedding column of ``modality`` in the embeddings table."""
    return f"emb_{modality}"


def mask_column(modality: str) -> str:
    """Name of the availability-mask column of ``modality`` (True = present)."""
    return f"mask_{modality}"


def embeddings_schema(modality_shapes: Mapping[str, Sequence[int]], label_columns: Sequence[str],
                      group_columns: Sequence[str], spec: Mapping[str, Any] | None = None,
                      label_type: pa.DataType = pa.float64()) -> pa.Schema:
    """Schema of the embeddings table.

    ``modality_shapes`` maps a modality to the shape of one sample's embedding:
    ``(512,)`` for a pooled image, ``(24, 76)`` for an EHR sequence. Embeddings
    are stored flat as ``fixed_size_list<float32>`` of ``prod(shape)`` values;
    the shape is kept in the spec metadata. A missing modality is a null
    embedding with ``mask_<m> = False`` -- never a zero vector that looks like data.
    """
    fields = [pa.field("sample_id", pa.string(), nullable=False)]
    fields += [pa.field(c, label_type) for c in label_columns]
    fields += [pa.field(c, pa.string()) for c in group_columns]
    for m, shape in modality_shapes.items():
        fields.append(pa.field(embedding_column(m), pa.list_(pa.float32(), int(np.prod(shape)))))
        fields.append(pa.field(mask_column(m), pa.bool_(), nullable=False))
    meta = {SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()}
    full_spec = dict(spec or {})
    full_spec.setdefault("modalities", {})
    for m, shape in modality_shapes.items():
        full_spec["modalities"].setdefault(m, {})["shape"] = [int(s) for s in shape]
    meta[EMBEDDING_SPEC_KEY] = json.dumps(full_spec, sort_keys=True).encode()
    return pa.schema(fields, metadata=meta)


def predictions_schema(modalities: Iterable[str], n_outputs: int) -> pa.Schema:
    """Schema of the predictions table for a model over ``modalities``.

    ``prediction`` is the predicted class index (or value for regression);
    ``probabilities`` the joint head's output; ``prob_<m>`` each modality
    head's output; ``weight_<m>`` the label-free reliability weight;
    ``imputed_<m>`` True where modality m was absent and imputed.
    """
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prediction", pa.float64()),
        pa.field("probabilities", pa.list_(pa.float32(), n_outputs)),
    ]
    for m in modalities:
        fields += [
            pa.field(f"prob_{m}", pa.list_(pa.float32(), n_outputs)),
            pa.field(f"weight_{m}", pa.float32()),
            pa.field(f"imputed_{m}", pa.bool_()),
        ]
    return pa.schema(fields, metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()})


# ---------------------------------------------------------------- helpers
def array_to_payload(arr: np.ndarray) -> dict[str, Any]:
    """Pack a numpy array into the ``payload``/``dtype``/``shape`` record columns."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return {"payload": arr.tobytes(), "dtype": arr.dtype.name, "shape": list(arr.shape)}


def payload_to_array(payload: bytes, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`array_to_payload` (returns a read-only view when possible)."""
    return np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<")).reshape(tuple(shape))


def to_float(a: np.ndarray) -> np.ndarray:
    """A record's array as float32: uint8 image values are ``round(255 * v)`` of the windowed
    intensity ``v`` in [0, 1] and come back as ``a / 255``; float16/float32 are widened unchanged."""
    if a.dtype == np.uint8:
        return np.multiply(a, np.float32(1.0 / 255.0), dtype=np.float32)
    return a.astype(np.float32, copy=False)


def quantise_unit(a: np.ndarray, dtype: str = "uint8") -> np.ndarray:
    """A windowed image in [0, 1] stored as ``dtype``: uint8 = ``round(255 * a)`` (clipped), float16 or
    float32 as is. The inverse is :func:`to_float` (uint8: error at most 1/510)."""
    if dtype == "uint8":
        q = np.multiply(a, np.float32(255.0), dtype=np.float32)
        np.rint(q, out=q)
        np.clip(q, 0.0, 255.0, out=q)
        return q.astype(np.uint8)
    return np.asarray(a).astype(np.dtype(dtype), copy=False)


def tensor_chunks(column: pa.ChunkedArray | pa.Array) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per chunk of a fixed-shape tensor column: ``(values, valid)``, ``values`` a zero-copy numpy view
    (len, *shape) in the stored dtype (null slots hold unread filler), ``valid`` a bool mask, or None
    when the chunk has no nulls. Chunks follow the column's order (empty chunks skipped), so row
    ``i`` of the column is row ``i - start`` of its chunk."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    for arr in chunks:
        if len(arr) == 0:
            continue
        shape = tuple(arr.type.shape)
        storage = arr.storage if isinstance(arr, pa.ExtensionArray) else arr
        child = storage.values  # length = list_size * (offset + len): the parent's offset is not applied
        size = int(np.prod(shape))
        dt = child.type.to_pandas_dtype()
        data = child.buffers()[1]
        flat = (np.frombuffer(data, dt, count=len(child), offset=child.offset * np.dtype(dt).itemsize)
                if data is not None else np.zeros(size * (storage.offset + len(arr)), dt))
        base = storage.offset
        values = flat[base * size:(base + len(arr)) * size].reshape((len(arr),) + shape)
        valid = None if storage.null_count == 0 else storage.is_valid().to_numpy(zero_copy_only=False)
        out.append((values, valid))
    return out


def tensor_rows(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
    """Zero-copy numpy views (shaped, stored dtype) of a fixed-shape tensor column's values; None for nulls."""
    out: list[np.ndarray | None] = []
    for values, valid in tensor_chunks(column):
        out.extend(values[j] if valid is None or valid[j] else None for j in range(len(values)))
    return out


def record_array(row: Mapping[str, Any], as_float: bool = True) -> np.ndarray | None:
    """The array of one records row (a dict, e.g. from ``to_pylist()`` or a pandas row), from its
    ``tensor_<modality>`` column or its ``payload`` bytes; None for text. ``as_float``: float32
    through :func:`to_float` (uint8 images back to [0, 1]). Reads records of schema version 1 and 2."""
    t = row.get(tensor_column(row["modality"])) if row.get("modality") is not None else None
    if t is not None:
        a = np.asarray(t)
        if a.dtype == object:
            a = np.stack(a)
        a = a.astype(np.dtype(row["dtype"]), copy=False).reshape(tuple(row["shape"]))
    elif row.get("payload") is not None:
        a = payload_to_array(row["payload"], row["dtype"], row["shape"])
    else:
        return None
    return to_float(a) if as_float else a


def read_json_metadata(schema: pa.Schema, key: bytes) -> dict[str, Any] | None:
    """Return the JSON stored under ``key`` in a table's schema metadata, or None."""
    md = schema.metadata or {}
    raw = md.get(key)
    return json.loads(raw) if raw else None


def with_json_metadata(schema: pa.Schema, key: bytes, value: Mapping[str, Any]) -> pa.Schema:
    """Return ``schema`` with ``value`` stored as JSON under ``key`` (sorted keys: deterministic bytes)."""
    md = dict(schema.metadata or {})
    md[key] = json.dumps(value, sort_keys=True).encode()
    return schema.with_metadata(md)

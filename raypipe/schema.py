"""Arrow schemas of the tables that flow between raypipe's stages.

This module is the contract between stages (see docs/design.md): a stage reads
and writes only these tables, so a user can stop after any stage and inspect
or replace its output with pandas, polars or duckdb.

Tables
------
records      one row per decoded unit (image slice, 2-D image, satellite
             patch, EHR stay tensor, report text). Arrays travel as raw
             little-endian bytes in ``payload`` with ``dtype`` and ``shape``.
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
    return {"payload": arr.tobytes(), "dtype": arr.dtype.str.lstrip("<|="), "shape": list(arr.shape)}


def payload_to_array(payload: bytes, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`array_to_payload` (returns a read-only view when possible)."""
    return np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<")).reshape(tuple(shape))


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

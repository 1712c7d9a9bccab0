"""Read the embeddings table (the embed stage's output) into arrays; no Ray here.

The table's schema metadata names the modalities and their shapes
(``raypipe.embedding_spec``); masks say which modality a sample has. A
missing embedding is null in the table and becomes zeros *plus a False mask*
here: the fusion models see the mask, never a fake "zero" measurement.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa

from raypipe.schema import EMBEDDING_SPEC_KEY, NORMALISATION_KEY, embedding_column, mask_column, read_json_metadata

log = logging.getLogger(__name__)

TASKS = ("binary", "multiclass", "multilabel", "regression")


@dataclass
class EmbeddingTable:
    """One embeddings table in memory, columns split by role."""

    sample_id: np.ndarray  # (N,) str
    x: dict[str, np.ndarray]  # modality -> (N, *shape) float32, zeros where missing
    mask: np.ndarray  # (N, M) bool in the order of `modalities`
    y: np.ndarray  # (N,) or (N, L)
    modalities: list[str]
    shapes: dict[str, tuple[int, ...]]
    label_columns: list[str]
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # group column -> (N,) str
    split: np.ndarray | None = None  # (N,) "train"/"test" when the table carries it
    spec: dict = field(default_factory=dict)
    #: normalisation statistics fitted at ingest (``{"ehr": {...}}``), carried with the table
    normalisation: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_id)

    def take(self, idx: np.ndarray) -> "EmbeddingTable":
        """Rows ``idx`` (an index or boolean array) as a new table."""
        return EmbeddingTable(
            sample_id=self.sample_id[idx], x={m: v[idx] for m, v in self.x.items()}, mask=self.mask[idx],
            y=self.y[idx], modalities=self.modalities, shapes=self.shapes, label_columns=self.label_columns,
            groups={k: v[idx] for k, v in self.groups.items()},
            split=None if self.split is None else self.split[idx], spec=self.spec, normalisation=self.normalisation)


def fixed_list_to_numpy(column: pa.Array | pa.ChunkedArray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A (fixed-size) list<float> column -> ((N, width) float32 with zeros for nulls, (N,) valid mask)."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 1:
            column = column.chunk(0)
        elif column.num_chunks == 0:
            column = pa.array([], type=column.type)
        else:  # chunk by chunk: one copy of the values instead of combine_chunks' and ours
            parts = [fixed_list_to_numpy(c, width) for c in column.chunks]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    n = len(column)
    valid = column.is_valid().to_numpy(zero_copy_only=False) if column.null_count else np.ones(n, bool)
    if n and pa.types.is_fixed_size_list(column.type) and column.type.list_size == width:
        # the child array holds width values for every row, nulls included: read it in place
        flat = column.values.slice(column.offset * width, n * width)
        if flat.null_count == 0 and pa.types.is_floating(flat.type):
            out = np.array(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, width)  # own copy
            if not valid.all():
                out[~valid] = 0.0
            return out, valid
    out = np.zeros((n, width), np.float32)
    if valid.any():
        values = column.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
        out[valid] = np.asarray(values, np.float32).reshape(-1, width)
    return out, valid


def modality_shapes(schema: pa.Schema) -> dict[str, tuple[int, ...]]:
    """Modalities and their per-sample shapes from the table's embedding spec (schema order)."""
    spec = read_json_metadata(schema, EMBEDDING_SPEC_KEY) or {}
    declared = spec.get("modalities", {})
    shapes: dict[str, tuple[int, ...]] = {}
    for f in schema:
        if f.name.startswith("emb_"):
            m = f.name[len("emb_"):]
            shape = declared.get(m, {}).get("shape")
            if shape is None:
                if not pa.types.is_fixed_size_list(f.type):
                    raise ValueError(f"embedding column {f.name} has no declared shape and is not a fixed-size list")
                shape = [f.type.list_size]
            shapes[m] = tuple(int(s) for s in shape)
    if len(shapes) < 1:
        raise ValueError("no embedding columns (emb_<modality>) in the table: is this an embeddings table?")
    return shapes


def table_to_arrays(table: pa.Table, modalities: Sequence[str], shapes: dict[str, tuple[int, ...]],
                    label_columns: Sequence[str]) -> dict[str, np.ndarray]:
    """An Arrow table/batch -> numpy arrays {"x_<m>", "mask", "y"} for the given modalities."""
    n = table.num_rows
    out: dict[str, np.ndarray] = {}
    masks = []
    for m in modalities:
        width = int(np.prod(shapes[m]))
        vals, valid = fixed_list_to_numpy(table.column(embedding_column(m)), width)
        mcol = mask_column(m)
        mask = table.column(mcol).to_numpy(zero_copy_only=False).astype(bool) if mcol in table.column_names else valid
        mask = mask & valid
        if not mask.all():
            vals[~mask] = 0.0
        out[f"x_{m}"] = vals.reshape((n,) + tuple(shapes[m]))
        masks.append(mask)
    out["mask"] = np.stack(masks, axis=1) if masks else np.zeros((n, 0), bool)
    labels = [table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in label_columns]
    if not labels:  # inference: no labels needed
        out["y"] = np.full(n, np.nan)
    else:
        out["y"] = labels[0] if len(labels) == 1 else np.stack(labels, axis=1)
    return out


def read_embeddings(path: str, label_columns: Sequence[str] | None = None) -> EmbeddingTable:
    """Read an embeddings table (a Parquet file or dataset directory), ordered by sample id."""
    import pyarrow.dataset as pads

    if not os.path.exists(path) and "://" not in path:
        raise FileNotFoundError(f"no embeddings table at {path}: run `raypipe embed` first or set train.input")
    dataset = pads.dataset(path, format="parquet", exclude_invalid_files=True)
    table = dataset.to_table()
    schema = dataset.schema
    shapes = modality_shapes(schema)
    spec = read_json_metadata(schema, EMBEDDING_SPEC_KEY) or {}
    normalisation = read_json_metadata(schema, NORMALISATION_KEY) or {}
    table = table.sort_by("sample_id")
    modalities = list(shapes)
    known = {"sample_id", "split", *(embedding_column(m) for m in modalities), *(mask_column(m) for m in modalities)}
    found = [c for c in table.column_names if c == "label" or c.startswith("label_")]
    numbered = [c for c in found if re.fullmatch(r"label_\d+", c)]
    if label_columns is None:
        label_columns = found
    elif list(label_columns) == ["label"] and "label" not in table.column_names and numbered:
        # ingest.label_columns left at its default on a table with several labels (raypipe.tables.write_embeddings
        # names (N, L) labels label_0 .. label_{L-1}): those are the labels (not e.g. a group column label_site)
        log.info("labels: the table has no 'label' column; using its label columns %s", numbered)
        label_columns = numbered
    missing = [c for c in label_columns if c not in table.column_names]
    if missing:  # the label-like column names only: the table's other columns are the user's business
        raise ValueError(f"label column(s) {missing} not in the embeddings table (its label columns: "
                         f"{found or 'none'}); set ingest.label_columns")
    arrays = table_to_arrays(table, modalities, shapes, label_columns)
    groups = {c: np.asarray(table.column(c).to_pylist(), dtype=object).astype(str)
              for c in table.column_names if c not in known and c not in label_columns}
    split = (np.asarray(table.column("split").to_pylist(), dtype=object).astype(str)
             if "split" in table.column_names else None)
    return EmbeddingTable(
        sample_id=np.asarray(table.column("sample_id").to_pylist(), dtype=object).astype(str),
        x={m: arrays[f"x_{m}"] for m in modalities}, mask=arrays["mask"], y=arrays["y"], modalities=modalities,
        shapes=shapes, label_columns=list(label_columns), groups=groups, split=split, spec=spec,
        normalisation=normalisation)


def infer_task(y: np.ndarray, declared: str = "auto") -> tuple[str, int]:
    """(task, n_outputs) from the labels unless ``declared`` says otherwise.

    binary -> 2 outputs (softmax over two classes, as in METHOD.md); multiclass -> C;
    multilabel (2-D 0/1 labels) -> L; regression -> 1.
    """
    y = np.asarray(y)
    if y.dtype.kind == "f" and y.size and np.isnan(y).all():
        raise ValueError("the embeddings table has no labels (every label is null: a cohort ingested without "
                         "labels.csv?); train, tune and compare need labelled samples. Predict such a cohort with "
                         "`raypipe infer --input COHORT_OR_EMBEDDINGS`.")
    if declared != "auto":
        if declared not in TASKS:
            raise ValueError(f"unknown task {declared!r}; one of {TASKS}")
        task = declared
    elif y.ndim == 2:
        task = "multilabel"
    else:
        finite = y[~np.isnan(y)] if y.dtype.kind == "f" else y
        integral = np.all(np.equal(np.mod(finite, 1), 0))
        uniq = np.unique(finite)
        if integral and len(uniq) <= 2 and set(uniq.tolist()) <= {0.0, 1.0}:
            task = "binary"
        elif integral and len(uniq) <= 50 and uniq.min() >= 0:
            task = "multiclass"
        else:
            task = "regression"
    if task == "binary":
        return task, 2
    if task == "multiclass":
        return task, int(np.nanmax(y)) + 1
    if task == "multilabel":
        return task, int(y.shape[1])
    return task, 1

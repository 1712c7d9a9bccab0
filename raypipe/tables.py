"""Bring your own embeddings: write (and import) an embeddings table in the format `raypipe embed` writes.

Users who already have per-sample embeddings from their own foundation models write them
with :func:`write_embeddings` (numpy arrays, or a pandas / polars frame with one column
per modality) or convert a file with ``raypipe import`` (:func:`import_table`: Parquet,
CSV or NPZ). Every later stage (``train``, ``tune``, ``compare``, ``infer``) reads the
result like the embed stage's own output. See docs/tables.md.

The format (``raypipe.schema.embeddings_schema``), one row per sample, sorted by id:

- ``sample_id`` (string, unique, non-empty);
- label column(s) ``label`` or ``label_<name>`` (float64; all null for an unlabelled
  table that is only predicted);
- group columns (strings, e.g. ``site``), and ``split`` ("train"/"test") when given;
- per modality ``emb_<m>``: ``fixed_size_list<float32>`` of ``prod(shape)`` values
  (null where the sample lacks the modality; never a zero vector) and ``mask_<m>``
  (bool, True = present); the shape lives in the table's embedding-spec metadata.

Column-naming convention of :func:`import_table` (and of a frame given to
:func:`write_embeddings`): ``sample_id``; ``label`` / ``label_<name>``; an embedding per
modality either as one list/array column ``emb_<m>`` or as numbered scalar columns
``emb_<m>_0 .. emb_<m>_<d-1>`` (CSV, wide Parquet); optionally ``mask_<m>``; optionally
``split``; every other column is a group column.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypipe.schema import embedding_column, embeddings_schema, mask_column, row_group_rows

log = logging.getLogger(__name__)

__all__ = ["TableError", "write_embeddings", "import_table", "run_import", "TABLE_FILE"]

#: the file written inside the output directory (the embed stage's name)
TABLE_FILE = "part-00000.parquet"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")
_RESERVED = {"sample_id", "split"}
_TASKS = ("binary", "multiclass", "multilabel", "regression")


class TableError(ValueError):
    """The input cannot be written as an embeddings table; the message says what to fix."""


# ----------------------------------------------------------------------------- helpers
def _is_frame(obj: Any) -> bool:
    mod = type(obj).__module__
    return (mod.startswith("pandas") or mod.startswith("polars")) and hasattr(obj, "columns")


def _to_pandas(frame):
    if type(frame).__module__.startswith("polars"):
        return frame.to_pandas()
    return frame


def _cell_array(v) -> np.ndarray | None:
    """A frame cell (list, tuple, ndarray, None/NaN) as a float array, or None when absent."""
    if v is None:
        return None
    if isinstance(v, float) and np.isnan(v):
        return None
    return np.asarray(v, dtype=np.float64)


def _stack_cells(name: str, cells: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Cells of one modality column -> ((N, *shape) float array, NaN where absent; (N,) present)."""
    arrays = [_cell_array(v) for v in cells]
    shapes = {a.shape for a in arrays if a is not None}
    if not shapes:
        raise TableError(f"modality {name!r}: no sample has this embedding (every cell is empty)")
    if len(shapes) > 1:
        raise TableError(f"modality {name!r}: embeddings of different shapes {sorted(shapes)[:3]}; "
                         "every sample's embedding of a modality must have the same shape")
    shape = shapes.pop()
    out = np.full((len(arrays),) + shape, np.nan)
    present = np.zeros(len(arrays), bool)
    for i, a in enumerate(arrays):
        if a is not None:
            out[i] = a
            present[i] = True
    return out, present


def _frame_parts(frame, modalities: Sequence[str] | None, id_column: str, label_columns: Sequence[str] | None):
    """Split a frame by the column-naming convention into (ids, embeddings, masks, labels, names, split, groups)."""
    df = _to_pandas(frame)
    cols = [str(c) for c in df.columns]
    if id_column not in cols:
        raise TableError(f"no id column {id_column!r} in the frame (columns: {cols[:20]}); "
                         "name the id column sample_id or pass id_column=")
    used = {id_column}
    if label_columns is None:
        label_columns = [c for c in cols if c == "label" or c.startswith("label_")]
    missing = [c for c in label_columns if c not in cols]
    if missing:
        raise TableError(f"label column(s) {missing} not in the frame")
    used |= set(label_columns)
    embeddings: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}

    def is_list_column(c: str) -> bool:
        cells = df[c].dropna()
        return len(cells) > 0 and isinstance(cells.iloc[0], (list, tuple, np.ndarray))

    list_cols = {c for c in cols if c not in used and is_list_column(c)}
    wide: dict[str, list[tuple[int, str]]] = {}
    for c in cols:
        m = re.match(r"^emb_(.+)_(\d+)$", c)
        if m and c not in list_cols:
            wide.setdefault(m.group(1), []).append((int(m.group(2)), c))
    if modalities is None:
        modalities = [c[len("emb_"):] for c in cols if c.startswith("emb_") and c in list_cols]
        modalities += [m for m in wide if m not in modalities]
        if not modalities:  # no emb_ prefix: the columns whose cells are lists/arrays are the modalities
            modalities = [c for c in cols if c in list_cols and c != "split"]
        if not modalities:
            raise TableError("no embedding columns found: name them emb_<modality> (cells are lists/arrays) or "
                             "emb_<modality>_0..emb_<modality>_<d-1>, or pass modalities=")
    for m in modalities:
        if f"emb_{m}" in list_cols:
            col = f"emb_{m}"
        elif m in wide:
            idx = sorted(wide[m])
            if [i for i, _ in idx] != list(range(len(idx))):
                raise TableError(f"modality {m!r}: numbered columns emb_{m}_<j> must run 0..d-1 without gaps")
            names = [c for _, c in idx]
            values = df[names].to_numpy(dtype=np.float64)
            nan = np.isnan(values)
            partial = nan.any(axis=1) & ~nan.all(axis=1)
            if partial.any():
                raise TableError(f"modality {m!r}: {int(partial.sum())} row(s) have some but not all of "
                                 f"emb_{m}_0..{len(names) - 1} empty; leave every value of an absent embedding empty")
            embeddings[m] = values
            masks[m] = ~nan.all(axis=1)
            used |= set(names)
            if f"mask_{m}" in cols:
                masks[m] = masks[m] & _bool_column(df[f"mask_{m}"], f"mask_{m}")
                used.add(f"mask_{m}")
            continue
        elif m in list_cols:
            col = m
        else:
            raise TableError(f"modality {m!r}: no column emb_{m}, emb_{m}_0.. or {m} in the frame")
        embeddings[m], masks[m] = _stack_cells(m, df[col].tolist())
        used.add(col)
        if f"mask_{m}" in cols:
            masks[m] = masks[m] & _bool_column(df[f"mask_{m}"], f"mask_{m}")
            used.add(f"mask_{m}")
    labels = None
    if label_columns:
        labels = np.stack([_numeric_labels(df[c], c) for c in label_columns], axis=1)
        labels = labels[:, 0] if labels.shape[1] == 1 else labels
    split = df["split"].to_numpy() if "split" in cols else None
    used.add("split")
    groups = {c: df[c].to_numpy() for c in cols if c not in used and not c.startswith("mask_")}
    return (df[id_column].to_numpy(), embeddings, masks, labels, list(label_columns), split, groups)


def _bool_column(series, name: str) -> np.ndarray:
    v = series.to_numpy()
    if v.dtype == bool:
        return v
    try:
        f = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        f = np.asarray([str(s).strip().lower() in ("true", "1", "yes") for s in v], dtype=np.float64)
    if np.isnan(f).any() or not np.isin(f, [0.0, 1.0]).all():
        raise TableError(f"{name}: a mask must be true/false or 1/0 on every row")
    return f.astype(bool)


def _numeric_labels(series, name: str) -> np.ndarray:
    try:
        return np.asarray(series.to_numpy(), dtype=np.float64)
    except (TypeError, ValueError):
        raise TableError(f"label column {name!r} is not numeric: encode classes as 0..C-1 (e.g. "
                         "pandas.factorize) and keep the class names yourself") from None


def _check_labels(labels: np.ndarray, n: int, task: str | None) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype.kind not in "biuf":
        raise TableError("labels must be numeric: encode classes as 0..C-1 (e.g. pandas.factorize)")
    y = y.astype(np.float64)
    if y.ndim not in (1, 2) or len(y) != n:
        raise TableError(f"labels must have shape (N,) or (N, L) with N = {n} samples, got {y.shape}")
    nan = np.isnan(y)
    if nan.any() and not nan.all():
        raise TableError(f"{int(nan.any(axis=1).sum() if y.ndim == 2 else nan.sum())} sample(s) have no label: "
                         "drop them, or leave every label empty for a table that is only predicted")
    if nan.all() or task is None:
        return y
    if task not in _TASKS:
        raise TableError(f"unknown task {task!r}; one of {_TASKS}")
    if task == "binary" and (y.ndim != 1 or not np.isin(y, [0.0, 1.0]).all()):
        raise TableError("task binary: labels must be one column of 0/1")
    if task == "multiclass" and (y.ndim != 1 or (y < 0).any() or not np.equal(np.mod(y, 1), 0).all()):
        raise TableError("task multiclass: labels must be one column of class indices 0..C-1")
    if task == "multilabel" and (y.ndim != 2 or not np.isin(y, [0.0, 1.0]).all()):
        raise TableError("task multilabel: labels must be (N, L) of 0/1 (one label column per label)")
    if task == "regression" and y.ndim != 1:
        raise TableError("task regression: labels must be one column")
    if not np.isfinite(y).all():
        raise TableError("labels must be finite numbers")
    return y


# ----------------------------------------------------------------------------- writer
def write_embeddings(out: str, embeddings: Mapping[str, np.ndarray] | Any, sample_ids: Sequence | None = None,
                     labels: np.ndarray | None = None, *, masks: Mapping[str, np.ndarray] | None = None,
                     label_names: Sequence[str] | None = None, groups: Mapping[str, Sequence] | None = None,
                     split: Sequence[str] | None = None, spec: Mapping[str, Any] | None = None,
                     task: str | None = None, modalities: Sequence[str] | None = None,
                     id_column: str = "sample_id", overwrite: bool = False) -> str:
    """Write an embeddings table (the format of `raypipe embed`) into directory ``out``; returns ``out``.

    From arrays::

        write_embeddings("my_emb", {"ct": ct (N, 512), "report": rep (N, 384)}, ids, y,
                         masks={"ct": has_ct}, groups={"site": site}, split=split)

    From a pandas or polars frame (``embeddings`` is the frame; ``sample_ids``/``labels``
    not given): the column-naming convention of the module docstring, or name the
    modality columns with ``modalities=["ct", "report"]`` (cells are lists/arrays; None
    for an absent embedding).

    ``embeddings[m]``: (N, *shape) numbers; a sample lacks modality m where ``masks[m]``
    is False or, without a mask, where its whole embedding is NaN. ``labels``: (N,) or
    (N, L) numbers (class indices 0..C-1 for classification), or None / all-NaN for a
    table that is only predicted; ``label_names`` default ``label`` (``label_0..`` for L
    columns). ``groups``: group columns (written as strings). ``split``: "train"/"test"
    per sample (a fixed held-out test split). ``spec``: how the embeddings were made, per
    modality (``{"modalities": {"ct": {"model": "my-ct-fm", "revision": "v2"}}}``):
    `raypipe infer` refuses an input whose spec differs from the model's.
    ``task`` ("binary", "multiclass", "multilabel", "regression"): if given, the labels
    are checked against it. The file is written atomically; an existing table is kept
    unless ``overwrite``. Raises :class:`TableError` with what to fix.
    """
    if _is_frame(embeddings):
        if sample_ids is not None or labels is not None:
            raise TableError("with a frame, ids and labels come from its columns: do not pass sample_ids/labels")
        ids, emb, fmasks, labels, lnames, fsplit, fgroups = _frame_parts(embeddings, modalities, id_column,
                                                                          label_names)
        label_names = lnames
        masks = {**fmasks, **(masks or {})}
        split = fsplit if split is None else split
        groups = {**fgroups, **(groups or {})}
        embeddings = emb
    elif sample_ids is None:
        raise TableError("sample_ids are required (one unique id per row)")
    else:
        ids = sample_ids
        if modalities is not None:
            embeddings = {m: embeddings[m] for m in modalities}
    ids = np.asarray(ids)
    n = len(ids)
    if n == 0:
        raise TableError("no samples: the table would be empty")
    sid = np.asarray([str(s) for s in ids], dtype=object)
    if ids.dtype.kind == "f" and np.isnan(ids.astype(float)).any() or any(s in ("", "None", "nan") for s in sid):
        raise TableError("every sample needs a non-empty id")
    uniq, counts = np.unique(sid.astype(str), return_counts=True)
    if (counts > 1).any():
        raise TableError(f"{int((counts > 1).sum())} sample id(s) occur more than once; ids must be unique "
                         "(one row per sample)")
    if not isinstance(embeddings, Mapping) or len(embeddings) < 2:
        got = list(embeddings) if isinstance(embeddings, Mapping) else type(embeddings).__name__
        raise TableError(f"need at least 2 modalities to fuse, got {got}")
    masks = dict(masks or {})
    unknown = set(masks) - set(embeddings)
    if unknown:
        raise TableError(f"masks for modalities that have no embeddings: {sorted(unknown)}")
    shapes: dict[str, tuple[int, ...]] = {}
    values: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    for m, arr in embeddings.items():
        m = str(m)
        if not _NAME.match(m) or m in _RESERVED:
            raise TableError(f"modality name {m!r}: use letters, digits and _ (it becomes column emb_{m})")
        try:
            a = np.asarray(arr, dtype=np.float64)
        except (TypeError, ValueError):
            raise TableError(f"modality {m!r}: embeddings must be numbers of one shape per sample "
                             "(an (N, d) or (N, T, F) array)") from None
        if a.ndim < 2 or a.ndim > 3 or len(a) != n:
            raise TableError(f"modality {m!r}: expected shape (N, d) or (N, T, F) with N = {n}, got {a.shape}")
        flat = a.reshape(n, -1)
        nan_rows = np.isnan(flat).all(axis=1)
        mk = masks.get(m)
        if mk is None:
            mk = ~nan_rows
        else:
            mk = np.asarray(mk)
            if mk.shape != (n,) or mk.dtype.kind not in "bui":
                raise TableError(f"mask of {m!r}: expected (N,) booleans with N = {n}, got {mk.shape} {mk.dtype}")
            if mk.dtype.kind != "b" and not np.isin(mk, [0, 1]).all():
                raise TableError(f"mask of {m!r}: only 0/1 or True/False")
            mk = mk.astype(bool)
        bad = mk & ~np.isfinite(flat).all(axis=1)
        if bad.any():
            raise TableError(f"modality {m!r}: {int(bad.sum())} sample(s) marked present have NaN/inf values; "
                             "mark them absent (mask False / all-NaN) or fix the values")
        if not mk.any():
            raise TableError(f"modality {m!r}: no sample has it")
        shapes[m] = tuple(int(s) for s in a.shape[1:])
        values[m] = flat.astype(np.float32)
        present[m] = mk
    none = ~np.stack(list(present.values()), axis=1).any(axis=1)
    if none.any():
        raise TableError(f"{int(none.sum())} sample(s) have no modality at all; drop them")
    if labels is None:
        y = None
    else:
        y = _check_labels(labels, n, task)
    if y is None:
        label_names = []
    else:
        width = 1 if y.ndim == 1 else y.shape[1]
        label_names = list(label_names) if label_names else (["label"] if width == 1 else
                                                             [f"label_{j}" for j in range(width)])
        if len(label_names) != width:
            raise TableError(f"{len(label_names)} label name(s) for {width} label column(s)")
        for c in label_names:
            if not (c == "label" or c.startswith("label_")):
                raise TableError(f"label column {c!r}: name label columns label or label_<name> "
                                 "(how later stages find them)")
    group_cols: dict[str, np.ndarray] = {}
    for g, v in (groups or {}).items():
        g = str(g)
        v = np.asarray(v, dtype=object)
        if not _NAME.match(g) or g in _RESERVED or g.startswith(("emb_", "mask_", "label")):
            raise TableError(f"group column name {g!r}: letters, digits and _, not sample_id/split/emb_/mask_/label")
        if v.shape != (n,):
            raise TableError(f"group column {g!r}: expected (N,) values with N = {n}, got {v.shape}")
        group_cols[g] = np.asarray(["unknown" if x is None or (isinstance(x, float) and np.isnan(x)) else str(x)
                                    for x in v], dtype=object)
    if split is not None:
        sp = np.asarray([str(s) for s in split], dtype=object)
        if sp.shape != (n,) or not np.isin(sp, ["train", "test"]).all():
            raise TableError('split: expected "train" or "test" for every sample')
        group_cols["split"] = sp
    schema = embeddings_schema(shapes, label_names, list(group_cols), dict(spec or {}))
    cols: dict[str, Any] = {"sample_id": pa.array(sid.astype(str), pa.string())}
    for j, c in enumerate(label_names):
        cols[c] = pa.array(y if y.ndim == 1 else y[:, j], pa.float64())
    for g, v in group_cols.items():
        cols[g] = pa.array(v.astype(str), pa.string())
    for m in shapes:
        width = values[m].shape[1]
        vals = np.where(present[m][:, None], values[m], 0.0).astype(np.float32)
        cols[embedding_column(m)] = pa.FixedSizeListArray.from_arrays(pa.array(vals.ravel()), width,
                                                                      mask=pa.array(~present[m]))
        cols[mask_column(m)] = pa.array(present[m])
    table = pa.table(cols, schema=schema).sort_by("sample_id")
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise TableError(f"{out} exists and is not empty; pass overwrite=True (raypipe import --overwrite)")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # row groups of ~64 MB (raypipe.schema.ROW_GROUP_BYTES): readers that split by row group (infer, Ray
    # Data, DuckDB) read a large table in parallel; pyarrow's default is one group per file
    pq.write_table(table, os.path.join(tmp, TABLE_FILE), row_group_size=row_group_rows(table))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("wrote an embeddings table of %d samples, modalities %s, to %s", n,
             {m: list(s) for m, s in shapes.items()}, out)
    return out


# ----------------------------------------------------------------------------- import
def _read_npz(path: str):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if "sample_id" not in arrays:
        raise TableError(f"the NPZ file has no array named sample_id (arrays: {sorted(arrays)[:20]})")
    n = len(arrays["sample_id"])
    emb = {k[len("emb_"):]: v for k, v in arrays.items() if k.startswith("emb_")}
    if not emb:
        raise TableError("the NPZ file has no emb_<modality> arrays (see the naming convention in docs/tables.md)")
    masks = {k[len("mask_"):]: v for k, v in arrays.items() if k.startswith("mask_")}
    label_names = sorted(k for k in arrays if k == "label" or k.startswith("label_"))
    labels = None
    if label_names:
        parts = [np.asarray(arrays[c], np.float64) for c in label_names]
        labels = parts[0] if len(parts) == 1 and parts[0].ndim == 1 else np.column_stack(parts)
        if len(parts) == 1 and parts[0].ndim == 2:
            label_names = [f"label_{j}" for j in range(parts[0].shape[1])]
    split = arrays.get("split")
    known = {"sample_id", "split", *label_names, *(f"emb_{m}" for m in emb), *(f"mask_{m}" for m in masks)}
    groups = {k: v for k, v in arrays.items() if k not in known and not k.startswith("label")
              and v.ndim == 1 and len(v) == n}
    return arrays["sample_id"], emb, masks, labels, label_names or None, split, groups


def import_table(path: str, out: str, *, label_columns: Sequence[str] | None = None, id_column: str = "sample_id",
                 task: str | None = None, spec: Mapping[str, Any] | None = None, overwrite: bool = False) -> dict:
    """Convert a Parquet, CSV or NPZ file into an embeddings table (``raypipe import``); returns a summary.

    The input follows the column-naming convention of this module's docstring (NPZ: one
    array per column name; ``emb_<m>`` may be (N, d) or (N, T, F)).
    """
    import pandas as pd

    if not os.path.exists(path):
        raise FileNotFoundError(f"no input file at {path}")
    ext = path.lower().rsplit(".", 1)[-1] if "." in os.path.basename(path) else ""
    if ext == "npz":
        ids, emb, masks, labels, names, split, groups = _read_npz(path)
        if label_columns:
            names = list(label_columns)
        write_embeddings(out, emb, ids, labels, masks=masks, label_names=names, groups=groups, split=split,
                         spec=spec, task=task, overwrite=overwrite)
    else:
        if ext == "csv":
            df = pd.read_csv(path, dtype={id_column: str})
        elif ext in ("parquet", "pq") or os.path.isdir(path):
            df = pd.read_parquet(path)
        else:
            raise TableError(f"unsupported input type {ext!r}: Parquet (.parquet), CSV (.csv) or NPZ (.npz)")
        write_embeddings(out, df, label_names=label_columns, spec=spec, task=task, id_column=id_column,
                         overwrite=overwrite)
    from raypipe.train.tables import read_embeddings

    table = read_embeddings(out, None)
    return {"ok": True, "table": os.path.abspath(out), "samples": len(table),
            "modalities": {m: list(s) for m, s in table.shapes.items()},
            "present": {m: int(table.mask[:, i].sum()) for i, m in enumerate(table.modalities)},
            "label_columns": table.label_columns, "groups": sorted(table.groups),
            "split": None if table.split is None else {s: int((table.split == s).sum()) for s in ("train", "test")}}


def run_import(cfg, input: str, out: str | None = None, label_columns: Sequence[str] | None = None,
               id_column: str = "sample_id", task: str | None = None, overwrite: bool = False) -> dict:
    """`raypipe import`: ``input`` -> ``out`` (default: the config's embeddings directory, what train reads)."""
    out = out or cfg.embeddings_dir
    if task is None and cfg.train.task != "auto":
        task = cfg.train.task
    return import_table(input, out, label_columns=label_columns, id_column=id_column, task=task,
                        overwrite=overwrite)

"""Tabular modalities: one CSV row per patient with numeric columns -> one float32 vector."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from raypipe.ingest.common import DecodeError


@lru_cache(maxsize=8)
def _table(path: str):
    """(numeric table indexed by patient_id, its column names); cached per worker process."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype={"patient_id": str})
    except (OSError, ValueError) as err:
        raise DecodeError("BadTable", f"cannot read the table: {type(err).__name__}: {err}") from None
    if "patient_id" not in df.columns:
        raise DecodeError("BadTable", "no patient_id column")
    if df["patient_id"].duplicated().any():
        raise DecodeError("BadTable", "patient_id is not unique: one row per patient expected")
    numeric = df.drop(columns=["patient_id"]).select_dtypes("number")
    if numeric.shape[1] == 0:
        raise DecodeError("BadTable", "no numeric columns")
    # the column set is decided once per table, so every patient's vector has the same layout
    return numeric.set_index(df["patient_id"]), list(numeric.columns)


def read_row(path: str, patient_id: str) -> tuple[np.ndarray, list[str]]:
    """The numeric columns of ``patient_id``'s row (NaN -> ``NonFiniteValues``: impute upstream or drop the row)."""
    table, cols = _table(path)
    if patient_id not in table.index:
        raise DecodeError("MissingRow", "no row for this patient in the table")
    values = table.loc[patient_id].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        bad = [c for c, v in zip(cols, values) if not np.isfinite(v)]
        raise DecodeError("NonFiniteValues", f"missing or non-numeric values in columns {bad}")
    return values.astype(np.float32), cols

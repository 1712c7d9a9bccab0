"""Tabular modalities: one CSV row per patient with numeric columns -> one float32 vector."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from raypipe.ingest.common import DecodeError


@lru_cache(maxsize=8)
def _table(path: str):
    import pandas as pd

    df = pd.read_csv(path)
    if "patient_id" not in df.columns:
        raise DecodeError("BadTable", f"{path}: no patient_id column")
    return df.set_index(df["patient_id"].astype(str))


def read_row(path: str, patient_id: str) -> tuple[np.ndarray, list[str]]:
    """The numeric columns of ``patient_id``'s row (NaN -> error: impute upstream or leave the row out)."""
    try:
        df = _table(path)
    except (OSError, ValueError) as err:
        raise DecodeError("BadTable", f"cannot read the table: {err}") from None
    if patient_id not in df.index:
        raise DecodeError("MissingRow", "no row for this patient in the table")
    row = df.loc[[patient_id]].iloc[0].drop(labels=["patient_id"])
    cols = [c for c in row.index if np.issubdtype(type(row[c]), np.number) or isinstance(row[c], (int, float))]
    values = row[cols].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise DecodeError("NonFiniteValues", "missing or non-numeric values in the row")
    return values.astype(np.float32), list(cols)

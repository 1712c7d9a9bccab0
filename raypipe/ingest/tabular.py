"""Tabular modalities: one CSV row per patient with numeric columns -> one float32 vector."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from raypipe.ingest.common import DecodeError
from raypipe.ingest.safety import fail

#: cells read as missing in the value columns (pandas' usual markers); never in patient_id
MISSING_MARKERS = {"", "NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "None", "#N/A", "-NaN", "-nan"}


@lru_cache(maxsize=8)
def _table(path: str, max_bytes: int = 256 * 1024**2):
    """(numeric table indexed by patient_id, its column names); cached per worker process."""
    import os

    import pandas as pd

    try:
        size = os.stat(path).st_size
        if size > max_bytes:
            raise fail("ResourceLimit", "ingest.limits.max_table_bytes", file_bytes=size, limit=max_bytes)
        columns = list(pd.read_csv(path, nrows=0).columns)
        # ids as written: "NA", "null" or "" are ids in patient_id, missing values elsewhere
        df = pd.read_csv(path, dtype={"patient_id": str}, keep_default_na=False,
                         na_values={c: sorted(MISSING_MARKERS) for c in columns if c != "patient_id"})
    except FileNotFoundError:
        raise fail("FileMissing") from None
    except DecodeError:
        raise
    except Exception as err:  # noqa: BLE001 - pandas' messages may quote the file's cells
        raise fail("BadTable", f"the CSV cannot be parsed ({type(err).__name__})") from None
    if "patient_id" not in df.columns:
        raise fail("BadTable", "no patient_id column")
    if df["patient_id"].duplicated().any():
        raise fail("BadTable", "patient_id is not unique: one row per patient expected")
    numeric = df.drop(columns=["patient_id"]).select_dtypes("number")
    if numeric.shape[1] == 0:
        raise fail("BadTable", "no numeric columns")
    # the column set is decided once per table, so every patient's vector has the same layout
    return numeric.set_index(df["patient_id"]), list(numeric.columns)


def read_row(path: str, patient_id: str, max_bytes: int = 256 * 1024**2) -> tuple[np.ndarray, list[str]]:
    """The numeric columns of ``patient_id``'s row (NaN, inf or beyond float32 -> ``NonFinite``: impute
    upstream or drop the row); ``patient_id`` is matched as written (``"NA"`` is an id)."""
    table, cols = _table(path, max_bytes)
    if patient_id not in table.index:
        raise fail("MissingRow")
    values = table.loc[patient_id].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all() or not np.isfinite(values.astype(np.float32)).all():
        bad = int((~np.isfinite(values.astype(np.float32))).sum())
        raise fail("NonFinite", "missing, non-numeric or out-of-float32-range values in the patient's row",
                   columns=bad)
    return values.astype(np.float32), cols

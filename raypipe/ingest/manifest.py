"""What to ingest: the manifest (or folder convention) and the labels, as plain tables.

``manifest.csv``: ``patient_id, modality, format, path`` (path relative to the cohort
root; one row per file). Without a manifest the folder convention applies::

    <root>/patients/<patient_id>/<modality>/<files>      e.g. patients/P1/ct/*.dcm
    <root>/patients/<patient_id>/<modality>.<ext>        e.g. patients/P1/report.txt

with the format taken from the extension. ``labels.csv``: ``patient_id, label`` (or the
configured label columns) plus group columns; an ``age`` column yields ``age_band``.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

EXTENSION_FORMATS = {".dcm": "dicom", ".dicom": "dicom", ".nii": "nifti", ".nii.gz": "nifti", ".hdr": "nifti",
                     ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "geotiff", ".tiff": "geotiff",
                     ".csv": "csv", ".txt": "text"}


#: cells read as missing in labels.csv's label and group columns (pandas' usual markers); never in patient_id
_NA_MARKERS = ("", "NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "None", "#N/A", "-NaN", "-nan")


def guess_format(path: str) -> str | None:
    lower = path.lower()
    for ext in sorted(EXTENSION_FORMATS, key=len, reverse=True):
        if lower.endswith(ext):
            return EXTENSION_FORMATS[ext]
    return None


def read_manifest(root: str) -> pd.DataFrame:
    """The manifest as a DataFrame (patient_id, modality, format, path), sorted; folder convention if absent."""
    path = os.path.join(root, "manifest.csv")
    if os.path.isfile(path):
        # every cell as written: an id "NA", "null" or "" stays that string (never a missing value)
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = {"patient_id", "modality", "path"} - set(df.columns)
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)} (need patient_id, modality, format, path)")
        if "format" not in df.columns:
            df["format"] = ""
        df["format"] = [f.strip() or (guess_format(p) or "") for f, p in zip(df["format"], df["path"])]
        df["row"] = range(2, len(df) + 2)  # the line of the file (the header is line 1), for messages
    else:
        base = os.path.join(root, "patients")
        if not os.path.isdir(base):
            raise FileNotFoundError(f"{root}: no manifest.csv and no patients/ folder; see docs/ingest.md for the layout")
        rows = []
        for pid in sorted(os.listdir(base)):
            pdir = os.path.join(base, pid)
            if not os.path.isdir(pdir):
                continue
            for entry in sorted(os.listdir(pdir)):
                full = os.path.join(pdir, entry)
                if os.path.isdir(full):
                    for f in sorted(os.listdir(full)):
                        rows.append((pid, entry, guess_format(f), os.path.relpath(os.path.join(full, f), root)))
                else:
                    name = entry.split(".")[0]
                    rows.append((pid, name, guess_format(entry), os.path.relpath(full, root)))
        df = pd.DataFrame(rows, columns=["patient_id", "modality", "format", "path"])
        df["format"] = df["format"].fillna("")
        df["row"] = 0  # no manifest file: no line to point at
    return prepare_manifest(df)


def prepare_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """A manifest table (patient_id, modality, format, path[, row]) made ready for ingest: strings as written,
    a missing format guessed from the extension, duplicates dropped, sorted. ``row`` (the manifest.csv line,
    0 when there is none) is added when absent."""
    df = df.copy()
    for c in ("patient_id", "modality", "path"):
        df[c] = ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in df[c]]
    if "format" not in df.columns:
        df["format"] = ""
    df["format"] = [(str(f).strip() if isinstance(f, str) else "") or (guess_format(p) or "")
                    for f, p in zip(df["format"], df["path"])]
    if "row" not in df.columns:
        df["row"] = 0
    dup = df.duplicated(["patient_id", "modality", "path"])
    if dup.any():
        log.warning("manifest: %d duplicated (patient_id, modality, path) rows ignored", int(dup.sum()))
        df = df[~dup]
    return df.sort_values(["patient_id", "modality", "path"], kind="stable").reset_index(drop=True)


def age_band(age) -> str:
    try:
        a = float(age)
    except (TypeError, ValueError):
        return "unknown"
    if np.isnan(a):
        return "unknown"
    return "<50" if a < 50 else "50-64" if a < 65 else "65-79" if a < 80 else "80+"


def read_labels(root: str, label_columns: list[str], group_columns: list[str]) -> pd.DataFrame | None:
    """labels.csv with the configured label and group columns (age_band derived from age).

    None when the cohort has no labels.csv (an unlabelled cohort, e.g. for inference).
    """
    path = os.path.join(root, "labels.csv")
    if not os.path.isfile(path):
        return None
    header = list(pd.read_csv(path, nrows=0).columns)
    # patient ids as written ("NA" is an id); the other columns keep pandas' missing-value markers
    df = pd.read_csv(path, dtype={"patient_id": str}, keep_default_na=False,
                     na_values={c: list(_NA_MARKERS) for c in header if c != "patient_id"})
    if "age_band" in group_columns and "age_band" not in df.columns and "age" in df.columns:
        df["age_band"] = df["age"].map(age_band)
    missing = [c for c in ["patient_id", *label_columns] if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    for g in group_columns:
        if g not in df.columns:
            df[g] = "unknown"
        df[g] = df[g].astype(str)
    if df["patient_id"].duplicated().any():
        raise ValueError(f"{path}: duplicated patient_id rows")
    empty = df["patient_id"].str.strip() == ""
    if empty.any():
        raise ValueError(f"{path}: {int(empty.sum())} rows with an empty patient_id (lines "
                         f"{', '.join(str(i + 2) for i in list(df.index[empty])[:5])}): fill them in or remove them")
    for c in label_columns:
        if not pd.api.types.is_numeric_dtype(df[c]):
            values = pd.to_numeric(df[c], errors="coerce")
            bad = values.isna() & df[c].notna()
            if bad.any():
                raise ValueError(f"{path}: label column {c!r} has {int(bad.sum())} non-numeric values (lines "
                                 f"{', '.join(str(i + 2) for i in list(df.index[bad])[:5])}): labels must be numbers "
                                 "(0/1 for a binary task, class indices for multiclass)")
            df[c] = values
    return df[["patient_id", *label_columns, *group_columns]]

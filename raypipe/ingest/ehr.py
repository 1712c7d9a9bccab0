"""EHR time series -> fixed (T, 76) tensors, the MIMIC-III benchmark layout (docs/ingest.md).

Input: long format (``stay_id, charttime, variable, value``) or the benchmark's wide
per-stay CSV (``Hours`` plus one column per variable). Steps of ``step_hours`` over the
first ``window_hours`` (2 h x 24 by default); the last value in a step wins, an empty
step carries the previous value forward, a never-observed channel takes the normal
value. 12 continuous channels + one-hot categoricals (2 + 8 + 12 + 13 + 12) + 17
observation masks = 76 features. Continuous channels are standardised with statistics
fitted on the training split only (:func:`fit_normalisation`), applied unchanged elsewhere.

A continuous value outside its physiological limits (:data:`OUTLIER_RANGES`, the
benchmark's outlier bounds, configurable) is dropped as an outlier and counted
(``meta.outliers``), so one ``1e39`` cannot turn a channel's mean into inf and every
patient's records into NaN; every tensor is checked finite before it leaves.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from raypipe.ingest.common import check_finite
from raypipe.ingest.safety import fail

#: (variable, normal value) in the benchmark's (alphabetical) channel order
VARIABLES: list[tuple[str, Any]] = [
    ("Capillary refill rate", "0.0"),
    ("Diastolic blood pressure", 59.0),
    ("Fraction inspired oxygen", 0.21),
    ("Glascow coma scale eye opening", "4 Spontaneously"),
    ("Glascow coma scale motor response", "6 Obeys Commands"),
    ("Glascow coma scale total", "15"),
    ("Glascow coma scale verbal response", "5 Oriented"),
    ("Glucose", 128.0),
    ("Heart Rate", 86.0),
    ("Height", 170.0),
    ("Mean blood pressure", 77.0),
    ("Oxygen saturation", 98.0),
    ("Respiratory rate", 19.0),
    ("Systolic blood pressure", 118.0),
    ("Temperature", 36.6),
    ("Weight", 81.0),
    ("pH", 7.4),
]

#: one-hot columns of each categorical variable (the benchmark's value lists)
CATEGORIES: dict[str, list[str]] = {
    "Capillary refill rate": ["0.0", "1.0"],
    "Glascow coma scale eye opening": ["To Pain", "3 To speech", "1 No Response", "4 Spontaneously", "None",
                                       "To Speech", "Spontaneously", "2 To pain"],
    "Glascow coma scale motor response": ["1 No Response", "3 Abnorm flexion", "Abnormal extension", "No response",
                                          "4 Flex-withdraws", "Localizes Pain", "Flex-withdraws", "Obeys Commands",
                                          "Abnormal Flexion", "6 Obeys Commands", "5 Localizes Pain",
                                          "2 Abnorm extensn"],
    "Glascow coma scale total": ["11", "10", "13", "12", "15", "14", "3", "5", "4", "7", "6", "9", "8"],
    "Glascow coma scale verbal response": ["1 No Response", "No Response", "Confused", "Inappropriate Words",
                                           "Oriented", "No Response-ETT", "5 Oriented", "Incomprehensible sounds",
                                           "1.0 ET/Trach", "4 Confused", "2 Incomp sounds", "3 Inapprop words"],
}

#: score of a GCS text without a numeric prefix (used to map spellings the list lacks)
GCS_SCORES: dict[str, dict[str, int]] = {
    "Glascow coma scale eye opening": {"no response": 1, "none": 1, "to pain": 2, "to speech": 3,
                                       "spontaneously": 4},
    "Glascow coma scale motor response": {"no response": 1, "abnormal extension": 2, "abnorm extensn": 2,
                                          "abnormal flexion": 3, "abnorm flexion": 3, "flex-withdraws": 4,
                                          "localizes pain": 5, "obeys commands": 6},
    "Glascow coma scale verbal response": {"no response": 1, "no response-ett": 1, "et/trach": 1,
                                           "incomprehensible sounds": 2, "incomp sounds": 2,
                                           "inappropriate words": 3, "inapprop words": 3, "confused": 4,
                                           "oriented": 5},
}

CONTINUOUS = [v for v, normal in VARIABLES if v not in CATEGORIES]

#: physiological limits [low, high] of the continuous variables: the MIMIC-III benchmark's outlier
#: bounds (mimic3-benchmarks resources/variable_ranges.csv, OUTLIER LOW / OUTLIER HIGH); a value
#: outside is dropped and counted. Override per variable with ``ingest.ehr.outlier_ranges``.
OUTLIER_RANGES: dict[str, tuple[float, float]] = {
    "Diastolic blood pressure": (0.0, 375.0),
    "Fraction inspired oxygen": (0.2, 1.1),
    "Glucose": (0.0, 2200.0),
    "Heart Rate": (0.0, 390.0),
    "Height": (0.0, 275.0),
    "Mean blood pressure": (0.0, 375.0),
    "Oxygen saturation": (0.0, 150.0),
    "Respiratory rate": (0.0, 330.0),
    "Systolic blood pressure": (0.0, 375.0),
    "Temperature": (14.2, 47.0),
    "Weight": (0.0, 250.0),
    "pH": (6.3, 10.0),
}


def outlier_ranges(overrides: dict | None = None) -> dict[str, tuple[float, float]]:
    """:data:`OUTLIER_RANGES` with ``overrides`` (``ingest.ehr.outlier_ranges``) applied."""
    out = dict(OUTLIER_RANGES)
    for var, bounds in (overrides or {}).items():
        if var not in out:
            raise ValueError(f"ingest.ehr.outlier_ranges: {var!r} is not a continuous variable ({sorted(out)})")
        out[var] = (float(bounds[0]), float(bounds[1]))
    return out
N_FEATURES = sum(len(CATEGORIES[v]) if v in CATEGORIES else 1 for v, _ in VARIABLES) + len(VARIABLES)
assert N_FEATURES == 76


def _layout() -> tuple[dict[str, int], list[int]]:
    start, col = {}, 0
    cont_cols = []
    for v, _ in VARIABLES:
        start[v] = col
        if v in CATEGORIES:
            col += len(CATEGORIES[v])
        else:
            cont_cols.append(col)
            col += 1
    return start, cont_cols


START, CONTINUOUS_COLUMNS = _layout()
MASK_OFFSET = N_FEATURES - len(VARIABLES)


def category_index(variable: str, value: str) -> int | None:
    """Column of ``value`` within ``variable``'s one-hot block (exact, case-insensitive, or by GCS score)."""
    cats = CATEGORIES[variable]
    text = str(value).strip()
    lower = [c.lower() for c in cats]
    if text.lower() in lower:
        return lower.index(text.lower())
    try:  # numeric spellings such as "15.0" or "1"
        num = float(text)
        if math.isfinite(num):
            for cand in (f"{num:.1f}", str(int(num))):
                if cand in cats:
                    return cats.index(cand)
    except (ValueError, OverflowError):
        pass
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(.*)$", text)
    score = int(float(m.group(1))) if m and m.group(2) else None
    if score is None:
        score = GCS_SCORES.get(variable, {}).get(text.lower())
    if score is None:
        return None
    for i, c in enumerate(cats):  # the listed spelling carrying this score
        cm = re.match(r"^(\d+)", c)
        if cm and int(cm.group(1)) == score:
            return i
    return None


def read_events(path: str, max_bytes: int = 256 * 1024**2):
    """Events of an EHR CSV as a DataFrame (stay, hours, variable, value), time-sorted within each stay.

    ``hours`` counts from the stay's first event (long format) or is the wide file's ``Hours``.
    A long file may hold several stays (``stay_id``); without the column it is one stay. Stay ids
    are read as written (``"NA"`` is an id). Files above ``max_bytes`` are ``ResourceLimit``.
    """
    import os

    import pandas as pd

    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise fail("FileMissing") from None
    except OSError as err:
        raise fail("Unreadable", type(err).__name__) from None
    if size > max_bytes:
        raise fail("ResourceLimit", "ingest.limits.max_table_bytes", file_bytes=size, limit=max_bytes)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        df = df.replace({"": None})  # an empty cell is no event; every other text is kept as written
    except Exception as err:  # noqa: BLE001 - pandas' messages may quote the file's cells
        raise fail("BadCSV", f"the CSV cannot be parsed ({type(err).__name__})") from None
    if {"charttime", "variable", "value"} <= set(df.columns):
        stay = df["stay_id"].fillna("") if "stay_id" in df.columns else pd.Series([""] * len(df), index=df.index)
        t = pd.to_datetime(df["charttime"], errors="coerce")
        if t.isna().all():
            raise fail("BadCSV", "no parseable charttime")
        first = t.groupby(stay).transform("min")
        hours = (t - first).dt.total_seconds() / 3600.0
        ev = pd.DataFrame({"stay": stay, "start": first, "hours": hours, "variable": df["variable"],
                           "value": df["value"]}).dropna()
    elif "Hours" in df.columns:
        long = df.melt(id_vars=["Hours"], var_name="variable", value_name="value").dropna()
        hours = pd.to_numeric(long["Hours"], errors="coerce")
        ev = pd.DataFrame({"stay": "", "start": pd.Timestamp(0), "hours": hours, "variable": long["variable"],
                           "value": long["value"]}).dropna()
    else:
        raise fail("BadCSV", "neither the long nor the wide column layout")
    known = {v for v, _ in VARIABLES}
    ev = ev[ev["variable"].str.strip().isin(known)].assign(variable=lambda d: d["variable"].str.strip())
    if ev.empty:
        raise fail("NoEvents")
    return ev.sort_values(["start", "stay", "hours"], kind="stable")


def discretise_events(ev, step_hours: float = 2.0, window_hours: float = 48.0,
                      ranges: dict[str, tuple[float, float]] | None = None) -> tuple[np.ndarray, dict]:
    """Unstandardised (T, 76) float32 tensor of one stay's events and meta (unknown value and outlier counts).

    ``ranges``: physiological limits per continuous variable (default :data:`OUTLIER_RANGES`).
    """
    ranges = OUTLIER_RANGES if ranges is None else ranges
    T = int(round(window_hours / step_hours))
    ev = ev[(ev["hours"] >= 0) & (ev["hours"] < window_hours)]
    raw: dict[str, list] = {v: [None] * T for v, _ in VARIABLES}
    observed = np.zeros((T, len(VARIABLES)), np.float32)
    index = {v: i for i, (v, _) in enumerate(VARIABLES)}
    unknown = outliers = 0
    for hours, var, value in zip(ev["hours"].to_numpy(), ev["variable"].to_numpy(), ev["value"].to_numpy()):
        step = min(int(hours // step_hours), T - 1)
        if var in CATEGORIES:
            if category_index(var, value) is None:
                unknown += 1
                continue
        else:
            try:
                value = float(value)
            except ValueError:
                unknown += 1
                continue
            if not np.isfinite(value):
                unknown += 1
                continue
            lo, hi = ranges.get(var, (-np.inf, np.inf))
            if not lo <= value <= hi:
                outliers += 1
                continue
        raw[var][step] = value  # events are time-sorted: the last one in the step wins
        observed[step, index[var]] = 1.0
    x = np.zeros((T, N_FEATURES), np.float32)
    for var, normal in VARIABLES:
        prev = None
        for t in range(T):
            val = raw[var][t] if raw[var][t] is not None else prev
            prev = val
            val = normal if val is None else val
            if var in CATEGORIES:
                x[t, START[var] + category_index(var, val)] = 1.0
            else:
                x[t, START[var]] = float(val)
    x[:, MASK_OFFSET:] = observed
    check_finite(x, "record")
    return x, {"steps": T, "step_hours": step_hours, "window_hours": window_hours, "unknown_values": unknown,
               "outliers": outliers, "observed_fraction": float(observed.mean())}


def discretise_stays(path: str, step_hours: float = 2.0, window_hours: float = 48.0,
                     ranges: dict[str, tuple[float, float]] | None = None, max_bytes: int = 256 * 1024**2
                     ) -> list[tuple[str, np.ndarray, dict]]:
    """[(stay id, (T, 76) tensor, meta)] for every stay of the file, earliest stay first.

    The stay id is returned for keyed hashing only; it never goes into ``meta``.
    """
    ev = read_events(path, max_bytes)
    out = []
    for (_, stay), group in ev.groupby(["start", "stay"], sort=True):  # chronological, then by id
        x, meta = discretise_events(group, step_hours, window_hours, ranges)
        out.append((str(stay), x, meta))
    return out


def discretise(path: str, step_hours: float = 2.0, window_hours: float = 48.0) -> tuple[np.ndarray, dict]:
    """The (T, 76) tensor of a single-stay file (the first stay when there are several)."""
    _, x, meta = discretise_stays(path, step_hours, window_hours)[0]
    return x, meta


def fit_normalisation(sums: np.ndarray, sumsq: np.ndarray, count: float) -> dict:
    """Mean/std of the continuous channels from per-channel sums over training stays' steps."""
    mean = sums / max(count, 1.0)
    var = np.maximum(sumsq / max(count, 1.0) - mean**2, 0.0)
    std = np.sqrt(var)
    std[std < 1e-6] = 1.0
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ValueError("EHR statistics are not finite: a value escaped the physiological limits "
                         "(ingest.ehr.outlier_ranges); this is a bug, please report it")
    return {"columns": CONTINUOUS_COLUMNS, "mean": mean.tolist(), "std": std.tolist(), "count": float(count)}


def standardise(x: np.ndarray, stats: dict) -> np.ndarray:
    """Apply training-split statistics to the continuous channels (one-hots and masks unchanged)."""
    out = x.copy()
    cols = stats["columns"]
    out[..., cols] = (out[..., cols] - np.asarray(stats["mean"], np.float32)) / np.asarray(stats["std"], np.float32)
    return out

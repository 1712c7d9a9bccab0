"""Clinical reports: whitespace cleaning (de-identification placeholders kept), word truncation."""

from __future__ import annotations

import re

from raypipe.ingest.common import DecodeError


def clean_report(text: str, max_words: int = 150) -> str:
    """Collapse whitespace and keep the first ``max_words`` words (OmniFuse truncates to 150)."""
    words = re.sub(r"\s+", " ", text).strip().split(" ")
    return " ".join(w for w in words[:max_words] if w)


def read_report(path: str, max_words: int = 150) -> str:
    """Cleaned report text; an empty report is a missing modality (``EmptyReport``), not an empty string."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise DecodeError("Unreadable", str(err)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    cleaned = clean_report(text, max_words)
    if not cleaned:
        raise DecodeError("EmptyReport", "the report is empty: counted as a missing modality")
    return cleaned

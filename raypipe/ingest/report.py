"""Clinical reports: whitespace cleaning (de-identification placeholders kept), word truncation."""

from __future__ import annotations

import re

from raypipe.ingest.common import DecodeError

#: a de-identification placeholder such as ``[**Doctor Last Name**]`` counts as one word and is kept verbatim
_TOKEN = re.compile(r"\[\*\*.*?\*\*\]|\S+")


def clean_report(text: str, max_words: int = 150) -> str:
    """Collapse whitespace and keep the first ``max_words`` words (OmniFuse truncates to 150).

    Placeholders ``[** ... **]`` are single words (never cut in half) and keep their inner text.
    """
    text = text.replace("\x00", " ")
    words = []
    for m in _TOKEN.finditer(text):
        w = m.group(0)
        if w.startswith("[**"):
            w = re.sub(r"\s+", " ", w)
        words.append(w)
        if len(words) >= max_words:
            break
    return " ".join(words)


def read_report(path: str, max_words: int = 150) -> str:
    """Cleaned report text; an empty report is a missing modality (``EmptyReport``), not an empty string."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise DecodeError("Unreadable", f"{type(err).__name__}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    cleaned = clean_report(text, max_words)
    if not cleaned:
        raise DecodeError("EmptyReport", "the report is empty: counted as a missing modality")
    return cleaned

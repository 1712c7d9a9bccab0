"""Clinical reports: whitespace cleaning (de-identification placeholders kept), word truncation."""

from __future__ import annotations

import re

from raypipe.ingest import safety
from raypipe.ingest.safety import fail

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


def read_report(path: str, max_words: int = 150, max_bytes: int = 1024**2) -> str:
    """Cleaned report text; an empty report is a missing modality (``EmptyReport``), not an empty string.

    At most ``max_bytes`` are read (``ingest.limits.max_report_bytes``; the words kept come first
    anyway); a file that is not text (a NUL byte or many control characters: a DICOM file, an image,
    an archive listed as a report) is ``UnsupportedFormat``, never text.
    """
    with safety.os_error_classes():
        raw, truncated = safety.read_capped(path, max_bytes)
    cleaned = clean_report(safety.decode_text(raw, truncated), max_words)
    if not cleaned:
        raise fail("EmptyReport")
    return cleaned

"""Pieces every image decoder shares: slice selection, windowing, antialiased resize, errors."""

from __future__ import annotations

import numpy as np


class DecodeError(Exception):
    """A file that cannot be turned into records; becomes an ``errors`` row, never a crash.

    ``error_class`` is a short stable name (e.g. ``UnsupportedTransferSyntax``), the message says
    what is wrong and what to do.
    """

    def __init__(self, error_class: str, message: str):
        super().__init__(message)
        self.error_class = error_class


def select_indices(n: int, policy: str = "even", count: int = 16, k: int = 2) -> list[int]:
    """Indices of the slices to keep out of ``n`` ordered slices.

    all: every slice; every_k: 0, k, 2k, ...; central: the ``count`` middle slices;
    even: ``count`` evenly spaced slices including both ends (all when n <= count).
    """
    if n <= 0:
        return []
    if policy == "all":
        return list(range(n))
    if policy == "every_k":
        return list(range(0, n, max(1, k)))
    if policy == "central":
        count = min(count, n)
        start = (n - count) // 2
        return list(range(start, start + count))
    if policy == "even":
        if n <= count:
            return list(range(n))
        return sorted({int(round(i)) for i in np.linspace(0, n - 1, count)})
    raise ValueError(f"unknown slice selection policy {policy!r} (all, every_k, central, even)")


def apply_window(values: np.ndarray, window: tuple[float, float] | None, inplace: bool = False) -> np.ndarray:
    """Map ``[lo, hi]`` to ``[0, 1]`` (clipped); without a window, min-max scale the array (per slice).

    ``inplace``: reuse ``values``' memory when it is float32 already (the caller no longer needs it).
    """
    v = values.astype(np.float32, copy=not inplace)
    if window is None:
        lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    else:
        lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        return np.zeros_like(v, dtype=np.float32)
    v -= np.float32(lo)
    v *= np.float32(1.0 / (hi - lo))
    return np.clip(v, 0.0, 1.0, out=v)


def resize_plane(plane: np.ndarray, size: int) -> np.ndarray:
    """Antialiased (Lanczos) resize of one 2-D float plane to ``size x size``."""
    from PIL import Image

    if plane.shape == (size, size):
        return plane.astype(np.float32, copy=False)
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)


def resize_image(chw: np.ndarray, size: int) -> np.ndarray:
    """Resize every channel of a (C, H, W) array; output values clipped back to [0, 1]."""
    return np.clip(np.stack([resize_plane(c, size) for c in chw]), 0.0, 1.0).astype(np.float32)


def check_finite(values: np.ndarray, what: str) -> None:
    """``EmptyImage`` for an empty array, ``NonFinite`` (with the count) when any value is NaN or infinite.

    ``what`` is a fixed word from raypipe's code (``slice``, ``volume``, ``record``), never file content.
    """
    from raypipe.ingest.safety import fail

    if values.size == 0:
        raise fail("EmptyImage", what)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise fail("NonFinite", what, non_finite_values=bad, values=int(values.size))

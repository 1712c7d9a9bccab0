"""2-D images (PNG/JPEG, e.g. chest X-rays) with Pillow: grayscale or RGB, antialiased resize."""

from __future__ import annotations

from typing import Any

import numpy as np

from raypipe.ingest.common import DecodeError, resize_image


def decode_image(path: str, size: int, channels: str = "gray") -> tuple[np.ndarray, dict[str, Any]]:
    """float32 (C, size, size) in [0, 1]; C = 1 (gray) or 3 (rgb)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            opened.load()
            im = ImageOps.exif_transpose(opened)  # phones and some viewers store the rotation in EXIF
            mode = im.mode
            if mode.startswith("I;16") or mode == "I":
                arr = np.asarray(im, dtype=np.float32)
                arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1.0)
                chw = arr[None] if channels == "gray" else np.repeat(arr[None], 3, axis=0)
            else:
                conv = im.convert("L" if channels == "gray" else "RGB")
                arr = np.asarray(conv, dtype=np.float32) / 255.0
                chw = arr[None] if arr.ndim == 2 else np.transpose(arr, (2, 0, 1))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DecodeError("NotAnImage", f"cannot read as an image: {type(err).__name__}: {err}") from None
    if chw.size == 0:
        raise DecodeError("EmptyImage", "image without pixels")
    return resize_image(chw, size), {"original_mode": mode, "original_shape": list(chw.shape[1:]),
                                     "channels": channels}

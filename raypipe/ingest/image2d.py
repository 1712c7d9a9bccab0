"""2-D images (PNG/JPEG, e.g. chest X-rays) with Pillow: grayscale or RGB, antialiased resize."""

from __future__ import annotations

from typing import Any

import numpy as np

from raypipe.ingest import safety
from raypipe.ingest.common import DecodeError, resize_image
from raypipe.ingest.safety import DEFAULT_LIMITS, Limits, fail


def decode_image(path: str, size: int, channels: str = "gray",
                 limits: Limits | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """float32 (C, size, size) in [0, 1]; C = 1 (gray) or 3 (rgb).

    The declared width x height x bands is checked against ``ingest.limits.max_voxels`` before the
    pixels are decoded (Image.open reads the header only).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    limits = limits or DEFAULT_LIMITS
    with safety.os_error_classes():
        safety.check_file_size(path, limits.max_file_bytes)
    try:
        with Image.open(path) as opened:
            safety.check_voxels((opened.size[0], opened.size[1], len(opened.getbands())), limits,
                                "declared width x height x bands")
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
    except DecodeError:
        raise
    except Image.DecompressionBombError:
        raise fail("ResourceLimit", "Pillow's decompression-bomb limit") from None
    except MemoryError:
        raise fail("ResourceLimit", "decoding the image ran out of memory") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, TypeError) as err:
        raise fail("CorruptHeader", f"not a readable image ({type(err).__name__})") from None
    if chw.size == 0:
        raise fail("EmptyImage")
    return resize_image(chw, size), {"original_mode": mode, "original_shape": list(chw.shape[1:]),
                                     "channels": channels}

"""NIfTI volumes (nibabel): closest-canonical (RAS) orientation, scaling, axial slices.

Only the header is read before the checks: the declared shape of the one 3-D frame that will
be used is checked against ``ingest.limits.max_voxels`` before any voxel is decompressed, and
a 4-D image reads only the configured frame (nibabel's array proxy slices the file, so a
``.nii.gz`` is inflated up to that frame and no further).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raypipe.ingest import safety
from raypipe.ingest.common import DecodeError, apply_window, check_finite, resize_plane, select_indices
from raypipe.ingest.safety import DEFAULT_LIMITS, Limits, fail


def load_volume(path: str, frame: int = 0, limits: Limits | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(Z, Y, X) float32 volume in RAS orientation (axial slices first) and meta."""
    import nibabel as nib

    limits = limits or DEFAULT_LIMITS
    with safety.os_error_classes():
        safety.check_file_size(path, limits.max_file_bytes)
    try:
        img = nib.load(path)  # the header only: the voxels stay behind a lazy array proxy
        shape = tuple(int(d) for d in img.shape)
    except DecodeError:
        raise
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for bad files; their text may quote the file
        raise fail("CorruptHeader", f"not a readable NIfTI/Analyze header ({type(err).__name__})") from None
    if len(shape) < 3:
        raise fail("UnsupportedShape", "no axial axis", shape=shape)
    if len(shape) > 4 and any(d != 1 for d in shape[4:]):
        raise fail("UnsupportedShape", "expected a 3-D or 4-D image", shape=shape)
    safety.check_voxels(shape[:3], limits, "declared volume shape")
    frames = shape[3] if len(shape) >= 4 else 1
    if len(shape) >= 4 and not 0 <= frame < frames:
        raise fail("FrameOutOfRange", frame=frame, frames=frames)
    try:
        if len(shape) >= 4:
            index = (slice(None),) * 3 + (frame,) + (0,) * (len(shape) - 4)
            # the frame alone (scaled by the proxy); the affine carries orientation and voxel size
            img = img.__class__(np.asarray(img.dataobj[index], dtype=np.float32), img.affine)
        canonical = nib.as_closest_canonical(img)
        data = np.asanyarray(canonical.dataobj, dtype=np.float32)  # applies scl_slope/scl_inter
    except DecodeError:
        raise
    except MemoryError:
        raise fail("ResourceLimit", "loading the voxels ran out of memory") from None
    except Exception as err:  # noqa: BLE001 - truncated or damaged voxel data
        raise fail("CorruptPixelData", f"voxel data cannot be read ({type(err).__name__})") from None
    if data.ndim != 3:
        raise fail("UnsupportedShape", "expected a 3-D volume", shape=tuple(data.shape))
    check_finite(data, "volume")
    zooms = [float(z) for z in canonical.header.get_zooms()[:3]]
    vol = np.transpose(data, (2, 1, 0))  # (x, y, z) RAS -> (z, y, x)
    meta = {"orientation": "RAS", "voxel_size_mm": zooms, "original_shape": list(data.shape)}
    if frames > 1:
        meta["frame"], meta["frames"] = int(frame), int(frames)
    return vol, meta


def decode_volume(path: str, size: int, window, policy: str = "even", count: int = 16, k: int = 2,
                  frame: int = 0, limits: Limits | None = None) -> list[tuple[int, np.ndarray, dict[str, Any]]]:
    """[(position, float32 (1, size, size), meta)] for the selected axial slices, inferior to superior."""
    vol, meta = load_volume(path, frame, limits)
    meta["window"] = list(window) if window is not None else None
    meta["normalisation"] = "window" if window is not None else "slice_minmax"  # min-max of each slice
    out = []
    for pos, z in enumerate(select_indices(vol.shape[0], policy, count, k)):
        img = resize_plane(apply_window(vol[z], window), size)
        out.append((pos, np.clip(img, 0, 1)[None].astype(np.float32), {**meta, "slice_index": int(z)}))
    return out

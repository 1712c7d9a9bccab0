"""NIfTI volumes (nibabel): closest-canonical (RAS) orientation, scaling, axial slices."""

from __future__ import annotations

from typing import Any

import numpy as np

from raypipe.ingest.common import DecodeError, apply_window, check_finite, resize_plane, select_indices


def load_volume(path: str, frame: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """(Z, Y, X) float32 volume in RAS orientation (axial slices first) and meta."""
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises many types for bad files
        raise DecodeError("NotNifti", f"cannot read as NIfTI/Analyze: {type(err).__name__}: {err}") from None
    if len(img.shape) < 3:
        raise DecodeError("NotAVolume", f"image of shape {img.shape} has no axial axis")
    try:
        canonical = nib.as_closest_canonical(img)
        data = np.asanyarray(canonical.dataobj, dtype=np.float32)  # applies scl_slope/scl_inter
    except Exception as err:
        raise DecodeError("CorruptNifti", f"cannot load voxel data: {type(err).__name__}: {err}") from None
    if data.ndim == 4:
        if not 0 <= frame < data.shape[3]:
            raise DecodeError("FrameOutOfRange", f"4-D volume has {data.shape[3]} frames, asked for frame {frame}")
        data = data[..., frame]
    elif data.ndim > 4:
        raise DecodeError("UnsupportedShape", f"{data.ndim}-D image {data.shape} (expected 3-D or 4-D)")
    check_finite(data, "volume")
    zooms = [float(z) for z in canonical.header.get_zooms()[:3]]
    vol = np.transpose(data, (2, 1, 0))  # (x, y, z) RAS -> (z, y, x)
    meta = {"orientation": "RAS", "voxel_size_mm": zooms, "original_shape": list(data.shape)}
    return vol, meta


def decode_volume(path: str, size: int, window, policy: str = "even", count: int = 16, k: int = 2,
                  frame: int = 0) -> list[tuple[int, np.ndarray, dict[str, Any]]]:
    """[(position, float32 (1, size, size), meta)] for the selected axial slices, inferior to superior."""
    vol, meta = load_volume(path, frame)
    meta["window"] = list(window) if window is not None else None
    meta["normalisation"] = "window" if window is not None else "slice_minmax"  # min-max of each slice
    out = []
    for pos, z in enumerate(select_indices(vol.shape[0], policy, count, k)):
        img = resize_plane(apply_window(vol[z], window), size)
        out.append((pos, np.clip(img, 0, 1)[None].astype(np.float32), {**meta, "slice_index": int(z)}))
    return out

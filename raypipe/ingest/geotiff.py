"""Satellite GeoTIFF scenes (tifffile): band selection, nodata masking, per-band percentile
normalisation, tiling into model-sized patches with each patch's geotransform.

All selected bands are kept (C = number of bands); mapping more than 3 bands onto a
3-channel model is the embedder's documented job, never a silent truncation here.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from raypipe.ingest.common import DecodeError


def _band_names(page, n: int) -> list[str]:
    tag = page.tags.get(42112)  # GDAL_METADATA
    names = [f"band{i + 1}" for i in range(n)]
    if tag is not None:
        for sample, name in re.findall(r'<Item name="DESCRIPTION" sample="(\d+)"[^>]*>([^<]*)</Item>', str(tag.value)):
            if int(sample) < n:
                names[int(sample)] = name
    return names


def read_scene(path: str) -> tuple[np.ndarray, list[str], float | None, tuple[float, ...] | None]:
    """(bands (B, H, W) float32, band names, nodata value, geotransform (x0, dx, 0, y0, 0, -dy))."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            data = tif.series[0].asarray()
            nodata_tag = page.tags.get(42113)
            nodata = float(str(nodata_tag.value).strip()) if nodata_tag is not None else None
            geo = None
            scale, tie = page.tags.get(33550), page.tags.get(33922)
            if scale is not None and tie is not None:
                sx, sy = float(scale.value[0]), float(scale.value[1])
                i, j, _, x, y, _ = [float(v) for v in tie.value[:6]]
                geo = (x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy)
            planar = page.planarconfig == 2 or (data.ndim == 3 and data.shape[0] < data.shape[-1])
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as err:
        raise DecodeError("NotGeoTIFF", f"cannot read as TIFF: {err}") from None
    if data.ndim == 2:
        data = data[None]
    elif data.ndim == 3 and not planar:
        data = np.transpose(data, (2, 0, 1))  # (H, W, B) -> (B, H, W)
    if data.ndim != 3:
        raise DecodeError("UnsupportedShape", f"TIFF of shape {data.shape}")
    return data.astype(np.float32), _band_names(page, data.shape[0]), nodata, geo


def select_bands(data: np.ndarray, names: list[str], bands: Sequence[int | str] | None):
    if bands is None:
        return data, names
    idx = []
    for b in bands:
        if isinstance(b, str):
            if b not in names:
                raise DecodeError("UnknownBand", f"band {b!r} not in the scene's bands {names}")
            idx.append(names.index(b))
        else:
            if not 0 <= int(b) < len(names):
                raise DecodeError("UnknownBand", f"band index {b} out of range 0..{len(names) - 1}")
            idx.append(int(b))
    return data[idx], [names[i] for i in idx]


def normalise(data: np.ndarray, valid: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Per-band [p_lo, p_hi] -> [0, 1] over valid pixels; nodata pixels become 0."""
    out = np.zeros_like(data, dtype=np.float32)
    for b in range(data.shape[0]):
        vals = data[b][valid]
        if vals.size == 0:
            continue
        lo, hi = np.percentile(vals, percentiles)
        if hi > lo:
            out[b] = np.clip((data[b] - lo) / (hi - lo), 0, 1)
    out[:, ~valid] = 0.0
    return out


def decode_scene(path: str, size: int, bands=None, percentiles=(2.0, 98.0)) -> list[tuple[int, np.ndarray, dict[str, Any]]]:
    """[(patch index, float32 (B, size, size), meta)] tiling the scene into size x size patches.

    Patches that are entirely nodata are skipped; edge patches are padded with nodata (0).
    """
    data, names, nodata, geo = read_scene(path)
    data, names = select_bands(data, names, bands)
    valid = np.isfinite(data).all(axis=0)
    if nodata is not None:
        valid &= ~(data == nodata).all(axis=0)
    if not valid.any():
        raise DecodeError("AllNodata", "every pixel is nodata")
    norm = normalise(np.nan_to_num(data), valid, tuple(percentiles))
    _, h, w = norm.shape
    out = []
    idx = 0
    for r0 in range(0, h, size):
        for c0 in range(0, w, size):
            patch = np.zeros((norm.shape[0], size, size), np.float32)
            pv = np.zeros((size, size), bool)
            sub = norm[:, r0:r0 + size, c0:c0 + size]
            patch[:, :sub.shape[1], :sub.shape[2]] = sub
            pv[:sub.shape[1], :sub.shape[2]] = valid[r0:r0 + size, c0:c0 + size]
            if not pv.any():
                continue
            meta = {"bands": names, "nodata_fraction": float(1 - pv.mean()), "tile": [r0, c0],
                    "percentiles": list(percentiles)}
            if geo is not None:
                x0, dx, _, y0, _, dy = geo
                meta["geotransform"] = [x0 + c0 * dx, dx, 0.0, y0 + r0 * dy, 0.0, dy]
            out.append((idx, patch, meta))
            idx += 1
    return out

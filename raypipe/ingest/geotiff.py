"""Satellite GeoTIFF scenes (tifffile): band selection, nodata masking, per-band percentile
normalisation, tiling into model-sized patches with each patch's geotransform.

All selected bands are kept (C = number of bands); mapping more than 3 bands onto a
3-channel model is the embedder's documented job, never a silent truncation here.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from raypipe.ingest import safety
from raypipe.ingest.common import DecodeError
from raypipe.ingest.safety import DEFAULT_LIMITS, Limits, fail


def _band_names(gdal_metadata: str | None, n: int) -> list[str]:
    names = [f"band{i + 1}" for i in range(n)]
    if gdal_metadata:
        for sample, name in re.findall(r'<Item name="DESCRIPTION" sample="(\d+)"[^>]*>([^<]*)</Item>', gdal_metadata):
            if int(sample) < n and name.strip():
                names[int(sample)] = name.strip()
    return names


def _geotransform(page) -> tuple[float, ...] | None:
    """GDAL-style (x0, dx, rx, y0, ry, dy) from ModelTransformation or ModelPixelScale + ModelTiepoint."""
    matrix = page.tags.get(34264)  # ModelTransformationTag: 4x4 row-major raster -> model
    if matrix is not None and len(matrix.value) >= 8:
        m = [float(v) for v in matrix.value]
        return (m[3], m[0], m[1], m[7], m[4], m[5])
    scale, tie = page.tags.get(33550), page.tags.get(33922)  # ModelPixelScale, ModelTiepoint
    if scale is not None and tie is not None and len(tie.value) >= 6:
        sx, sy = float(scale.value[0]), float(scale.value[1])
        i, j, _, x, y, _ = [float(v) for v in tie.value[:6]]
        return (x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy)
    return None


def read_scene(path: str, limits: Limits | None = None
               ) -> tuple[np.ndarray, list[str], float | None, tuple[float, ...] | None]:
    """(bands (B, H, W) float32, band names, nodata value, geotransform (x0, dx, rx, y0, ry, dy)).

    The series' declared shape is checked against ``ingest.limits.max_voxels`` before it is decoded.
    """
    import tifffile

    limits = limits or DEFAULT_LIMITS
    with safety.os_error_classes():
        safety.check_file_size(path, limits.max_file_bytes)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            page = tif.pages[0]
            safety.check_voxels(tuple(series.shape), limits, "declared TIFF series shape")
            data = series.asarray()
            axes = series.axes
            nodata_tag = page.tags.get(42113)  # GDAL_NODATA
            nodata = None
            if nodata_tag is not None:
                try:
                    nodata = float(str(nodata_tag.value).strip().strip("\x00"))
                except ValueError:
                    nodata = None
            md = page.tags.get(42112)  # GDAL_METADATA (band descriptions)
            gdal_metadata = str(md.value) if md is not None else None
            geo = _geotransform(page)
    except DecodeError:
        raise
    except MemoryError:
        raise fail("ResourceLimit", "decoding the TIFF ran out of memory") from None
    except Exception as err:  # noqa: BLE001 - tifffile raises many types; their text may quote tags
        raise fail("CorruptHeader", f"not a readable TIFF ({type(err).__name__})") from None
    # bring the band axis first, whatever the storage layout (planar 'SYX'/'CYX', contiguous 'YXS')
    if data.ndim == 2:
        data = data[None]
    elif data.ndim == 3:
        band_axis = next((axes.index(a) for a in "SCQI" if a in axes), 0 if axes[-1] == "X" else 2)
        data = np.moveaxis(data, band_axis, 0)
    else:
        raise fail("UnsupportedShape", "expected one 2-D or 3-D scene", shape=tuple(data.shape))
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise fail("UnsupportedDtype", dtype=str(data.dtype))
    return data.astype(np.float32), _band_names(gdal_metadata, data.shape[0]), nodata, geo


def select_bands(data: np.ndarray, names: list[str], bands: Sequence[int | str] | None):
    if bands is None:
        return data, names
    idx = []
    for b in bands:
        if isinstance(b, str):
            if b not in names:  # the configured name may be quoted; the file's band names are not
                raise fail("UnknownBand", band=b, bands_in_scene=len(names))
            idx.append(names.index(b))
        else:
            if not 0 <= int(b) < len(names):
                raise fail("UnknownBand", band_index=int(b), bands_in_scene=len(names))
            idx.append(int(b))
    return data[idx], [names[i] for i in idx]


def normalise(data: np.ndarray, valid: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Per-band [p_lo, p_hi] -> [0, 1] over that band's valid pixels; nodata pixels become 0.

    ``valid`` is (H, W) (one mask for all bands) or (B, H, W) (per band).
    """
    out = np.zeros_like(data, dtype=np.float32)
    masks = np.broadcast_to(valid, data.shape)
    for b in range(data.shape[0]):
        vals = data[b][masks[b]]
        if vals.size == 0:
            continue
        lo, hi = np.percentile(vals, percentiles)
        if hi > lo:
            out[b] = np.clip((data[b] - lo) / (hi - lo), 0, 1)
        out[b][~masks[b]] = 0.0
    return out


def decode_scene(path: str, size: int, bands=None, percentiles=(2.0, 98.0),
                 limits: Limits | None = None) -> list[tuple[int, np.ndarray, dict[str, Any]]]:
    """[(patch index, float32 (B, size, size), meta)] tiling the scene into size x size patches.

    Patches that are entirely nodata are skipped; edge patches are padded with nodata (0).
    """
    data, names, nodata, geo = read_scene(path, limits)
    data, names = select_bands(data, names, bands)
    band_valid = np.isfinite(data)
    if nodata is not None:
        band_valid &= data != nodata
    valid = band_valid.any(axis=0)  # a pixel is data when any band has a value there
    if not valid.any():
        raise fail("AllNodata")
    norm = normalise(np.nan_to_num(data), band_valid, tuple(percentiles))
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
                x0, dx, rx, y0, ry, dy = geo
                meta["geotransform"] = [x0 + c0 * dx + r0 * rx, dx, rx, y0 + c0 * ry + r0 * dy, ry, dy]
            out.append((idx, patch, meta))
            idx += 1
    return out

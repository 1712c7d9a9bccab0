"""DICOM CT/PET decoding (pydicom); no Ray here.

Two steps, so that only the selected slices are ever decoded:

1. :func:`read_header` (no pixel data): series UID, position along the slice
   normal (from ImagePositionPatient and ImageOrientationPatient; fallback
   InstanceNumber), number of frames, transfer syntax. :func:`order_series`
   sorts a series' files anatomically (never by file name).
2. :func:`decode_slice`: pixel data -> modality LUT (RescaleSlope/Intercept:
   CT -> HU; PET -> Bq/ml, then SUVbw when weight, dose, half-life and times are
   present, otherwise flagged) -> window -> antialiased resize -> float32 (1, S, S).

PHI never leaves this module: only geometry, units and flags go into ``meta``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from raypipe.ingest.common import DecodeError, apply_window, check_finite, resize_plane

DICOM_EXTRA_HINT = "install the optional decoders: pip install 'raypipe[dicom]' (pylibjpeg plugins)"


@dataclass
class SliceHeader:
    path: str
    series_uid: str
    modality: str
    position: float | None  # along the slice normal, mm
    instance: int | None
    frames: int
    transfer_syntax: str


def _read(path: str, stop_before_pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as err:
        raise DecodeError("NotDicom", f"not a DICOM file ({err})") from None
    except (EOFError, OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        raise DecodeError("CorruptDicom", f"cannot parse the DICOM file: {type(err).__name__}: {err}") from None


def slice_position(ds) -> float | None:
    """Position of the slice along its normal (mm), or None without geometry tags."""
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    try:
        if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
            return None
        row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
        return float(np.dot(np.asarray(ipp, float), np.cross(row, col)))
    except (TypeError, ValueError):
        return None  # malformed geometry: InstanceNumber order instead


def read_header(path: str) -> SliceHeader:
    """Header facts needed to group and order slices (pixel data not read)."""
    ds = _read(path, stop_before_pixels=True)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        # stop_before_pixels hides PixelData; check the tags that must accompany it instead
        if "Rows" not in ds or "Columns" not in ds:
            raise DecodeError("NoPixelData", f"DICOM object without an image (SOP class {ds.get('SOPClassUID', '?')})")
    try:
        ts_uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts = str(ts_uid or "")
        if ts_uid is not None and not getattr(ts_uid, "is_compressed", True) and "Rows" in ds:
            # uncompressed: the file must hold every pixel byte (catches truncated copies early)
            need = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
                    * int(ds.get("BitsAllocated", 16) or 16) // 8 * int(ds.get("NumberOfFrames", 1) or 1))
            if os.path.getsize(path) < need:
                raise DecodeError("TruncatedFile", f"file has {os.path.getsize(path)} bytes, its pixel data alone "
                                                   f"needs {need}: the file is truncated")
        try:
            inst = int(ds.get("InstanceNumber"))
        except (TypeError, ValueError):
            inst = None  # absent or malformed: ordering falls back to the position / path
        return SliceHeader(path=path, series_uid=str(ds.get("SeriesInstanceUID", "") or path),
                           modality=str(ds.get("Modality", "")), position=slice_position(ds), instance=inst,
                           frames=int(ds.get("NumberOfFrames", 1) or 1), transfer_syntax=ts)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise DecodeError("BadHeader", f"unreadable geometry/identity tags: {type(err).__name__}: {err}") from None


def order_series(headers: list[SliceHeader]) -> list[SliceHeader]:
    """Anatomical order: by position along the normal when every slice has one, else InstanceNumber."""
    if headers and all(h.position is not None for h in headers):
        return sorted(headers, key=lambda h: (h.position, h.instance or 0, h.path))
    return sorted(headers, key=lambda h: (h.instance if h.instance is not None else 0, h.path))


def _seconds(t: str | None) -> float | None:
    if not t:
        return None
    t = str(t).split(".")[0].ljust(6, "0")
    try:
        return int(t[:2]) * 3600 + int(t[2:4]) * 60 + float(t[4:6])
    except ValueError:
        return None


def suv_factor(ds) -> tuple[float | None, str]:
    """Multiplier from Bq/ml to SUVbw, or (None, reason) when the tags do not allow it."""
    if str(ds.get("Units", "")).upper() not in ("BQML", ""):
        return None, f"units {ds.get('Units')} are not Bq/ml"
    weight = ds.get("PatientWeight")
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    if not weight or not seq:
        return None, "PatientWeight or RadiopharmaceuticalInformationSequence missing"
    info = seq[0]
    dose, half = info.get("RadionuclideTotalDose"), info.get("RadionuclideHalfLife")
    start = _seconds(info.get("RadiopharmaceuticalStartTime"))
    acq = _seconds(ds.get("SeriesTime") or ds.get("AcquisitionTime"))
    if not dose or not half or start is None or acq is None:
        return None, "injected dose, half-life or injection/acquisition time missing"
    delay = acq - start
    if delay < 0:
        delay += 24 * 3600  # acquisition after midnight
    decayed = float(dose) * 2.0 ** (-delay / float(half))
    return float(weight) * 1000.0 / decayed, "SUVbw"


def decode_pixels(ds, path: str) -> np.ndarray:
    """Pixel array as stored; a compressed syntax without a decoder is a clear error."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        return ds.pixel_array
    except Exception as err:  # noqa: BLE001 - every decoder failure becomes a quarantine reason
        if ts is not None and getattr(ts, "is_compressed", False):
            raise DecodeError("UnsupportedTransferSyntax",
                              f"compressed transfer syntax {ts} ({getattr(ts, 'name', '?')}) cannot be decoded here: "
                              f"{DICOM_EXTRA_HINT}") from None
        raise DecodeError("CorruptPixelData", f"cannot decode pixel data: {type(err).__name__}: {err}") from None


def physical_values(ds, arr: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Modality LUT (rescale) and, for PET, SUVbw; returns values and PHI-free meta."""
    from pydicom.pixels import apply_modality_lut

    modality = str(ds.get("Modality", ""))
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    meta: dict[str, Any] = {"dicom_modality": modality}
    if modality == "CT":
        meta["units"] = "HU"
    elif modality == "PT":
        factor, why = suv_factor(ds)
        if factor is not None:
            values = values * factor
            meta.update(units="SUVbw", suv=True)
        else:
            meta.update(units=str(ds.get("Units", "unknown")), suv=False, suv_missing=why)
    return values, meta


def decode_slice(path: str, size: int, window: tuple[float, float] | None, frame: int | None = None,
                 expected: set[str] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One slice (or one frame of a multi-frame file) -> float32 (1, size, size) in [0, 1] and meta."""
    ds = _read(path, stop_before_pixels=False)
    modality = str(ds.get("Modality", ""))
    if expected and modality and modality not in expected:
        raise DecodeError("WrongModality", f"DICOM Modality is {modality}, expected {sorted(expected)}")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise DecodeError("UnsupportedPhotometric",
                          f"{ds.get('PhotometricInterpretation')} with {ds.get('SamplesPerPixel')} samples per pixel "
                          "is not a CT/PET slice")
    arr = decode_pixels(ds, path)
    if arr.ndim == 3:  # multi-frame
        arr = arr[frame or 0]
    elif arr.ndim != 2:
        raise DecodeError("UnsupportedShape", f"pixel array of shape {arr.shape}")
    values, meta = physical_values(ds, arr)
    check_finite(values, "slice")
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        meta["pixel_spacing_mm"] = [float(spacing[0]), float(spacing[1])]
    if ds.get("SliceThickness") not in (None, ""):
        meta["slice_thickness_mm"] = float(ds.SliceThickness)
    meta["window"] = list(window) if window is not None else None
    meta["original_shape"] = list(arr.shape)
    img = resize_plane(apply_window(values, window), size)
    return np.clip(img, 0, 1)[None].astype(np.float32), meta


def hounsfield(path: str) -> np.ndarray:
    """Full-resolution HU (or physical values) of a single-frame file, for checks and tests."""
    ds = _read(path, stop_before_pixels=False)
    values, _ = physical_values(ds, decode_pixels(ds, path))
    return values


"""DICOM CT/PET decoding (pydicom); no Ray here.

Two steps, so that only the selected slices are ever decoded:

1. :func:`read_header` (no pixel data): series UID, Modality, position of the
   slice along its normal (ImagePositionPatient . (row x col of
   ImageOrientationPatient)), per-frame positions of multi-frame files
   (PerFrameFunctionalGroupsSequence), InstanceNumber, transfer syntax.
   :func:`slice_refs` turns a series' headers into one reference per slice
   (file, frame) and :func:`order_slices` sorts them anatomically -- never by
   file name -- falling back to InstanceNumber when a slice lacks geometry.
2. :func:`decode_slice`: one slice (or one frame) -> modality LUT / rescale
   (CT -> HU; PET -> Bq/ml, then SUVbw when weight, dose, half-life and times
   are present, otherwise a flag and the reason) -> window -> antialiased
   resize -> float32 (1, S, S) in [0, 1].

PHI never leaves this module: only geometry, units and flags go into ``meta``,
and error messages come from :mod:`raypipe.ingest.safety`'s fixed vocabulary plus
numbers, tag keywords and known UIDs -- never a header value or an exception's text
(a damaged header can make pydicom quote any element, PatientName included).
Declared sizes (rows x columns x frames x samples, frame counts, a deflated
dataset's inflated size, the file size) are checked against ``ingest.limits``
before any pixel data is read, decompressed or allocated.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raypipe.ingest import safety
from raypipe.ingest.common import DecodeError, apply_window, check_finite, resize_plane, select_indices
from raypipe.ingest.safety import DEFAULT_LIMITS, Limits, fail

DICOM_EXTRA_HINT = "install the optional decoders: pip install 'raypipe[dicom]' (pylibjpeg plugins)"

#: DICOM Modality values accepted per configured modality name (others: WrongModality)
EXPECTED_MODALITY = {"ct": {"CT"}, "pet": {"PT"}}


@dataclass
class SliceHeader:
    """Header facts of one DICOM file, enough to group, order and select its slices."""

    path: str
    series_uid: str
    modality: str
    position: float | None  # along the slice normal, mm (single-frame files)
    instance: int | None
    frames: int = 1
    transfer_syntax: str = ""
    #: per-frame positions of a multi-frame file (None entries where a frame lacks geometry)
    frame_positions: list[float | None] | None = field(default=None)


@dataclass(frozen=True)
class SliceRef:
    """One slice of a series: a single-frame file (frame None) or one frame of a multi-frame file."""

    path: str
    frame: int | None
    position: float | None
    instance: int | None


@contextlib.contextmanager
def quiet_pydicom():
    """Silence pydicom's warnings and log lines while decoding: they quote element values (possible PHI)."""
    from pydicom import config

    logger = logging.getLogger("pydicom")
    level, mode = logger.level, config.settings.reading_validation_mode
    logger.setLevel(logging.CRITICAL)
    # value validation only ever warns on reading (and those warnings are silenced here): skip its cost
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        config.settings.reading_validation_mode = mode


#: the Deflated Explicit VR Little Endian transfer syntax UID, as the bytes a file meta group declaring it holds
_DEFLATED_UID = b"1.2.840.10008.1.2.1.99"


def _dcmread(path: str | bytes, stop_before_pixels: bool, force: bool = False):
    """(dataset, file offset where reading stopped: the Pixel Data tag when ``stop_before_pixels``);
    ``path`` may be the file's bytes, read already."""
    import io

    import pydicom

    with (io.BytesIO(path) if isinstance(path, bytes) else open(path, "rb")) as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=stop_before_pixels, force=force)
        return ds, fh.tell()


def _read_failure(err: Exception) -> Exception:
    """The quarantine error of a failed open or parse of a DICOM file: its class only, never the exception's
    text (pydicom's messages can quote element values)."""
    if isinstance(err, IsADirectoryError):
        return fail("NotAFile")
    if isinstance(err, FileNotFoundError):
        return fail("FileMissing")
    if isinstance(err, PermissionError):
        return fail("Unreadable")
    if isinstance(err, MemoryError):
        return fail("ResourceLimit", "the DICOM header declares an element larger than memory allows")
    return fail("CorruptHeader", f"DICOM header parse failed ({type(err).__name__})")


#: a full read of a file up to this size reads its bytes once; a larger one is opened by pydicom from its path
#: (holding the whole file and pydicom's copy of its pixels would double the peak memory)
PREREAD_MAX_BYTES = 64 * 2**20


def _file_bytes(path: str, size: int, limits: Limits) -> bytes:
    """The file's bytes (``size``: its size when it was checked; at most ``limits.max_file_bytes``); open
    failures map to the classes :func:`_read` gives them when pydicom opens the file."""
    try:
        with open(path, "rb") as fh:
            # never ask for more than the file holds (+1 to see growth): read(n) allocates n bytes first
            data = fh.read(min(size, limits.max_file_bytes) + 1)
    except Exception as err:  # noqa: BLE001 - as _read reports a failed read
        raise _read_failure(err) from None
    if len(data) > limits.max_file_bytes:  # the file grew since its size was checked
        raise fail("ResourceLimit", "ingest.limits.max_file_bytes", file_bytes=len(data), limit=limits.max_file_bytes)
    return data


def _read(path: str, stop_before_pixels: bool, with_offset: bool = False, limits: Limits | None = None):
    """dcmread with a fallback for files without the 128-byte preamble / 'DICM' prefix.

    The file size (and a deflated dataset's inflated size) is checked against ``limits`` first. A full
    read (pixels too) reads the file's bytes once: the deflate guard's own parse of the file meta
    (:func:`raypipe.ingest.safety.check_deflated_dicom`, ~90 us a file, a second open and parse) runs
    only when the bytes hold the deflated syntax's UID at all -- a file whose meta declares that syntax
    holds them literally (the meta group is never compressed).
    """
    from pydicom.errors import InvalidDicomError

    limits = limits or DEFAULT_LIMITS
    with safety.os_error_classes():
        size = safety.check_file_size(path, limits.max_file_bytes)
    source = path if stop_before_pixels or size > PREREAD_MAX_BYTES else _file_bytes(path, size, limits)
    if not isinstance(source, bytes) or _DEFLATED_UID in source:
        safety.check_deflated_dicom(path, limits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns with element values (possible PHI) on odd files
        try:
            ds, offset = _dcmread(source, stop_before_pixels)
            return (ds, offset) if with_offset else ds
        except InvalidDicomError:
            try:  # raw datasets without a preamble are still DICOM if they carry an image
                ds, offset = _dcmread(source, stop_before_pixels, force=True)
                if "SOPClassUID" in ds and "Rows" in ds and "Columns" in ds:
                    return (ds, offset) if with_offset else ds
            except Exception:  # noqa: BLE001 - forced parsing of a non-DICOM file fails in many ways
                pass
            raise fail("CorruptHeader", "not a DICOM file (no DICM prefix and no image tags)") from None
        except Exception as err:  # noqa: BLE001 - pydicom fails in many ways on damaged headers
            raise _read_failure(err) from None


def slice_normal(iop) -> np.ndarray | None:
    """Unit normal of the slice plane (row x col), signed so that its dominant axis points to +L/+P/+S.

    The sign convention makes the order independent of how a scanner chose the row/column
    directions (e.g. a flipped column vector), and matches NIfTI's inferior-to-superior axial order.
    """
    try:
        if iop is None or len(iop) != 6:
            return None
        a0, a1, a2, b0, b1, b2 = (float(v) for v in iop)
    except (TypeError, ValueError):
        return None
    # plain float arithmetic: np.cross/np.linalg.norm cost more than the whole product on 3-vectors
    n = (a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0)
    norm = math.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2])
    if not math.isfinite(norm) or norm < 1e-6:
        return None
    n = np.array(n) / norm
    return -n if n[int(np.argmax(np.abs(n)))] < 0 else n


def _position(ipp, normal: np.ndarray | None) -> float | None:
    try:
        if ipp is None or normal is None or len(ipp) != 3:
            return None
        p = float(ipp[0]) * normal[0] + float(ipp[1]) * normal[1] + float(ipp[2]) * normal[2]
        return float(p) if math.isfinite(p) else None
    except (TypeError, ValueError):
        return None  # malformed geometry: InstanceNumber order instead


def slice_position(ds) -> float | None:
    """Position of a single-frame slice along its (signed) normal, in mm; None without geometry tags."""
    return _position(ds.get("ImagePositionPatient"), slice_normal(ds.get("ImageOrientationPatient")))


def _first(seq, keyword: str):
    """``seq[0].keyword`` for a functional-group macro sequence, or None."""
    try:
        if seq:
            return seq[0].get(keyword)
    except (TypeError, AttributeError, IndexError):
        pass
    return None


def frame_positions(ds) -> list[float | None] | None:
    """Per-frame positions of an enhanced multi-frame file (PlanePosition/PlaneOrientation macros)."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if not per:
        return None
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_iop = None
    if shared:
        shared_iop = _first(shared[0].get("PlaneOrientationSequence"), "ImageOrientationPatient")
    out: list[float | None] = []
    for item in per:
        iop = _first(item.get("PlaneOrientationSequence"), "ImageOrientationPatient") or shared_iop
        ipp = _first(item.get("PlanePositionSequence"), "ImagePositionPatient")
        out.append(_position(ipp, slice_normal(iop)))
    return out


def read_header(path: str, expected: set[str] | None = None, limits: Limits | None = None) -> SliceHeader:
    """Header facts needed to group and order slices (pixel data not read).

    ``expected``: accepted Modality values (e.g. ``{"CT"}``); another Modality is ``WrongModality``.
    """
    with quiet_pydicom():
        return _read_header(path, expected, limits)


def _int_tag(ds, keyword: str, default: int) -> int:
    """An integer tag, ``default`` when absent; a malformed value is ``CorruptHeader`` naming the keyword."""
    try:
        v = ds.get(keyword, default)
        return int(default if v is None or v == "" else v)
    except Exception:  # noqa: BLE001 - a damaged element raises anything
        raise fail("CorruptHeader", "a malformed integer tag", tag=keyword) from None


def check_declared_size(ds, limits: Limits | None = None) -> None:
    """Rows x Columns x NumberOfFrames x SamplesPerPixel and the frame count against ``limits``, before any
    pixel data is decoded (the same check for every transfer syntax: the declared size bounds the output)."""
    limits = limits or DEFAULT_LIMITS
    rows, cols = _int_tag(ds, "Rows", 0), _int_tag(ds, "Columns", 0)
    frames, spp = _int_tag(ds, "NumberOfFrames", 1), _int_tag(ds, "SamplesPerPixel", 1)
    safety.check_frames(frames, limits)
    safety.check_voxels((rows, cols, frames, spp), limits, "Rows x Columns x NumberOfFrames x SamplesPerPixel")


def _check_slice_kind(ds, expected: set[str] | None, limits: Limits | None = None) -> str:
    """The file's Modality, after checking the declared size, that it is the expected Modality and a
    single-sample (gray) image."""
    check_declared_size(ds, limits)
    try:
        modality = str(ds.get("Modality", "") or "")
    except Exception:  # noqa: BLE001
        raise fail("CorruptHeader", "a malformed tag", tag="Modality") from None
    if expected and modality not in expected:
        raise fail("WrongModality", f"Modality is {safety.dicom_modality(modality)}, expected "
                                    f"{' or '.join(sorted(expected))}")
    spp = _int_tag(ds, "SamplesPerPixel", 1)
    if spp != 1:
        raise fail("UnsupportedPhotometric", samples_per_pixel=spp)
    return modality


def _read_header(path: str, expected: set[str] | None, limits: Limits | None = None) -> SliceHeader:
    ds, pixel_offset = _read(path, stop_before_pixels=True, with_offset=True, limits=limits)
    # pixel bytes: what follows the Pixel Data tag and its length
    return header_of(ds, path, expected, os.path.getsize(path) - pixel_offset - 8, limits=limits)


def _native_length(ds) -> int:
    """Bytes of native single-sample pixel data (what pydicom's get_expected_length gives, cheaper)."""
    n = int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    return (n + 7) // 8 if bits == 1 else n * (bits // 8)


def header_of(ds, path: str, expected: set[str] | None, pixel_bytes: int | None = None,
              limits: Limits | None = None) -> SliceHeader:
    """Header facts of a parsed dataset (checks included); ``pixel_bytes``: how many pixel-data bytes the
    file holds (None: a full read, measured from the dataset's Pixel Data)."""
    try:
        if "Rows" not in ds or "Columns" not in ds:
            # stop_before_pixels hides PixelData; Rows/Columns must accompany any image
            raise fail("NoPixelData")
        modality = _check_slice_kind(ds, expected, limits)
        ts_uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts_uid is not None and ts_uid.is_compressed and not _decoder_plugins(ts_uid)[0]:
            raise _compressed_error(ts_uid, None)  # no decoder at all: no need to wait for the decode
        if ts_uid is not None and not ts_uid.is_compressed and not ts_uid.is_deflated:
            # native pixel data: the file must hold every pixel byte (catches truncated copies early)
            need = _native_length(ds)
            if pixel_bytes is None:
                data = ds.get("PixelData")
                pixel_bytes = len(data) if isinstance(data, (bytes, bytearray)) else need
            if pixel_bytes < need:
                raise fail("TruncatedFile", needed_bytes=need, file_holds_at_most=max(pixel_bytes, 0))
        try:
            inst = int(ds.get("InstanceNumber"))
        except (TypeError, ValueError):
            inst = None  # absent or malformed: ordering falls back to the position / path
        frames = _int_tag(ds, "NumberOfFrames", 1)
        fpos = frame_positions(ds) if frames > 1 else None
        if fpos is not None and len(fpos) != frames:
            fpos = None
        return SliceHeader(path=path, series_uid=str(ds.get("SeriesInstanceUID", "") or path), modality=modality,
                           position=slice_position(ds), instance=inst, frames=frames,
                           transfer_syntax=str(ts_uid or ""), frame_positions=fpos)
    except DecodeError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged element raises anything; its text may quote PHI
        raise fail("CorruptHeader", f"unreadable image or geometry tags ({type(err).__name__})") from None


def slice_refs(headers: list[SliceHeader]) -> list[SliceRef]:
    """One reference per slice of a series: every single-frame file, every frame of a multi-frame file."""
    refs = []
    for h in headers:
        if h.frames > 1:
            fpos = h.frame_positions or [None] * h.frames
            refs.extend(SliceRef(h.path, f, fpos[f], h.instance) for f in range(h.frames))
        else:
            refs.append(SliceRef(h.path, None, h.position, h.instance))
    return refs


def order_slices(refs: list[SliceRef]) -> list[SliceRef]:
    """Anatomical order: by position along the normal when every slice has one, else InstanceNumber.

    Ties (and the InstanceNumber fallback) are broken by frame index, then path, so the order is
    deterministic whatever order the files arrive in.
    """
    if refs and all(r.position is not None for r in refs):
        return sorted(refs, key=lambda r: (r.position, r.instance or 0, r.frame or 0, r.path))
    return sorted(refs, key=lambda r: (r.instance if r.instance is not None else 0, r.frame or 0, r.path))


def order_series(headers: list[SliceHeader]) -> list[SliceHeader]:
    """Single-frame files of one series in anatomical order (see :func:`order_slices`)."""
    by_path = {h.path: h for h in headers}
    return [by_path[r.path] for r in order_slices(slice_refs(headers)) if r.frame in (None, 0)]


# ----------------------------------------------------------------------------- values
def _seconds(t) -> float | None:
    """Seconds since midnight of a DICOM TM (HHMMSS.FFFFFF) or the time part of a DT."""
    if t is None or str(t).strip() == "":
        return None
    t = str(t).strip()
    if len(t) >= 14 and t[:8].isdigit():  # DT: YYYYMMDDHHMMSS...
        t = t[8:]
    t = t.replace(":", "")
    whole, _, frac = t.partition(".")
    whole = whole.ljust(6, "0")
    try:
        return int(whole[:2]) * 3600 + int(whole[2:4]) * 60 + int(whole[4:6]) + (float("0." + frac) if frac else 0.0)
    except ValueError:
        return None


def suv_factor(ds) -> tuple[float | None, str]:
    """Multiplier from the rescaled PET values to SUVbw, or (None, reason) when the tags do not allow it.

    SUVbw = activity [Bq/ml] x weight [g] / injected dose decayed to the reference time. The
    reference time follows DecayCorrection: START -> SeriesTime (else AcquisitionTime); ADMIN ->
    the image is already corrected to the injection time (no decay factor); NONE -> the slice's
    AcquisitionTime. Units GML are SUVbw already.
    """
    units = str(ds.get("Units", "") or "").upper()
    if units == "GML":
        return 1.0, "SUVbw"
    if units not in ("BQML", ""):
        return None, f"units {_pet_units(units)} are not Bq/ml"
    weight = ds.get("PatientWeight")
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    if not weight or not seq:
        return None, "PatientWeight or RadiopharmaceuticalInformationSequence missing"
    info = seq[0]
    dose, half = info.get("RadionuclideTotalDose"), info.get("RadionuclideHalfLife")
    if not dose or not half:
        return None, "injected dose (RadionuclideTotalDose) or RadionuclideHalfLife missing"
    try:
        weight_g, dose, half = float(weight) * 1000.0, float(dose), float(half)
    except (TypeError, ValueError):
        return None, "PatientWeight, dose or half-life not numeric"
    if weight_g <= 0 or dose <= 0 or half <= 0:
        return None, "PatientWeight, dose or half-life not positive"
    correction = str(ds.get("DecayCorrection", "START") or "START").upper()
    if correction == "ADMIN":
        return weight_g / dose, "SUVbw"
    start = _seconds(info.get("RadiopharmaceuticalStartDateTime") or info.get("RadiopharmaceuticalStartTime"))
    ref = ds.get("AcquisitionTime") if correction == "NONE" else (ds.get("SeriesTime") or ds.get("AcquisitionTime"))
    acq = _seconds(ref)
    if start is None or acq is None:
        return None, "injection (RadiopharmaceuticalStartTime) or acquisition/series time missing"
    delay = acq - start
    if delay < 0:
        delay += 24 * 3600  # acquisition after midnight
    return weight_g / (dose * 2.0 ** (-delay / half)), "SUVbw"


#: PET Units defined terms (PS3.3 C.8.9.1.1.3): the only Units values that reach meta
PET_UNITS = frozenset("CNTS NONE CM2 CM2ML PCNT CPS BQML MGMINML UMOLMINML MLMING MLG 1CM UMOLML PROPCNT PROPCPS "
                      "MLMINML MLML GML STDDEV".split())


def _pet_units(value) -> str:
    """The Units value when it is a defined term, else ``other`` (``unknown`` when empty): header text that
    is not a defined term never reaches meta."""
    u = str(value or "").strip().upper()
    return (u if u in PET_UNITS else "other") if u else "unknown"


_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit / explicit VR little endian


def native_frame(ds, frame: int | None = None) -> np.ndarray | None:
    """One frame of uncompressed little-endian grayscale pixel data, read straight from the bytes.

    Same values as pydicom's ``pixel_array`` (BitsStored masking and sign extension included), without
    its per-call overhead; None when the data is anything else (pydicom then decodes it).
    """
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or str(ts) not in _NATIVE_LE or "PixelData" not in ds:
        return None
    try:
        bits, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed, spp = int(ds.PixelRepresentation) == 1, int(ds.get("SamplesPerPixel", 1) or 1)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return None
    if bits not in (8, 16, 32) or spp != 1 or not 0 < stored <= bits:
        return None
    n, size = rows * cols, bits // 8
    offset = (frame or 0) * n * size
    buf = ds.PixelData
    if not isinstance(buf, (bytes, bytearray)) or len(buf) < offset + n * size:
        return None  # short data: pydicom's decoder reports it
    raw = np.frombuffer(buf, dtype=f"<u{size}", count=n, offset=offset).reshape(rows, cols)
    if stored < bits:
        raw = raw & np.array((1 << stored) - 1, raw.dtype)
        if signed:  # sign-extend the stored bits
            shift = bits - stored
            return ((raw << shift).view(f"<i{size}") >> shift).astype(f"i{size}")
        return raw.copy()
    return raw.view(f"<i{size}") if signed else raw


def _decoder_plugins(ts) -> tuple[list[str], list[str]]:
    """(installed, missing) pydicom decoder plugins for transfer syntax ``ts`` (both empty if pydicom has none)."""
    try:
        from pydicom.pixels import get_decoder

        dec = get_decoder(ts)
    except Exception:  # noqa: BLE001 - an unknown or private syntax: no decoder
        return [], []
    return sorted(dec.available_plugins), sorted(dec.missing_dependencies)


def _compressed_error(ts, err: Exception | None) -> DecodeError:
    """The quarantine reason for compressed pixel data that did not decode.

    Without the ``dicom`` extra's plugin for the syntax (pylibjpeg, or GDCM if the user has it) the
    syntax is unsupported *here*: the message names it and the extra to install. With the plugin
    installed, the data itself is at fault (every installed decoder failed): CorruptPixelData.
    """
    name = safety.transfer_syntax(ts)
    installed, missing = _decoder_plugins(ts)
    why = f" ({type(err).__name__})" if err is not None else ""
    if not {"pylibjpeg", "gdcm"} & set(installed):
        have = f"installed decoders ({', '.join(installed)}) failed{why}" if installed else "no decoder is installed"
        return fail("UnsupportedTransferSyntax", f"transfer syntax {name}: {have}")
    return fail("CorruptPixelData", f"transfer syntax {name}: the installed decoders ({', '.join(installed)}) "
                                    f"failed{why}")


def decode_pixels(ds, frame: int | None = None) -> np.ndarray:
    """Stored pixel values of one frame (or the single frame); a compressed syntax without a decoder is a clear error."""
    from pydicom.pixels import pixel_array

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    frames = _int_tag(ds, "NumberOfFrames", 1)
    if frame is not None and not 0 <= frame < frames:
        raise fail("FrameOutOfRange", frame=frame, frames=frames)
    fast = native_frame(ds, frame if frames > 1 else None)
    if fast is not None:
        return fast
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if frames > 1:
                return pixel_array(ds, index=frame or 0)
            return ds.pixel_array
    except MemoryError:
        raise fail("ResourceLimit", "decoding the pixel data ran out of memory") from None
    except BaseException as err:  # noqa: BLE001 - every decoder failure becomes a quarantine reason
        if isinstance(err, safety.FATAL):  # a Rust panic is a BaseException: caught too
            raise
        if ts is not None and getattr(ts, "is_compressed", False):
            raise _compressed_error(ts, err) from None
        raise fail("CorruptPixelData", f"pixel data decode failed ({type(err).__name__})") from None


def rescale(ds, frame: int | None = None) -> tuple[float, float] | None:
    """(slope, intercept) of the modality rescale, from the top level or the functional groups of ``frame``."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)
    per, shared = ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")
    for groups, idx in ((per, frame or 0), (shared, 0)):
        try:
            item = groups[idx] if groups else None
            pvt = item.get("PixelValueTransformationSequence") if item is not None else None
            if pvt:
                return float(pvt[0].get("RescaleSlope", 1.0) or 1.0), float(pvt[0].get("RescaleIntercept", 0.0) or 0.0)
        except (IndexError, TypeError, ValueError, AttributeError):
            continue
    return None


def physical_values(ds, arr: np.ndarray, frame: int | None = None,
                    dtype=np.float64) -> tuple[np.ndarray, dict[str, Any]]:
    """Modality LUT / rescale and, for PET, SUVbw; returns values of ``dtype`` and PHI-free meta.

    The decode path uses float32 (exact for stored integers below 2**24 with the usual integer
    slopes, and what the window produces anyway); :func:`hounsfield` keeps float64.
    """
    modality = str(ds.get("Modality", "") or "")
    meta: dict[str, Any] = {"dicom_modality": safety.dicom_modality(modality)}
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        values = np.asarray(apply_modality_lut(arr, ds), dtype=dtype)
        meta["rescale"] = "modality_lut"
    else:
        values = arr.astype(dtype)
        sl = rescale(ds, frame)
        if sl is not None:
            if sl[0] != 1.0:
                values *= values.dtype.type(sl[0])
            if sl[1] != 0.0:
                values += values.dtype.type(sl[1])
            meta["rescale"] = [sl[0], sl[1]]
    if modality == "CT":
        meta["units"] = "HU"
    elif modality == "PT":
        factor, why = suv_factor(ds)
        if factor is not None:
            values = values * values.dtype.type(factor)
            meta.update(units="SUVbw", suv=True)
        else:
            meta.update(units=_pet_units(ds.get("Units", "")), suv=False, suv_missing=why)
    return values, meta


def decode_slice(path: str, size: int, window: tuple[float, float] | None, frame: int | None = None,
                 expected: set[str] | None = None, limits: Limits | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One slice (or one frame of a multi-frame file) -> float32 (1, size, size) in [0, 1] and meta.

    ``window`` None: min-max of the slice itself (per-slice normalisation, ``meta.normalisation``).
    """
    with quiet_pydicom():
        ds = _read(path, stop_before_pixels=False, limits=limits)
        return _decode_dataset(ds, size, window, frame, expected, limits=limits)


def decode_dataset(ds, size: int, window: tuple[float, float] | None, frame: int | None = None,
                   expected: set[str] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`decode_slice` of an already-parsed dataset (pixel data included)."""
    with quiet_pydicom():
        return _decode_dataset(ds, size, window, frame, expected)


def _decode_dataset(ds, size: int, window, frame: int | None, expected: set[str] | None, checked: bool = False,
                    limits: Limits | None = None):
    if not checked:  # header_of checked this dataset already
        _check_slice_kind(ds, expected, limits)
    arr = decode_pixels(ds, frame)
    if arr.ndim != 2:
        raise fail("UnsupportedShape", "expected one 2-D frame", shape=tuple(arr.shape))
    try:
        values, meta = physical_values(ds, arr, frame, dtype=np.float32)
        spacing = ds.get("PixelSpacing")
        if spacing is not None and len(spacing) == 2:
            meta["pixel_spacing_mm"] = [float(spacing[0]), float(spacing[1])]
        if ds.get("SliceThickness") not in (None, ""):
            meta["slice_thickness_mm"] = float(ds.SliceThickness)
    except Exception as err:  # noqa: BLE001 - a damaged element raises anything; its text may quote PHI
        raise fail("CorruptHeader", f"unreadable rescale or geometry tags ({type(err).__name__})") from None
    check_finite(values, "slice")
    if frame is not None:
        meta["frame"] = int(frame)
    meta["window"] = list(window) if window is not None else None
    meta["normalisation"] = "window" if window is not None else "slice_minmax"
    meta["original_shape"] = list(arr.shape)
    windowed = apply_window(values, window, inplace=True)  # values: a float32 copy of our own
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        windowed = 1.0 - windowed  # MONOCHROME1 (some DX/CR images): minimum value is white
        meta["inverted"] = True
    img = resize_plane(windowed, size)
    return np.clip(img, 0, 1)[None].astype(np.float32, copy=False), meta


def _unexpected(err: Exception, ds=None) -> DecodeError:
    """An exception no check foresaw (a bug or a pydicom failure mode): quarantined as UnexpectedError,
    with its type and raypipe's line, never its text (see :func:`raypipe.ingest.safety.unexpected`)."""
    return safety.unexpected(err)


@dataclass
class DecodedSlice:
    """One decoded slice of a series (output of :func:`decode_series`)."""

    path: str
    series_uid: str
    position: int  # rank among the selected slices of its series, inferior to superior
    z_mm: float | None  # position along the slice normal
    image: np.ndarray
    meta: dict[str, Any]


def decode_series(paths: list[str], size: int, window: tuple[float, float] | None, policy: str = "even",
                  count: int = 16, k: int = 2, expected: set[str] | None = None, limits: Limits | None = None
                  ) -> tuple[list[DecodedSlice], list[tuple[str, DecodeError]], list[str]]:
    """The files of one patient's modality -> (decoded slices, (path, error) per failure, unselected paths).

    Groups by SeriesInstanceUID, orders anatomically (:func:`order_slices`), selects with
    ``policy`` and decodes the selected slices, parsing each file once where possible: with
    ``policy="all"`` every file is read in full a single time (header checks and pixels); otherwise
    headers are read without pixel data and only the selected files are read again in full. A
    slice that fails to decode leaves a gap in its series' positions (positions come from the
    header order, as with any slice the policy skipped), so the other slices keep their places.
    Results are sorted by (series_uid, position).
    """
    full_first = policy == "all"
    errors: list[tuple[str, DecodeError]] = []
    headers: list[SliceHeader] = []
    decoded: dict[tuple[str, int | None], tuple[np.ndarray, dict] | DecodeError] = {}
    with quiet_pydicom():
        for path in paths:
            ds = None
            try:
                if full_first:
                    ds = _read(path, stop_before_pixels=False, limits=limits)
                    h = header_of(ds, path, expected, limits=limits)
                    for f in ([None] if h.frames == 1 else range(h.frames)):
                        try:
                            decoded[(path, f)] = _decode_dataset(ds, size, window, f, expected, checked=True)
                        except DecodeError as err:
                            decoded[(path, f)] = err
                        except BaseException as err:  # noqa: BLE001 - one bad slice never takes the series down
                            if isinstance(err, safety.FATAL):  # a Rust panic is a BaseException: caught too
                                raise
                            decoded[(path, f)] = _unexpected(err, ds)
                else:
                    h = _read_header(path, expected, limits)
            except DecodeError as err:
                errors.append((path, err))
                continue
            except BaseException as err:  # noqa: BLE001 - quarantine this file, go on with the others
                if isinstance(err, safety.FATAL):  # a Rust panic is a BaseException: caught too
                    raise
                errors.append((path, _unexpected(err, ds)))
                continue
            finally:
                del ds
            headers.append(h)
        by_series: dict[str, list[SliceHeader]] = {}
        for h in headers:
            by_series.setdefault(h.series_uid, []).append(h)
        out: list[DecodedSlice] = []
        unselected: set[str] = set()
        chosen_paths: set[str] = set()
        cache: tuple[str, Any] | None = None  # the last fully read file (frames of one multi-frame file)
        for uid in sorted(by_series):
            ordered = order_slices(slice_refs(by_series[uid]))
            pick = select_indices(len(ordered), policy, count, k)
            picked = set(pick)
            unselected.update(ref.path for rank, ref in enumerate(ordered) if rank not in picked)
            for pos, rank in enumerate(pick):
                ref = ordered[rank]
                chosen_paths.add(ref.path)
                try:
                    res = decoded.pop((ref.path, ref.frame), None)
                    if res is None:
                        if cache is None or cache[0] != ref.path:
                            cache = None
                            cache = (ref.path, _read(ref.path, stop_before_pixels=False, limits=limits))
                        res = _decode_dataset(cache[1], size, window, ref.frame, expected, limits=limits)
                    if isinstance(res, DecodeError):
                        raise res
                except DecodeError as err:
                    errors.append((ref.path, err))
                    continue
                except BaseException as err:  # noqa: BLE001 - quarantine this slice, go on with the others
                    if isinstance(err, safety.FATAL):  # a Rust panic is a BaseException: caught too
                        raise
                    errors.append((ref.path, _unexpected(err, cache[1] if cache and cache[0] == ref.path else None)))
                    continue
                img, meta = res
                if ref.position is not None:
                    meta["z_mm"] = ref.position  # position along the slice normal: the order is checkable
                out.append(DecodedSlice(ref.path, uid, pos, ref.position, img, meta))
    return out, errors, sorted(unselected - chosen_paths)


def hounsfield(path: str, frame: int | None = None) -> np.ndarray:
    """Full-resolution physical values (HU for CT) of one slice, for checks and tests."""
    with quiet_pydicom():
        ds = _read(path, stop_before_pixels=False)
        values, _ = physical_values(ds, decode_pixels(ds, frame), frame)
    return values

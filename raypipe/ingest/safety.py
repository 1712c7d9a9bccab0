"""What every decoder shares to stay safe on hostile input: path confinement, size limits, messages.

No Ray here. Four guarantees, each one function:

- **Inputs confined** (:func:`confine`): a manifest path is resolved (symlinks included) and must
  stay under the input root; only regular files are opened (a directory, FIFO, device or socket is
  ``NotAFile`` before anything reads it).
- **Bounded work** (:func:`check_file_size`, :func:`check_voxels`, :func:`check_frames`,
  :func:`read_capped`, :func:`check_deflated_dicom`): sizes a file *declares* are checked against
  ``ingest.limits`` before any pixel data is decompressed or allocated.
- **Identity never leaves a decoder** (:func:`message`, :func:`fact`, :func:`unexpected`): an error
  message is a fixed sentence per error class plus non-identifying facts (numbers, tag keywords,
  known transfer syntax UIDs, known extensions, configuration names); never a header value, a
  file or folder name, or an exception's text, which may quote either.
- **Paths pseudonymised** (:func:`pseudonymous_path`): ``errors.source_path`` is the input-relative
  path with every component replaced by a keyed hash (``privacy.plain_paths`` opts out).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import math
import os
import re
import stat
import traceback
from typing import Any

from raypipe.ingest.common import DecodeError

#: error class -> the fixed sentence that says what is wrong and what to do. Every ``errors`` row's
#: message starts with its class's sentence; the fuzz suite and the tests import this table.
VOCABULARY: dict[str, str] = {
    # --- where the file is
    "FileMissing": "the file listed does not exist: fix the manifest path or remove the row",
    "NotAFile": "the path is not a regular file (a folder, FIFO, device or socket): list regular files only",
    "PathOutsideInput": "the path leads outside the input folder (an absolute path, '..' or a symlink out of "
                        "it): copy the file under the input folder and list it relative to that folder",
    "Unreadable": "the file cannot be opened (permissions or an I/O error): check that raypipe may read it",
    "MissingId": "the manifest row has an empty patient_id: fill it in or remove the row",
    "NoLabel": "patient not in labels.csv: add a labels row or drop the file from the manifest",
    # --- what the file is
    "UnsupportedFormat": "raypipe cannot read this file for this modality: check the manifest's format and "
                         "modality columns (formats: docs/ingest.md)",
    "CorruptHeader": "the file's header cannot be parsed: it is damaged or not in the format its name or "
                     "the manifest says; re-export it",
    "TruncatedFile": "the file is shorter than its header declares: it was cut off; copy it again",
    "UnsupportedTransferSyntax": "the DICOM pixel data uses a compression no installed decoder reads: "
                                 "pip install 'raypipe[dicom]' (pylibjpeg plugins)",
    "CorruptPixelData": "the pixel data cannot be decoded although a decoder for it is installed: the data "
                        "is damaged; re-export the file",
    "ResourceLimit": "the file needs more memory or work than ingest.limits allow: raise the named limit if "
                     "the file is genuine",
    "NonFinite": "the values contain NaN or infinity: the file is corrupt or mis-scaled; fix or drop it",
    "NoPixelData": "the DICOM object holds no image (e.g. a structured report or presentation state): "
                   "leave it out of imaging modalities",
    "WrongModality": "the DICOM Modality is not the one this configured modality expects: check the "
                     "manifest's modality column",
    "UnsupportedPhotometric": "colour DICOM images are not CT/PET slices: leave them out of volume modalities",
    "FrameOutOfRange": "the configured frame does not exist in this file: check ingest.modalities.<m>.frame",
    "UnsupportedShape": "the image has a shape this modality cannot use",
    "EmptyImage": "the image has no pixels",
    "UnsupportedDtype": "the pixel type is not a real number type",
    "UnknownBand": "a configured band is not in the scene: check ingest.modalities.<m>.bands",
    "AllNodata": "every pixel of the scene is nodata",
    "BadCSV": "the CSV cannot be read as an EHR table (long: stay_id, charttime, variable, value; or wide "
              "with Hours): fix the file",
    "NoEvents": "the EHR file holds no event of the 17 benchmark variables",
    "EmptyReport": "the report is empty: counted as a missing modality",
    "BadTable": "the table cannot be read as one numeric row per patient_id: fix the file",
    "MissingRow": "the table has no row for this patient",
    "UnexpectedError": "a bug in raypipe: please report it with this message (it holds no file content)",
}

#: file extensions that may be named in a message (an unknown one may be part of a person's name)
KNOWN_EXTENSIONS = frozenset(
    ".dcm .dicom .ima .nii .nii.gz .hdr .img .gz .png .jpg .jpeg .tif .tiff .csv .txt .json .xml .pdf .zip "
    ".bmp .gif .h5 .hdf5 .npy .npz .mha .mhd .nrrd .raw .mat .doc .docx .xls .xlsx .rtf .html .tar .bz2 .xz "
    ".parquet .edf .wav .mp4 .avi .svs .ndpi .jp2 .j2k .dat .bin .log .md .yaml .yml .sh .py".split())

#: DICOM Modality defined terms (PS3.3 C.7.3.1.1.1): the only Modality values a message may quote
DICOM_MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL IVOCT IVUS "
    "KER KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN PR PT PX REG RESP RF RG RTDOSE "
    "RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA "
    "XA XAPROTOCOL XC".split())

#: longest first: a name ending in ``.nii.gz`` keeps ``.nii.gz``, not ``.gz`` (sorted once, not per call)
_EXTENSIONS_LONGEST_FIRST = tuple(sorted(KNOWN_EXTENSIONS, key=len, reverse=True))

_SAFE_TOKEN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


class Limits:
    """``ingest.limits`` as plain numbers (what the Ray tasks get)."""

    def __init__(self, max_file_bytes: int = 2 * 1024**3, max_voxels: int = 2**28, max_frames: int = 20000,
                 max_report_bytes: int = 1024**2, max_table_bytes: int = 256 * 1024**2, **_: Any):
        self.max_file_bytes = int(max_file_bytes)
        self.max_voxels = int(max_voxels)
        self.max_frames = int(max_frames)
        self.max_report_bytes = int(max_report_bytes)
        self.max_table_bytes = int(max_table_bytes)

    @classmethod
    def of(cls, limits: Any) -> "Limits":
        if limits is None:
            return cls()
        if isinstance(limits, Limits):
            return limits
        if isinstance(limits, dict):
            return cls(**limits)
        return cls(**limits.model_dump())


DEFAULT_LIMITS = Limits()


# ----------------------------------------------------------------------------- messages
def fact(value: Any) -> str:
    """A value as it may appear in a message: numbers as they are; any other text only when it is a
    short identifier-like token (a tag keyword, a configuration name), else ``<redacted>``."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in value):
        return "x".join(fact(v) for v in value)
    s = str(value)
    return s if _SAFE_TOKEN.match(s) else "<redacted>"


def extension(path: str) -> str:
    """The file's extension when it is a well-known one, else a phrase that names none."""
    lower = os.path.basename(path).lower()
    for ext in _EXTENSIONS_LONGEST_FIRST:
        if lower.endswith(ext) and len(lower) > len(ext):
            return ext
    return "an extension raypipe does not know" if "." in lower.lstrip(".") else "no extension"


def dicom_modality(value: Any) -> str:
    """A DICOM Modality value when it is a defined term, else a phrase (a hostile header may put a name there)."""
    s = str(value or "").strip()
    if not s:
        return "missing"
    return s if s in DICOM_MODALITIES else "a value that is not a DICOM defined term"


def transfer_syntax(uid: Any) -> str:
    """A transfer syntax UID with its name when pydicom knows it, else a phrase that quotes nothing."""
    try:
        from pydicom.uid import UID_dictionary

        s = str(uid or "")
        if s in UID_dictionary:
            return f"{s} ({UID_dictionary[s][0]})"
    except Exception:  # noqa: BLE001 - pydicom missing or a malformed value: quote nothing
        pass
    return "a private or unknown transfer syntax"


def message(error_class: str, detail: str = "", **facts: Any) -> str:
    """The one-line message of ``error_class``: its fixed sentence, an optional fixed ``detail`` (a literal
    from raypipe's code, never file content) and ``key=value`` facts passed through :func:`fact`."""
    base = VOCABULARY.get(error_class, VOCABULARY["UnexpectedError"])
    parts = [base]
    if detail:
        parts.append(detail)
    if facts:
        parts.append(", ".join(f"{k}={fact(v)}" for k, v in facts.items()))
    return "; ".join(parts)


def fail(error_class: str, detail: str = "", **facts: Any) -> DecodeError:
    """A :class:`DecodeError` whose message comes from :func:`message` (raise it)."""
    return DecodeError(error_class, message(error_class, detail, **facts))


def unexpected(err: BaseException) -> DecodeError:
    """An exception no check foresaw, as an ``UnexpectedError``: its type and where raypipe's code raised
    it (file:line of the innermost raypipe frame) -- never its text, which may quote file content."""
    where = ""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if f"{os.sep}raypipe{os.sep}" in frame.filename:
            where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
            break
    return DecodeError("UnexpectedError", message("UnexpectedError", f"{type(err).__name__} at {where or '?'}"))


def public_message(error_class: str, text: str) -> str:
    """The message an ``errors`` row carries: ``text`` when it was built by :func:`message` for this class
    (it starts with the class's sentence), else the class's sentence alone."""
    base = VOCABULARY.get(error_class)
    if base is None:
        return message("UnexpectedError", "an error class raypipe does not know")
    return text if isinstance(text, str) and text.startswith(base) else base


# ----------------------------------------------------------------------------- paths
def confine(root: str, rel_path: str) -> str:
    """The real path of manifest entry ``rel_path`` under ``root``, checked; raises :class:`DecodeError`.

    Absolute paths, paths that leave ``root`` through ``..`` and symlinks (of the file or of any folder
    on the way) that point outside ``root`` are ``PathOutsideInput``; a path that does not exist is
    ``FileMissing``; anything but a regular file (folder, FIFO, device, socket) is ``NotAFile``. The
    checks use ``stat``/``realpath`` only, so nothing is opened and a FIFO cannot block.
    """
    rel = str(rel_path or "")
    if os.path.isabs(rel) or rel.startswith("~"):
        raise fail("PathOutsideInput", "manifest paths must be relative to the input folder")
    real_root = os.path.realpath(root)
    joined = os.path.join(real_root, rel)
    real = os.path.realpath(joined)
    if real != real_root and os.path.commonpath([real, real_root]) != real_root:
        raise fail("PathOutsideInput")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise fail("FileMissing") from None
    except NotADirectoryError:
        raise fail("FileMissing", "a folder on the way is a file") from None
    except PermissionError:
        raise fail("Unreadable") from None
    except OSError as err:
        raise fail("Unreadable", f"{type(err).__name__}") from None
    if not stat.S_ISREG(st.st_mode):
        raise fail("NotAFile")
    return real


def pseudonymous_path(rel_path: str, key: bytes, plain: bool = False) -> str:
    """``rel_path`` with every component replaced by its keyed hash (16 hex characters); a well-known
    extension of the last component is kept (``3f...a1/9c...0e.dcm``). ``plain``: unchanged."""
    rel = str(rel_path or "")
    if plain:
        return rel
    parts = [p for p in re.split(r"[\\/]+", rel) if p not in ("", ".")]
    if not parts:
        return "<empty path>"
    out = [_folder_hash(key, p) for p in parts[:-1]]  # folders repeat across a cohort's files: hashed once
    ext = extension(parts[-1])
    out.append(_component_hash(key, parts[-1]) + (ext if ext.startswith(".") else ""))
    return "/".join(out)


def _component_hash(key: bytes, part: str) -> str:
    return hmac.new(key, part.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16]


_folder_hash = functools.lru_cache(maxsize=4096)(_component_hash)


def path_key(secret: bytes) -> bytes:
    """The key of the ``source_path`` component hashes, derived from the run's secret."""
    return hmac.new(secret, b"raypipe/source_path/v1", hashlib.sha256).hexdigest().encode()


# ----------------------------------------------------------------------------- limits
@contextlib.contextmanager
def os_error_classes():
    """Map the OS errors of opening an input to one class per cause, the same for every format.

    A missing file is ``FileMissing``, a folder ``NotAFile``, any other OS error ``Unreadable``
    (with the exception's type only: its text may quote the path).
    """
    try:
        yield
    except IsADirectoryError:
        raise fail("NotAFile") from None
    except FileNotFoundError:
        raise fail("FileMissing") from None
    except OSError as err:
        raise fail("Unreadable", type(err).__name__) from None


def check_file_size(path: str, limit: int, what: str = "max_file_bytes") -> int:
    """The file's size in bytes; ``ResourceLimit`` when it exceeds ``limit`` (a regular file: see :func:`confine`)."""
    size = os.stat(path).st_size
    if size > limit:
        raise fail("ResourceLimit", f"ingest.limits.{what}", file_bytes=size, limit=limit)
    return size


def check_voxels(shape: tuple | list, limits: Limits, what: str = "declared shape") -> int:
    """Product of the declared ``shape``; ``ResourceLimit`` above ``limits.max_voxels`` (checked before any
    pixel data is decompressed or allocated). Negative or absurd dimensions are ``CorruptHeader``."""
    n = 1
    dims = []
    for d in shape:
        try:
            d = int(d)
        except (TypeError, ValueError):
            raise fail("CorruptHeader", f"{what} is not a list of integers") from None
        if d < 0:
            raise fail("CorruptHeader", f"{what} has a negative dimension")
        dims.append(d)
        n *= d
    if n > limits.max_voxels:
        raise fail("ResourceLimit", "ingest.limits.max_voxels", shape=tuple(dims), voxels=n,
                   limit=limits.max_voxels)
    return n


def check_frames(frames: int, limits: Limits) -> None:
    if frames > limits.max_frames:
        raise fail("ResourceLimit", "ingest.limits.max_frames", frames=frames, limit=limits.max_frames)


def read_capped(path: str, cap: int) -> tuple[bytes, bool]:
    """(at most ``cap`` bytes of the file, whether it had more); never reads more than ``cap + 1`` bytes."""
    with open(path, "rb") as fh:
        data = fh.read(cap + 1)
    return data[:cap], len(data) > cap


def looks_binary(data: bytes) -> bool:
    """True for bytes that are not text: a NUL byte, or more than 5 % control characters other than
    tab, newline, carriage return and form feed (DICOM, images, archives, executables all qualify)."""
    if not data:
        return False
    if b"\x00" in data:
        return True
    sample = data[:65536]
    ctrl = sum(1 for b in sample if b < 32 and b not in (9, 10, 12, 13)) + sample.count(127)
    return ctrl > 0.05 * len(sample)


def decode_text(data: bytes, truncated: bool) -> str:
    """``data`` as text: UTF-8 (with or without a BOM), else Latin-1; a multi-byte character cut by the byte
    cap is dropped. Binary data is ``UnsupportedFormat``."""
    if looks_binary(data):
        raise fail("UnsupportedFormat", "a report must be a text file; this one holds binary data")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if truncated and err.start >= len(data) - 3:
            try:
                return data[:err.start].decode("utf-8-sig")
            except UnicodeDecodeError:
                pass
        return data.decode("latin-1")


def check_deflated_dicom(path: str, limits: Limits) -> None:
    """Deflated Explicit VR Little Endian DICOM: pydicom inflates the whole dataset at once, so count the
    inflated size in bounded steps first (a small file may inflate to gigabytes)."""
    import zlib

    from pydicom.filereader import read_preamble
    from pydicom.filereader import _read_file_meta_info as read_meta  # noqa: PLC2701 - public behaviour

    try:
        with open(path, "rb") as fh:
            read_preamble(fh, force=True)
            meta = read_meta(fh)
            if str(meta.get("TransferSyntaxUID", "")) != "1.2.840.10008.1.2.1.99":
                return
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            total = 0
            while True:
                chunk = fh.read(1 << 20)
                if not chunk:
                    break
                data = chunk
                while data:
                    out = inflater.decompress(data, 1 << 22)
                    total += len(out)
                    if total > limits.max_file_bytes:
                        raise fail("ResourceLimit", "ingest.limits.max_file_bytes (deflated DICOM, inflated size)",
                                   limit=limits.max_file_bytes)
                    data = inflater.unconsumed_tail
    except DecodeError:
        raise
    except Exception:  # noqa: BLE001 - not deflated, or unreadable meta: the DICOM reader reports it
        return


# ----------------------------------------------------------------------------- outputs
#: the file raypipe writes into every output folder it creates; only a folder carrying it (for the
#: same stage) is ever replaced, and only when it holds nothing but what that run wrote
MARKER = ".raypipe-output.json"


class UnsafeOutputError(ValueError):
    """The output folder cannot be replaced without deleting something raypipe did not write."""


def check_output_dir(out: str, inputs: list[str], stage: str) -> None:
    """Refuse an output folder whose replacement could delete data raypipe did not create.

    Allowed: a path that does not exist, an empty folder, or a folder carrying raypipe's
    :data:`MARKER` for ``stage`` whose entries are all ones that run wrote. Refused, with a message
    saying what to do: the input itself, a folder that contains an input, a file, a folder with
    foreign files. Raises :class:`UnsafeOutputError`.
    """
    import json

    real = os.path.realpath(out)
    for inp in inputs:
        r_in = os.path.realpath(inp)
        if real == r_in or os.path.commonpath([real, r_in]) == real:
            raise UnsafeOutputError(
                f"{stage} output {out} is the input folder or contains it ({inp}): writing there would delete "
                f"the input; choose another folder (e.g. --out {os.path.join(os.path.dirname(real) or '.', stage + '_out')})")
    if not os.path.lexists(out):
        return
    if os.path.islink(out) or not os.path.isdir(out):
        raise UnsafeOutputError(f"{stage} output {out} exists and is not a folder raypipe wrote: choose another "
                                "path or remove it yourself")
    entries = set(os.listdir(out))
    if not entries:
        return
    marker = os.path.join(out, MARKER)
    try:
        with open(marker) as fh:
            info = json.load(fh)
        ok = info.get("stage") == stage and entries - {MARKER} <= set(info.get("entries", []))
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise UnsafeOutputError(
            f"{stage} output {out} holds files raypipe did not write (no {MARKER} of an earlier {stage} run, or "
            "files added since): raypipe never deletes them; choose a new or empty folder, or move them away yourself")


def write_marker(folder: str, stage: str) -> None:
    """Mark ``folder`` as a ``stage`` output, listing what it holds now (call when it is complete)."""
    import json

    entries = sorted(e for e in os.listdir(folder) if e != MARKER)
    with open(os.path.join(folder, MARKER), "w") as fh:
        json.dump({"stage": stage, "entries": entries}, fh, indent=1, sort_keys=True)


#: exceptions that must stop a task (interrupts, exits); every other BaseException a decoder raises -- e.g.
#: pyo3's PanicException from a Rust decoder such as pylibjpeg-rle -- is a reason to quarantine the file
FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)

"""A seeded generator of hostile input files for the ingest fuzz suite (tests/test_ingest_fuzz.py).

Built from files nobody here wrote (pydicom's and nibabel's shipped test data) and a
small synthetic clinical cohort, mutated the ways the issue-15 audit found harmful:

- DICOM: truncations, random byte flips, zeroed headers, the value-representation code of
  SOPClassUID flipped (the element then swallows the rest of the header: names, ids, dates),
  declared Rows x Columns of 65535 x 65535 (RLE and native), NumberOfFrames 2^31 - 1, a
  deflated dataset that inflates far beyond its size, an RLE stream that makes the Rust decoder panic
- NIfTI: truncations, header byte flips, a 348-byte header declaring 1024^3 voxels (.nii and
  .nii.gz), a gzip bomb, NaN and infinite voxels
- reports: a DICOM file or a PNG listed as a ``.txt`` report, ``/dev/zero``, a FIFO, symlinks
  out of the root (file and folder), ``../`` and absolute paths (``/etc/passwd``,
  ``/proc/self/environ``), an empty, a 3 MB and a Latin-1 report
- EHR: values ``1e39`` (finite in float64, inf in float32), ``inf``, ``-inf``, ``nan``,
  ``1e400``; bad CSVs (empty, header only, missing columns, binary, not UTF-8, bad times,
  a 20,000-column line, a wide table without ``Hours``)
- 2-D images: truncated and byte-flipped PNG/JPEG, a PNG declaring 60000 x 60000 pixels
- ids ``NA``, ``""``, ``null``, ``N/A``, ``None``, ``nan`` in the manifest and labels

Identity is planted everywhere a file can carry it: DICOM headers (PatientName, PatientID,
birth date, accession number, institution, physician), folder names and file names. The
tests grep every output, log line and Ray session log for :data:`Corpus.phi`.

Same seed, same bytes (every file; the manifest's one absolute path into the build folder aside:
checked by building twice). Nothing here imports raypipe's ingest code (the cohort writer only).
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

PYDICOM_DATA = os.path.join(os.path.dirname(__import__("pydicom").__file__), "data", "test_files")
NIBABEL_DATA = os.path.join(os.path.dirname(__import__("nibabel").__file__), "tests", "data")

#: DICOM sources and the configured modality each is listed under (its Modality must fit: no WrongModality noise)
DICOM_SOURCES = [("CT_small.dcm", "ct"), ("MR_small.dcm", "mr"), ("MR_small_RLE.dcm", "mr"), ("rtdose.dcm", "dose"),
                 ("JPEG2000.dcm", "nm")]
NIFTI_SOURCES = ["anatomical.nii", "example4d.nii.gz", "standard.nii.gz"]
#: ids pandas reads as missing by default
TRICKY_IDS = ["NA", "", "null", "N/A", "None", "nan"]

#: the modalities a fuzz run configures (``--set`` overrides), small sizes to keep it fast
FUZZ_OVERRIDES = [
    "ingest.modalities.ct.size=32", "ingest.modalities.pet.size=32",
    "ingest.modalities.mr.kind=volume", "ingest.modalities.mr.size=32", "ingest.modalities.mr.window=null",
    "ingest.modalities.dose.kind=volume", "ingest.modalities.dose.size=32", "ingest.modalities.dose.window=null",
    "ingest.modalities.nm.kind=volume", "ingest.modalities.nm.size=32", "ingest.modalities.nm.window=null",
    "ingest.modalities.xray.kind=image", "ingest.modalities.xray.size=32",
    "ingest.error_budget=1.0", "ingest.items_per_task=64",
    # 64 MB instead of 2 GB: the deflate bomb (256 MB inflated) trips the same check with 1/10 of the work
    "ingest.limits.max_file_bytes=67108864",
]

#: planted identity (unique strings that occur nowhere else): header values and path components
PLANTED = {
    "name": "Zqvrelle^Orrinthia",
    "mrn": "PHIMRN-7316-5520",
    "birth": "18991231",
    "accession": "ACCPHI88117733",
    "institution": "PHI INSTITUTE OF XYLOPHONY",
    "physician": "Dr^Vexlamund^Qorr",
    "folder": "Zqvrelle_Orrinthia_18991231_ACCPHI88117733",
    "file": "Orrinthia-Zqvrelle",
}


@dataclass
class Corpus:
    """What :func:`build` wrote: two cohorts, their manifests, and everything the tests look for."""

    manifest_cohort: str  # input folder with manifest.csv + labels.csv (hostile rows)
    scan_folder: str  # input folder without a manifest (a hostile export tree)
    manifest: pd.DataFrame  # the rows of manifest_cohort/manifest.csv (ids as strings) + their hostile category
    scan_files: int  # entries under scan_folder (files, links, FIFOs) that a scan must account for
    phi: list[str] = field(default_factory=list)  # every planted identifying value
    categories: dict[str, int] = field(default_factory=dict)  # hostile class -> files

    @property
    def n_files(self) -> int:
        return len(self.manifest) + self.scan_files


# ----------------------------------------------------------------------------- byte-level mutations
def truncate(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


def flip_bytes(data: bytes, rng: np.random.Generator, n: int, lo: int = 0, hi: int | None = None) -> bytes:
    """``n`` random bytes in ``[lo, hi)`` replaced by random values (each differs from the original)."""
    b = bytearray(data)
    hi = len(b) if hi is None else min(hi, len(b))
    for pos in rng.integers(lo, hi, size=n):
        b[pos] = (b[pos] + int(rng.integers(1, 256))) % 256
    return bytes(b)


def zero_header(data: bytes, n: int) -> bytes:
    return b"\0" * min(n, len(data)) + data[n:]


def flip_sop_class_vr(data: bytes, new_vr: bytes) -> bytes:
    """The VR of SOPClassUID (0008,0016), explicit VR little endian, replaced by ``new_vr``.

    With a 4-byte-length VR (OB, UN, UT, SQ) the reader takes two value bytes as the length and
    swallows the elements that follow (PatientName, PatientID, ...) into SOPClassUID's value."""
    tag = b"\x08\x00\x16\x00UI"
    pos = data.find(tag)
    assert pos >= 0, "source is not explicit VR little endian"
    return data[:pos + 4] + new_vr + data[pos + 6:]


# ----------------------------------------------------------------------------- DICOM
def _plant(ds, i: int = 0) -> None:
    ds.PatientName = PLANTED["name"]
    ds.PatientID = PLANTED["mrn"]
    ds.PatientBirthDate = PLANTED["birth"]
    ds.AccessionNumber = PLANTED["accession"]
    ds.InstitutionName = PLANTED["institution"]
    ds.ReferringPhysicianName = PLANTED["physician"]
    ds.OtherPatientIDs = PLANTED["mrn"]


def planted_dicom(src: str) -> bytes:
    """The bytes of ``src`` with the planted identity in its header (PHI before any mutation)."""
    import io

    import pydicom

    ds = pydicom.dcmread(src)
    _plant(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def dicom_declaring(src: str, **elements) -> bytes:
    """``src`` with header elements replaced (e.g. Rows=65535), pixel data left as it is."""
    import io

    import pydicom

    ds = pydicom.dcmread(src)
    _plant(ds)
    for k, v in elements.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def deflate_bomb(inflated_mb: int = 3072) -> bytes:
    """A Deflated Explicit VR Little Endian file (about 1 KB per inflated MB) whose dataset inflates to
    ``inflated_mb`` MB: CT_small's elements followed by one private OB element of zeros."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(os.path.join(PYDICOM_DATA, "CT_small.dcm"))
    _plant(ds)
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = comp.compress(body.getvalue())
    out += comp.compress(struct.pack("<HH", 0x0009, 0x1010) + b"OB\0\0" + struct.pack("<I", inflated_mb << 20))
    out += comp.flush(zlib.Z_FULL_FLUSH)
    # after a full flush the compressor forgets its history: one compressed MB of zeros, repeated, is valid
    block = comp.compress(b"\0" * (1 << 20)) + comp.flush(zlib.Z_FULL_FLUSH)
    return head.getvalue() + out + block * inflated_mb + comp.flush()


def rle_decoder_panic() -> bytes:
    """MR_small_RLE.dcm with one byte of its RLE stream changed (found by the seeded byte flips) so that
    pylibjpeg-rle's Rust decoder panics: ``pyo3_runtime.PanicException`` (a ``BaseException``, not an
    ``Exception``) "index out of bounds: the len is 8192 but the index is 8193"."""
    data = bytearray(planted_dicom(os.path.join(PYDICOM_DATA, "MR_small_RLE.dcm")))
    pixel_tag = data.rfind(b"\xe0\x7f\x10\x00")
    assert data[pixel_tag + 1766] == 245, "MR_small_RLE.dcm changed: find the byte again"
    data[pixel_tag + 1766] = 197
    return bytes(data)


# ----------------------------------------------------------------------------- NIfTI
def nifti_header_declaring(shape: tuple[int, ...], datatype: int = 16, bitpix: int = 32) -> bytes:
    """A valid NIfTI-1 single-file header (348 bytes + 4 extension bytes) declaring ``shape``, no data."""
    hdr = bytearray(352)
    struct.pack_into("<i", hdr, 0, 348)
    dims = [len(shape), *shape] + [1] * (7 - len(shape))
    struct.pack_into("<8h", hdr, 40, *dims)
    struct.pack_into("<h", hdr, 70, datatype)
    struct.pack_into("<h", hdr, 72, bitpix)
    struct.pack_into("<8f", hdr, 76, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", hdr, 108, 352.0)  # vox_offset
    struct.pack_into("<f", hdr, 112, 1.0)  # scl_slope
    struct.pack_into("<h", hdr, 254, 1)  # sform_code
    for row, off in ((0, 280), (1, 296), (2, 312)):
        vals = [0.0] * 4
        vals[row] = 1.0
        struct.pack_into("<4f", hdr, off, *vals)
    hdr[344:348] = b"n+1\0"
    return bytes(hdr)


def nifti_bytes(values: np.ndarray) -> bytes:
    import io

    import nibabel as nib

    img = nib.Nifti1Image(values.astype(np.float32), np.eye(4))
    buf = io.BytesIO()
    file_map = nib.Nifti1Image.make_file_map({"image": buf, "header": buf})
    img.to_file_map(file_map)
    return buf.getvalue()


def gzip_bomb(header: bytes, inflated_mb: int) -> bytes:
    """``header`` then ``inflated_mb`` MB of zeros, gzipped (a few hundred KB on disk)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = comp.compress(header)
    chunk = b"\0" * (1 << 20)
    for _ in range(inflated_mb):
        out += comp.compress(chunk)
    return out + comp.flush()


# ----------------------------------------------------------------------------- EHR
EHR_HEAD = "stay_id,charttime,variable,value\n"


def ehr_rows(rng: np.random.Generator, stay: int, bad_value: str | None = None) -> str:
    rows = []
    for h in range(0, 30, 3):
        t = f"2150-01-01 {h % 24:02d}:{int(rng.integers(0, 60)):02d}:00" if h < 24 else \
            f"2150-01-02 {h - 24:02d}:00:00"
        rows.append(f"{stay},{t},Heart Rate,{float(rng.normal(85, 8)):.1f}")
        rows.append(f"{stay},{t},Systolic blood pressure,{float(rng.normal(120, 10)):.1f}")
    if bad_value is not None:
        rows.insert(3, f"{stay},2150-01-01 05:00:00,Heart Rate,{bad_value}")
        rows.insert(5, f"{stay},2150-01-01 07:00:00,Glucose,{bad_value}")
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- the corpus
def build(root: str, seed: int = 0, synth_n: int = 6) -> Corpus:
    """Write the hostile corpus under ``root`` (created) and return what the tests need."""
    import pydicom

    from raypipe.synth.clinical import write_clinical_cohort

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    cohort = os.path.join(root, "cohort")
    outside = os.path.join(root, "outside")
    os.makedirs(outside)
    with open(os.path.join(outside, "secret.txt"), "w") as fh:
        fh.write(f"outside the input: {PLANTED['name']}\n")
    rows: list[tuple[str, str, str, str, str]] = []  # patient_id, modality, format, path, category
    categories: dict[str, int] = {}
    counter = [0]

    def add(category: str, modality: str, fmt: str, data: bytes | None, name: str, pid: str | None = None,
            rel: str | None = None) -> str:
        """Write ``data`` as one file of its own patient (unless ``pid``) and list it in the manifest."""
        counter[0] += 1
        pid = pid if pid is not None else f"FZ{counter[0]:04d}"
        if rel is None:
            rel = os.path.join("files", f"{counter[0]:04d}_{name}")
        if data is not None:
            full = os.path.join(cohort, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as fh:
                fh.write(data)
        rows.append((pid, modality, fmt, rel, category))
        categories[category] = categories.get(category, 0) + 1
        return rel

    # --- DICOM, from pydicom's files, identity planted first
    for src_name, modality in DICOM_SOURCES:
        src = os.path.join(PYDICOM_DATA, src_name)
        base = planted_dicom(src)
        add("dicom_intact", modality, "dicom", base, f"{PLANTED['file']}.dcm")
        for frac in (0.05, 0.2, 0.5, 0.8, 0.97):
            add("dicom_truncated", modality, "dicom", truncate(base, frac), "trunc.dcm")
        for k in range(5):
            add("dicom_byte_flip", modality, "dicom", flip_bytes(base, rng, 8), f"flip{k}.dcm")
        for k in range(2):  # flips inside the header only
            add("dicom_header_flip", modality, "dicom", flip_bytes(base, rng, 4, 128, 700), f"hflip{k}.dcm")
        for n in (132, 1024):
            add("dicom_zeroed_header", modality, "dicom", zero_header(base, n), "zeroed.dcm")
        if base.find(b"\x08\x00\x16\x00UI") >= 0:
            for vr in (b"OB", b"UN", b"UT", b"SQ", b"OW"):
                add("dicom_vr_flip_sop_class", modality, "dicom", flip_sop_class_vr(base, vr), "vrflip.dcm")
    for src_name, modality in (("MR_small_RLE.dcm", "mr"), ("MR_small.dcm", "mr"), ("CT_small.dcm", "ct")):
        add("dicom_huge_dimensions", modality, "dicom",
            dicom_declaring(os.path.join(PYDICOM_DATA, src_name), Rows=65535, Columns=65535), "huge.dcm")
    for src_name, modality in (("rtdose.dcm", "dose"), ("rtdose_rle.dcm", "dose"), ("MR_small.dcm", "mr")):
        add("dicom_huge_frames", modality, "dicom",
            dicom_declaring(os.path.join(PYDICOM_DATA, src_name), NumberOfFrames=2**31 - 1), "frames.dcm")
    add("dicom_deflate_bomb", "ct", "dicom", deflate_bomb(256), "deflated.dcm")
    add("dicom_rle_decoder_panic", "mr", "dicom", rle_decoder_panic(), "panic.dcm")
    # a hostile series: good and bad files of one patient's CT together (the group must not fail as a whole)
    group_pid = "FZGROUP01"
    ct = planted_dicom(os.path.join(PYDICOM_DATA, "CT_small.dcm"))
    for k, data in enumerate([ct, truncate(ct, 0.5), flip_sop_class_vr(ct, b"OB"), zero_header(ct, 400)]):
        add("dicom_mixed_series", "ct", "dicom", data, f"series{k}.dcm", pid=group_pid,
            rel=os.path.join("files", PLANTED["folder"], f"{PLANTED['file']}_{k}.dcm"))

    # --- NIfTI, from nibabel's files
    for src_name in NIFTI_SOURCES:
        data = open(os.path.join(NIBABEL_DATA, src_name), "rb").read()
        ext = ".nii.gz" if src_name.endswith(".gz") else ".nii"
        add("nifti_intact", "pet", "nifti", data, f"intact{ext}")
        raw = gzip.decompress(data) if ext == ".nii.gz" else data
        for frac in (0.1, 0.5, 0.9):
            cut = truncate(raw, frac)
            add("nifti_truncated", "pet", "nifti", gzip.compress(cut, 1, mtime=0) if ext == ".nii.gz" else cut,
                f"trunc{ext}")
        add("nifti_truncated_gzip", "pet", "nifti", truncate(gzip.compress(raw, 1, mtime=0), 0.6), "cutgz.nii.gz")
        for k in range(4):
            bad = flip_bytes(raw, rng, 3, 0, 348)
            add("nifti_header_flip", "pet", "nifti", gzip.compress(bad, 1, mtime=0) if ext == ".nii.gz" else bad,
                f"hflip{k}{ext}")
    huge = nifti_header_declaring((1024, 1024, 1024))
    add("nifti_huge_header", "pet", "nifti", huge, "huge.nii")
    add("nifti_huge_header", "pet", "nifti", gzip.compress(huge, mtime=0), "huge.nii.gz")
    add("nifti_huge_header", "pet", "nifti", nifti_header_declaring((32767, 32767, 32767, 32767)), "huge4d.nii")
    add("nifti_gzip_bomb", "pet", "nifti", gzip_bomb(nifti_header_declaring((2048, 2048, 2048)), 64), "bomb.nii.gz")
    # a small declared volume followed by 64 MB of zeros the header does not declare: read only what is declared
    add("nifti_gzip_trailing_bomb", "pet", "nifti", gzip_bomb(nifti_header_declaring((32, 32, 16)), 64),
        "bomb2.nii.gz")
    vol = rng.normal(size=(16, 16, 8)).astype(np.float32)
    for what, value in (("nan", np.nan), ("inf", np.inf)):
        v = vol.copy()
        v[4:6, 4:6, 3] = value
        add("nifti_non_finite", "pet", "nifti", nifti_bytes(v), f"{what}.nii")
    add("nifti_non_finite", "pet", "nifti", nifti_bytes(np.full((8, 8, 4), np.nan, np.float32)), "allnan.nii")

    # --- reports
    add("report_intact", "report", "text", b"No acute findings. Lungs clear.\n", "report.txt")
    add("report_is_dicom", "report", "text", ct, "report_dicom.txt")
    png = _png(rng, 16, 16)
    add("report_is_binary", "report", "text", png, "report_png.txt")
    add("report_empty", "report", "text", b"", "empty.txt")
    add("report_huge", "report", "text", (b"word " * 200_000 + b"\n") * 3, "huge.txt")
    add("report_latin1", "report", "text", "Pleurale Verdickung, kein Erguss. \xe9\xe8\n".encode("latin-1"),
        "latin1.txt")
    for rel in ("../outside/secret.txt", "../../outside/secret.txt", "files/../../outside/secret.txt"):
        add("path_dotdot", "report", "text", None, "", rel=rel)
    for rel in ("/etc/passwd", "/proc/self/environ", os.path.join(outside, "secret.txt"), "/dev/zero"):
        add("path_absolute", "report", "text", None, "", rel=rel)
    links = os.path.join(cohort, "links")
    os.makedirs(links, exist_ok=True)
    os.symlink("/dev/zero", os.path.join(links, "zero.txt"))
    add("symlink_dev_zero", "report", "text", None, "", rel="links/zero.txt")
    os.symlink(os.path.join(outside, "secret.txt"), os.path.join(links, "secret.txt"))
    add("symlink_out", "report", "text", None, "", rel="links/secret.txt")
    os.symlink(outside, os.path.join(links, "outdir"))
    add("symlink_out_folder", "report", "text", None, "", rel="links/outdir/secret.txt")
    os.symlink("/proc/self", os.path.join(links, "proc"))
    add("symlink_out_folder", "report", "text", None, "", rel="links/proc/environ")
    os.mkfifo(os.path.join(links, "fifo.txt"))
    add("fifo", "report", "text", None, "", rel="links/fifo.txt")
    os.mkfifo(os.path.join(links, "fifo.dcm"))
    add("fifo", "ct", "dicom", None, "", rel="links/fifo.dcm")
    add("missing_file", "report", "text", None, "", rel="files/does_not_exist.txt")
    add("missing_file", "ct", "dicom", None, "", rel="files/does_not_exist.dcm")
    add("folder_as_file", "report", "text", None, "", rel="links")
    add("unknown_format", "report", "", b"plain words\n", "report.weird")

    # --- EHR
    for bad in ("1e39", "-1e39", "inf", "-inf", "nan", "1e400", "NaN", "Infinity", "1e308", "12abc"):
        add("ehr_bad_value", "ehr", "csv", (EHR_HEAD + ehr_rows(rng, 300000 + counter[0], bad)).encode(), "ehr.csv")
    add("ehr_intact", "ehr", "csv", (EHR_HEAD + ehr_rows(rng, 301000)).encode(), "ehr.csv")
    bad_csvs = {
        "empty": b"",
        "header_only": EHR_HEAD.encode(),
        "missing_columns": b"stay_id,value\n1,2\n",
        "binary": bytes(rng.integers(0, 256, 4096, dtype=np.uint8)),
        "not_utf8": (EHR_HEAD + "1,2150-01-01 00:00:00,Heart Rate,\xff\xfe80\n").encode("latin-1"),
        "bad_times": (EHR_HEAD + "1,yesterday,Heart Rate,80\n1,9999-99-99 99:99,Heart Rate,81\n").encode(),
        "wide_line": (EHR_HEAD + ",".join(["1"] * 20000) + "\n").encode(),
        "wide_no_hours": b"Heart Rate,Glucose\n80,100\n",
        "quotes": (EHR_HEAD + '1,"2150-01-01 00:00:00,Heart Rate,"80\n').encode(),
        "dicom_as_csv": ct,
    }
    for name, data in bad_csvs.items():
        add("ehr_bad_csv", "ehr", "csv", data, f"{name}.csv")

    # --- 2-D images
    good_png = _png(rng, 24, 24)
    add("image_intact", "xray", "png", good_png, "xray.png")
    for frac in (0.3, 0.7):
        add("image_truncated", "xray", "png", truncate(good_png, frac), "trunc.png")
    add("image_byte_flip", "xray", "png", flip_bytes(good_png, rng, 6, 8), "flip.png")
    add("image_huge_dimensions", "xray", "png", _png_declaring(60000, 60000), "huge.png")
    jpg = _jpeg(rng)
    add("image_truncated", "xray", "jpeg", truncate(jpg, 0.5), "trunc.jpg")
    add("image_byte_flip", "xray", "jpeg", flip_bytes(jpg, rng, 6, 2), "flip.jpg")

    # --- ids pandas reads as missing; a modality nobody configured
    for k, pid in enumerate(TRICKY_IDS):
        add("tricky_id", "report", "text", f"Report for a patient with an odd id ({k}).\n".encode(), f"id{k}.txt",
            pid=pid)
    add("unconfigured_modality", "ultrasound", "text", b"not configured\n", "us.txt")

    # --- a synthetic cohort, identity planted in headers, folder names and file names
    syn = os.path.join(root, "synthetic")
    write_clinical_cohort(syn, n=synth_n, seed=seed, slices=4, image_size=16)
    syn_manifest = pd.read_csv(os.path.join(syn, "manifest.csv"), dtype=str)
    syn_ids = sorted(set(syn_manifest["patient_id"]))
    for r in syn_manifest.itertuples(index=False):
        src = os.path.join(syn, r.path)
        parts = r.path.split(os.sep)
        # patients/case_00001/ct/x.dcm -> synthetic/<PHI folder>/<patient id>/ct/<PHI file>_x.dcm
        new_rel = os.path.join("synthetic", PLANTED["folder"], r.patient_id, *parts[2:-1],
                               f"{PLANTED['file']}_{parts[-1]}")
        dst = os.path.join(cohort, new_rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if r.format == "dicom":
            ds = pydicom.dcmread(src)
            _plant(ds)
            ds.PatientID = r.patient_id  # the id the manifest uses: must appear only as its pseudonym
            ds.save_as(dst, enforce_file_format=False)
        else:
            shutil.copy(src, dst)
        rows.append((r.patient_id, r.modality, r.format, new_rel, "synthetic_planted_phi"))
        categories["synthetic_planted_phi"] = categories.get("synthetic_planted_phi", 0) + 1

    manifest = pd.DataFrame(rows, columns=["patient_id", "modality", "format", "path", "category"])
    manifest.drop(columns="category").to_csv(os.path.join(cohort, "manifest.csv"), index=False)
    labels = pd.read_csv(os.path.join(syn, "labels.csv"), dtype={"patient_id": str})
    fz = sorted(set(manifest["patient_id"]) - set(syn_ids) - {""})
    extra = pd.DataFrame({"patient_id": fz, "label": [i % 2 for i in range(len(fz))],
                          "site": "site0", "sex": ["M", "F"] * (len(fz) // 2) + ["M"] * (len(fz) % 2),
                          "age": 60})
    pd.concat([labels, extra], ignore_index=True).to_csv(os.path.join(cohort, "labels.csv"), index=False)
    shutil.rmtree(syn)

    # --- a hostile export tree without a manifest (for scan / ingest --input)
    tree = os.path.join(root, "export")
    n_tree = _export_tree(tree, outside, rng)

    phi = sorted({*PLANTED.values(), *[i for i in syn_ids if len(i) >= 6],
                  "PHIMRN", "Orrinthia", "Zqvrelle", "XYLOPHONY", "Vexlamund"})
    return Corpus(cohort, tree, manifest.astype(str), n_tree, phi, dict(sorted(categories.items())))


def _export_tree(tree: str, outside: str, rng: np.random.Generator) -> int:
    """A PACS-style export: PHI-named folders and files, hostile DICOM among good ones, links, a FIFO."""
    import pydicom

    n = 0
    pdir = os.path.join(tree, PLANTED["folder"], "STUDY_" + PLANTED["accession"])
    os.makedirs(pdir)
    for k, (src_name, _) in enumerate(DICOM_SOURCES):
        ds = pydicom.dcmread(os.path.join(PYDICOM_DATA, src_name))
        _plant(ds)
        ds.save_as(os.path.join(pdir, f"{PLANTED['file']}_{k}"), enforce_file_format=False)  # no extension
        n += 1
    ct = planted_dicom(os.path.join(PYDICOM_DATA, "CT_small.dcm"))
    hostile = {"trunc.dcm": truncate(ct, 0.3), "vr.dcm": flip_sop_class_vr(ct, b"OB"),
               "vr_un.dcm": flip_sop_class_vr(ct, b"UN"), "vr_ut": flip_sop_class_vr(ct, b"UT"),
               "zero.dcm": zero_header(ct, 300),
               "flip.dcm": flip_bytes(ct, rng, 8), "IM_noext_trunc": truncate(ct, 0.6),
               "huge_rle.dcm": dicom_declaring(os.path.join(PYDICOM_DATA, "MR_small_RLE.dcm"), Rows=65535,
                                               Columns=65535)}
    for name, data in hostile.items():
        with open(os.path.join(pdir, name), "wb") as fh:
            fh.write(data)
        n += 1
    with open(os.path.join(pdir, "report.txt"), "w") as fh:
        fh.write("Findings unremarkable.\n")
    with open(os.path.join(pdir, f"{PLANTED['file']}.pdf"), "wb") as fh:
        fh.write(b"%PDF-1.4 not really\n")
    with open(os.path.join(tree, "notes.txt"), "wb") as fh:
        fh.write(ct)  # DICOM bytes named .txt, at the root: nobody's report
    n += 3
    os.symlink(os.path.join(outside, "secret.txt"), os.path.join(pdir, "link.txt"))
    os.symlink(outside, os.path.join(tree, "outdir"))
    os.symlink("/dev/zero", os.path.join(tree, "zero.dcm"))
    os.mkfifo(os.path.join(pdir, "fifo.dcm"))
    n += 4
    return n


def _png(rng: np.random.Generator, h: int, w: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(rng: np.random.Generator) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _png_declaring(w: int, h: int) -> bytes:
    """A PNG whose IHDR declares ``w`` x ``h`` 8-bit grey pixels, with a tiny IDAT (a decompression bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")

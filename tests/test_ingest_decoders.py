"""Format decoders without Ray: files no one here wrote, hand-built fixtures, and the synthetic cohort's files."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pandas as pd
import pytest

from raypipe.ingest import dicom, ehr, geotiff, image2d, nifti, report, tabular
from raypipe.ingest.common import DecodeError, select_indices

# ----------------------------------------------------------------------------- fixture writers


def write_slice(path, hu, z=0.0, instance=1, series="1.2.3.4", modality="CT", iop=(1, 0, 0, 0, 1, 0),
                ipp=None, slope=1.0, intercept=-1024.0, extra=None, phi=True):
    """One single-frame DICOM slice whose stored values give ``hu`` after the rescale."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID = series, series + ".9"
    ds.Modality = modality
    if phi:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN-774411", "19410203"
    ds.InstanceNumber = instance
    ds.ImageOrientationPatient = list(iop)
    if ipp is not False:
        ds.ImagePositionPatient = list(ipp) if ipp is not None else [0.0, 0.0, float(z)]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 2.5
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.PixelData = np.round((np.asarray(hu, float) - intercept) / slope).astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _pydicom_files():
    """Every file shipped in pydicom/data/test_files (local only: nothing is downloaded)."""
    import pydicom

    root = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
    return sorted(glob.glob(os.path.join(root, "*")))


def _nibabel_files():
    import nibabel

    root = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")
    return sorted(f for f in glob.glob(os.path.join(root, "*")) if f.endswith((".nii", ".nii.gz", ".hdr", ".img")))


# ----------------------------------------------------------------------------- shared pieces
@pytest.mark.parametrize("policy,n,expect", [
    ("all", 5, [0, 1, 2, 3, 4]), ("every_k", 7, [0, 3, 6]), ("central", 10, [3, 4, 5, 6]),
    ("even", 10, [0, 3, 6, 9]), ("even", 3, [0, 1, 2]), ("central", 2, [0, 1]), ("even", 0, []),
])
def test_select_indices(policy, n, expect):
    assert select_indices(n, policy, count=4, k=3) == expect


# ----------------------------------------------------------------------------- DICOM: files no one here wrote
def test_ct_small_hu_matches_pydicom_modality_lut():
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    expected = apply_modality_lut(ds.pixel_array, ds)
    # our rescale (own slope/intercept code) against pydicom's reference implementation
    np.testing.assert_allclose(dicom.hounsfield(path), expected)
    # the whole decode path at native size: window [-1000, 400] of those HU, nothing else
    img, meta = dicom.decode_slice(path, ds.Rows, (-1000, 400))
    np.testing.assert_allclose(img[0], np.clip((expected + 1000) / 1400, 0, 1), atol=1e-6)
    assert meta["units"] == "HU" and meta["window"] == [-1000, 400]
    small, _ = dicom.decode_slice(path, 32, (-1000, 400))
    assert small.shape == (1, 32, 32) and small.dtype == np.float32 and 0 <= small.min() and small.max() <= 1
    text = json.dumps(meta)
    for value in (str(ds.PatientName), str(ds.PatientID)):
        assert value not in text


def test_every_shipped_pydicom_file_decodes_or_is_quarantined():
    files = _pydicom_files()
    assert len(files) > 50
    outcomes = {}
    for f in files:
        try:
            h = dicom.read_header(f)
            for frame in ([None] if h.frames == 1 else range(h.frames)):
                img, _ = dicom.decode_slice(f, 16, None, frame=frame)
                assert img.shape == (1, 16, 16) and np.isfinite(img).all()
            outcomes[os.path.basename(f)] = "ok"
        except DecodeError as e:  # anything else is a crash and fails the test
            assert e.error_class and len(str(e)) > 10
            outcomes[os.path.basename(f)] = e.error_class
    classes = set(outcomes.values())
    assert sum(v == "ok" for v in outcomes.values()) > 15
    assert {"CorruptHeader", "NoPixelData", "UnsupportedPhotometric"} <= classes
    assert outcomes["CT_small.dcm"] == "ok" and outcomes["rtdose.dcm"] == "ok"  # 15-frame file, every frame
    assert outcomes["MR_truncated.dcm"] in ("TruncatedFile", "CorruptPixelData")
    # YBR_FULL_422 and deflated files are not mistaken for truncated ones
    assert outcomes["SC_ybr_full_422_uncompressed.dcm"] == "UnsupportedPhotometric"
    assert outcomes["image_dfl.dcm"] != "TruncatedFile"


def _has_dicom_extra() -> bool:
    try:
        import libjpeg  # noqa: F401
        import openjpeg  # noqa: F401
        import pylibjpeg  # noqa: F401
        import rle  # noqa: F401
    except ImportError:
        return False
    return True


#: pydicom's shipped grayscale files in compressed syntaxes (RGB ones are UnsupportedPhotometric anyway)
COMPRESSED_GRAY = {
    "JPGExtended.dcm": "1.2.840.10008.1.2.4.51",  # JPEG Extended, 12 bit
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "JPEGLSNearLossless_08.dcm": "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "JPEGLSNearLossless_16.dcm": "1.2.840.10008.1.2.4.81",
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "J2K_pixelrep_mismatch.dcm": "1.2.840.10008.1.2.4.90",
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "693_J2KI.dcm": "1.2.840.10008.1.2.4.91",
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE lossless
    "rtdose_rle.dcm": "1.2.840.10008.1.2.5",  # RLE, 15 frames
}


def _jpeg_baseline_ct(path, hu_u8):
    """A JPEG baseline (8-bit) grayscale CT slice: the JPEG made by Pillow, encapsulated by pydicom."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    write_slice(path, np.zeros(hu_u8.shape), slope=1.0, intercept=-1024.0)
    import pydicom

    ds = pydicom.dcmread(path)
    buf = io.BytesIO()
    Image.fromarray(hu_u8, mode="L").save(buf, format="JPEG", quality=95)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.skipif(not _has_dicom_extra(), reason="the dicom extra (pylibjpeg plugins) is not installed")
def test_compressed_syntaxes_decode_with_the_dicom_extra(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    for name, uid in COMPRESSED_GRAY.items():
        path = get_testdata_file(name)
        h = dicom.read_header(path)
        assert h.transfer_syntax == uid, name
        for frame in ([None] if h.frames == 1 else range(h.frames)):
            img, meta = dicom.decode_slice(path, 16, None, frame=frame)
            assert img.shape == (1, 16, 16) and np.isfinite(img).all(), name
    # lossless syntaxes give exactly the uncompressed file's values
    reference = dicom.hounsfield(get_testdata_file("MR_small.dcm"))
    for name in ("MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"):
        np.testing.assert_array_equal(dicom.hounsfield(get_testdata_file(name)), reference, err_msg=name)
    # a JPEG baseline CT slice written here (pydicom ships only RGB ones): the lossy values come back
    u8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    path = _jpeg_baseline_ct(str(tmp_path / "jpeg.dcm"), u8)
    assert str(pydicom.dcmread(path).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.50"
    hu = dicom.hounsfield(path)
    assert np.abs(hu - (u8.astype(float) - 1024)).max() <= 4  # JPEG quality 95
    img, _ = dicom.decode_slice(path, 32, (-1024, -769))
    assert img.shape == (1, 32, 32) and img.min() < 0.05 and img.max() > 0.95
    # a JPEG that even the installed decoders cannot read is the data's fault, not a missing extra
    with pytest.raises(DecodeError) as info:
        dicom.decode_slice(get_testdata_file("JPEG-lossy.dcm"), 16, None)
    assert info.value.error_class == "CorruptPixelData" and "pylibjpeg" in str(info.value)


_BLOCK_PLUGINS = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("pylibjpeg", "libjpeg", "openjpeg", "rle", "gdcm", "jpeg_ls"):
            raise ImportError("blocked for the test: " + name)
sys.meta_path.insert(0, Block())
from pydicom.data import get_testdata_file
from raypipe.ingest import dicom
from raypipe.ingest.common import DecodeError
out = {}
for name in sys.argv[1:]:
    path = get_testdata_file(name)
    for step in ("header", "decode"):
        try:
            dicom.read_header(path) if step == "header" else dicom.decode_slice(path, 16, None)
            out[name + ":" + step] = ["ok", ""]
        except DecodeError as e:
            out[name + ":" + step] = [e.error_class, str(e)]
print(json.dumps(out))
"""


def test_compressed_syntax_without_the_dicom_extra_is_quarantined_naming_syntax_and_extra():
    """Runs whether or not the extra is installed: a child process hides the plugins from pydicom."""
    import subprocess
    import sys

    names = ["MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm", "JPGExtended.dcm", "MR_small_RLE.dcm"]
    res = subprocess.run([sys.executable, "-c", _BLOCK_PLUGINS, *names], capture_output=True, text=True,
                         timeout=120, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name, uid, syntax in (("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", "JPEG-LS Lossless"),
                              ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81", "JPEG-LS Lossy")):
        for step in ("header", "decode"):  # no decoder at all: caught by the header read already
            cls, msg = out[f"{name}:{step}"]
            assert cls == "UnsupportedTransferSyntax", (name, step, msg)
            assert uid in msg and syntax in msg and "raypipe[dicom]" in msg, msg
    # 12-bit JPEG Extended: Pillow is installed but cannot decode 12 bits -> still the extra's job
    cls, msg = out["JPGExtended.dcm:decode"]
    assert cls == "UnsupportedTransferSyntax" and "1.2.840.10008.1.2.4.51" in msg and "raypipe[dicom]" in msg
    assert out["JPGExtended.dcm:header"][0] == "ok"  # a decoder (Pillow) exists for the syntax
    assert out["MR_small_RLE.dcm:decode"][0] == "ok"  # pydicom's own RLE decoder needs no extra


def test_multiframe_rtdose_frames_decode_individually():
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("rtdose.dcm")
    h = dicom.read_header(path)
    assert h.frames == 15
    ds = pydicom.dcmread(path)
    full = ds.pixel_array * float(ds.DoseGridScaling)  # raw frames; our decode applies no dose scaling
    for f in (0, 7, 14):
        raw = dicom.hounsfield(path, frame=f)
        np.testing.assert_allclose(raw, ds.pixel_array[f])
        assert raw.shape == full[f].shape
    with pytest.raises(DecodeError, match="frame=15, frames="):
        dicom.decode_slice(path, 8, None, frame=15)


def test_native_fast_path_equals_pydicom_pixel_array(tmp_path):
    import pydicom

    checked = 0
    for f in _pydicom_files():
        try:
            ds = pydicom.dcmread(f)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except Exception:  # noqa: BLE001 - not DICOM (or malformed): nothing to compare
            continue
        fast = dicom.native_frame(ds, 0 if frames > 1 else None)
        if fast is None:
            continue
        try:
            ref = ds.pixel_array
        except Exception:  # noqa: BLE001 - pydicom cannot decode it either
            continue
        np.testing.assert_array_equal(fast, ref[0] if frames > 1 else ref, err_msg=os.path.basename(f))
        assert fast.dtype.kind == ref.dtype.kind
        checked += 1
    assert checked >= 8
    # 12 of 16 bits stored, signed, with garbage in the unused high bits: masked and sign-extended
    p = write_slice(str(tmp_path / "b12.dcm"), np.zeros((4, 4)), intercept=0.0)
    ds = pydicom.dcmread(p)
    ds.BitsStored, ds.HighBit = 12, 11
    vals = np.array([-2048, -1, 0, 2047] * 4, np.int16).reshape(4, 4)
    ds.PixelData = ((vals.astype(np.uint16) & 0x0FFF) | 0xA000).astype("<u2").tobytes()
    ds.save_as(p)
    ds = pydicom.dcmread(p)
    np.testing.assert_array_equal(dicom.native_frame(ds), vals)
    np.testing.assert_array_equal(dicom.native_frame(ds), ds.pixel_array)


# ----------------------------------------------------------------------------- DICOM: hand-built series
def _volume(n=6, size=8):
    return [np.full((size, size), -1000.0 + 150.0 * z) for z in range(n)]  # HU rises with z


def test_series_order_by_position_not_instance_or_name(tmp_path):
    rng = np.random.default_rng(0)
    vol = _volume()
    instances = rng.permutation(len(vol)) + 1
    paths = [write_slice(str(tmp_path / f"{rng.integers(1e9):09d}.dcm"), hu, z=2.5 * z - 50, instance=int(i))
             for z, (hu, i) in enumerate(zip(vol, instances))]
    headers = [dicom.read_header(p, {"CT"}) for p in reversed(paths)]
    ordered = dicom.order_slices(dicom.slice_refs(headers))
    assert [r.position for r in ordered] == sorted(r.position for r in ordered)
    hu = [float(dicom.hounsfield(r.path).mean()) for r in ordered]
    np.testing.assert_allclose(hu, [v.mean() for v in vol])
    assert [r.instance for r in ordered] != sorted(r.instance for r in ordered)


def test_flipped_orientation_still_inferior_to_superior(tmp_path):
    vol = _volume(4)
    # column direction flipped: row x col points to -z; positions must still order by increasing z
    paths = [write_slice(str(tmp_path / f"s{z}.dcm"), hu, z=10.0 * z, instance=4 - z, iop=(1, 0, 0, 0, -1, 0))
             for z, hu in enumerate(vol)]
    ordered = dicom.order_slices(dicom.slice_refs([dicom.read_header(p) for p in paths]))
    assert [r.path for r in ordered] == paths


def test_instance_number_fallback_without_geometry(tmp_path):
    vol = _volume(3)
    paths = [write_slice(str(tmp_path / f"s{z}.dcm"), hu, instance=[3, 1, 2][z], ipp=False) for z, hu in enumerate(vol)]
    ordered = dicom.order_slices(dicom.slice_refs([dicom.read_header(p) for p in paths]))
    assert [r.instance for r in ordered] == [1, 2, 3]


def test_enhanced_multiframe_frames_ordered_by_per_frame_position(tmp_path):
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = meta.MediaStorageSOPClassUID, generate_uid(), "1.2.9"
    ds.Modality = "CT"
    ds.NumberOfFrames, ds.Rows, ds.Columns = 3, 4, 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared, orient, pvt = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    pvt.RescaleSlope, pvt.RescaleIntercept = 2.0, -1000.0
    shared.PlaneOrientationSequence, shared.PixelValueTransformationSequence = [orient], [pvt]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for z in (20.0, 0.0, 10.0):  # stored out of anatomical order
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, z]
        item.PlanePositionSequence = [pos]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    stored = np.stack([np.full((4, 4), v, np.uint16) for v in (300, 100, 200)])
    ds.PixelData = stored.tobytes()
    path = str(tmp_path / "enhanced.dcm")
    ds.save_as(path, enforce_file_format=True)
    h = dicom.read_header(path, {"CT"})
    assert h.frames == 3 and h.frame_positions == [20.0, 0.0, 10.0]
    ordered = dicom.order_slices(dicom.slice_refs([h]))
    assert [r.frame for r in ordered] == [1, 2, 0]
    # rescale from the shared functional groups: 2 * stored - 1000
    assert [float(dicom.hounsfield(path, r.frame).mean()) for r in ordered] == [-800.0, -600.0, -400.0]


def test_header_pass_quarantines_wrong_modality_truncated_and_not_dicom(tmp_path):
    mr = write_slice(str(tmp_path / "mr.dcm"), np.zeros((8, 8)), modality="MR")
    with pytest.raises(DecodeError) as e:
        dicom.read_header(mr, {"CT"})
    assert e.value.error_class == "WrongModality" and "MR" in str(e.value)
    full = open(write_slice(str(tmp_path / "ok.dcm"), np.zeros((64, 64))), "rb").read()
    (tmp_path / "trunc.dcm").write_bytes(full[:-1000])
    with pytest.raises(DecodeError) as e:
        dicom.read_header(str(tmp_path / "trunc.dcm"))
    assert e.value.error_class == "TruncatedFile"
    (tmp_path / "x.dcm").write_text("hello, not an image")
    with pytest.raises(DecodeError) as e:
        dicom.read_header(str(tmp_path / "x.dcm"))
    assert e.value.error_class == "CorruptHeader"
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(DecodeError):
        dicom.read_header(str(tmp_path / "empty.dcm"))


def test_error_messages_never_quote_phi(tmp_path):
    import pydicom
    from pydicom.dataelem import DataElement

    # a malformed rescale value that happens to hold the patient's name: the message must not quote it
    p = write_slice(str(tmp_path / "bad.dcm"), np.zeros((8, 8)))
    ds = pydicom.dcmread(p)
    ds[0x00281053] = DataElement(0x00281053, "LO", "Doe^Jane")
    ds.save_as(p)
    with pytest.raises(DecodeError) as e:
        dicom.decode_slice(p, 8, None)
    assert "Doe^Jane" not in str(e.value) and "MRN-774411" not in str(e.value)


def _pet(tmp_path, **over):
    from pydicom.dataset import Dataset

    info = Dataset()
    info.RadiopharmaceuticalStartTime = "100000"
    info.RadionuclideTotalDose = 370e6
    info.RadionuclideHalfLife = 6586.2
    extra = {"Units": "BQML", "DecayCorrection": "START", "SeriesTime": "110000", "PatientWeight": 70.0,
             "RadiopharmaceuticalInformationSequence": [info]}
    extra.update(over)
    extra = {k: v for k, v in extra.items() if v is not None}
    activity = np.full((4, 4), 5000.0)  # Bq/ml
    return write_slice(str(tmp_path / "pet.dcm"), activity, modality="PT", slope=1.0, intercept=0.0, extra=extra)


def test_pet_suvbw_from_tags_and_flag_when_missing(tmp_path):
    import pydicom

    path = _pet(tmp_path)
    ds = pydicom.dcmread(path)
    values, meta = dicom.physical_values(ds, ds.pixel_array)
    decayed = 370e6 * 2 ** (-3600 / 6586.2)
    np.testing.assert_allclose(values, 5000.0 * 70_000 / decayed, rtol=1e-9)
    assert meta["units"] == "SUVbw" and meta["suv"] is True
    ds.DecayCorrection = "ADMIN"  # already decay-corrected to the injection: no decay factor
    values, _ = dicom.physical_values(ds, ds.pixel_array)
    np.testing.assert_allclose(values, 5000.0 * 70_000 / 370e6, rtol=1e-9)
    path = _pet(tmp_path, PatientWeight=None)
    ds = pydicom.dcmread(path)
    values, meta = dicom.physical_values(ds, ds.pixel_array)
    assert meta["suv"] is False and "PatientWeight" in meta["suv_missing"] and meta["units"] == "BQML"
    np.testing.assert_allclose(values, 5000.0)  # activity, unchanged


def test_synthetic_ct_order_and_hu(clinical_cohort):
    root, _ = clinical_cohort
    folder = sorted(glob.glob(os.path.join(root, "patients", "*", "ct")))[0]
    headers = [dicom.read_header(f, {"CT"}) for f in glob.glob(os.path.join(folder, "*.dcm"))]
    ordered = dicom.order_series(headers)
    z = [h.position for h in ordered]
    assert z == sorted(z) and len(set(z)) == len(z)
    assert [h.instance for h in ordered] != sorted(h.instance for h in ordered)  # not InstanceNumber order
    hu = dicom.hounsfield(ordered[0].path)
    assert hu.min() == pytest.approx(-1024, abs=1)  # air, only after the rescale intercept
    assert -1100 < np.median(hu) < -500


def test_synthetic_pet_suv(clinical_cohort):
    import pydicom

    root, _ = clinical_cohort
    files = glob.glob(os.path.join(root, "patients", "*", "pet", "*.dcm"))
    with_weight = [f for f in files if "PatientWeight" in pydicom.dcmread(f, stop_before_pixels=True)]
    ds = pydicom.dcmread(with_weight[0])
    values, meta = dicom.physical_values(ds, ds.pixel_array)
    assert meta["units"] == "SUVbw" and meta["suv"] is True
    body = values[values > 0.3]
    assert 0.6 < np.median(body) < 1.2  # synthetic background uptake is 0.8 SUV


# ----------------------------------------------------------------------------- NIfTI
def test_every_shipped_nibabel_file_decodes_or_is_quarantined():
    files = _nibabel_files()
    assert len(files) > 5
    ok = 0
    for f in files:
        try:
            out = nifti.decode_volume(f, 16, None, count=4)
            assert out and all(img.shape == (1, 16, 16) and np.isfinite(img).all() for _, img, _ in out)
            ok += 1
        except DecodeError as e:
            assert e.error_class and str(e)
    assert ok >= 3


def test_nifti_reoriented_to_ras_4d_frame_and_nan(tmp_path):
    import nibabel as nib

    data = np.arange(4 * 5 * 6 * 2, dtype=np.float32).reshape(4, 5, 6, 2)
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])  # L->R and A->P flipped: LPS-like storage
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "v.nii.gz"))
    vol, meta = nifti.load_volume(str(tmp_path / "v.nii.gz"), frame=1)
    assert meta["orientation"] == "RAS" and vol.shape == (6, 5, 4)
    np.testing.assert_array_equal(vol, np.transpose(data[::-1, ::-1, :, 1], (2, 1, 0)))
    with pytest.raises(DecodeError, match="frame=2, frames=2"):
        nifti.load_volume(str(tmp_path / "v.nii.gz"), frame=2)
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)  # scaling must be applied
    nib.save(img, str(tmp_path / "s.nii"))
    vol, _ = nifti.load_volume(str(tmp_path / "s.nii"))
    np.testing.assert_allclose(vol, 10.5)
    nan = np.ones((4, 4, 4), np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "n.nii.gz"))
    with pytest.raises(DecodeError) as e:
        nifti.decode_volume(str(tmp_path / "n.nii.gz"), 8, None)
    assert e.value.error_class == "NonFinite"
    slices = nifti.decode_volume(str(tmp_path / "v.nii.gz"), 8, None, policy="central", count=2)
    assert [m["slice_index"] for _, _, m in slices] == [2, 3] and [p for p, _, _ in slices] == [0, 1]


def test_nifti_synthetic_pet_reoriented(clinical_cohort):
    import nibabel as nib

    root, _ = clinical_cohort
    path = glob.glob(os.path.join(root, "patients", "*", "pet.nii.gz"))[0]
    vol, meta = nifti.load_volume(path)
    canonical = nib.as_closest_canonical(nib.load(path))
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S") and meta["orientation"] == "RAS"
    np.testing.assert_allclose(vol, np.transpose(canonical.get_fdata(), (2, 1, 0)), rtol=1e-5)


# ----------------------------------------------------------------------------- EHR
def test_ehr_tensor_shape_mapping_and_masks(clinical_cohort):
    root, _ = clinical_cohort
    path = glob.glob(os.path.join(root, "patients", "*", "ehr.csv"))[0]
    x, meta = ehr.discretise(path, 2.0, 48.0)
    assert x.shape == (24, 76) and ehr.N_FEATURES == 76
    assert meta["unknown_values"] == 0
    masks = x[:, ehr.MASK_OFFSET:]
    assert set(np.unique(masks)) <= {0.0, 1.0} and masks.sum() > 0
    for var, cats in ehr.CATEGORIES.items():  # exactly one category active per step
        block = x[:, ehr.START[var]:ehr.START[var] + len(cats)]
        np.testing.assert_array_equal(block.sum(1), np.ones(24))


@pytest.mark.parametrize("variable,text,listed", [
    ("Glascow coma scale eye opening", "To Pain", "To Pain"),
    ("Glascow coma scale eye opening", "to pain", "To Pain"),
    ("Glascow coma scale eye opening", "2 To Pain", "2 To pain"),
    ("Glascow coma scale motor response", "3 Abnormal Flexion", "3 Abnorm flexion"),
    ("Glascow coma scale verbal response", "5 Oriented", "5 Oriented"),
    ("Glascow coma scale total", "15.0", "15"),
    ("Capillary refill rate", "1", "1.0"),
])
def test_gcs_text_mapping(variable, text, listed):
    assert ehr.category_index(variable, text) == ehr.CATEGORIES[variable].index(listed)


def test_ehr_forward_fill_normal_values_and_standardise(tmp_path):
    p = tmp_path / "e.csv"
    pd.DataFrame({"stay_id": [1, 1, 1, 1], "charttime": ["2150-01-01 00:10:00", "2150-01-01 05:00:00",
                                                         "2150-01-01 05:30:00", "2150-01-03 07:00:00"],
                  "variable": ["Heart Rate"] * 3 + ["Glucose"], "value": ["80", "90", "100", "300"]}).to_csv(p)
    x, _ = ehr.discretise(str(p), 2.0, 48.0)
    hr = ehr.START["Heart Rate"]
    assert x[0, hr] == 80 and x[1, hr] == 80  # carried forward
    assert x[2, hr] == 100  # last value in the step wins
    assert x[23, hr] == 100
    assert np.all(x[:, ehr.START["Glucose"]] == 128.0)  # observed only after 48 h: normal value
    assert x[:, ehr.MASK_OFFSET + 8].tolist() == [1, 0, 1] + [0] * 21  # mask: observed steps only
    stats = ehr.fit_normalisation(np.full(12, 10.0), np.full(12, 200.0), 10)
    z = ehr.standardise(x, stats)
    assert z[0, hr] == pytest.approx((80 - 1.0) / np.sqrt(200 / 10 - 1.0))  # mean 1, var E[x^2] - 1
    assert z[0, ehr.MASK_OFFSET + 8] == x[0, ehr.MASK_OFFSET + 8]  # masks untouched


def test_ehr_several_stays_and_wide_layout(tmp_path):
    p = tmp_path / "long.csv"
    pd.DataFrame({"stay_id": [7, 7, 3], "charttime": ["2150-02-01 00:00", "2150-02-01 03:00", "2150-01-01 00:00"],
                  "variable": ["Heart Rate", "Heart Rate", "pH"], "value": ["70", "75", "7.2"]}).to_csv(p, index=False)
    stays = ehr.discretise_stays(str(p))
    assert [s for s, _, _ in stays] == ["3", "7"]  # chronological: stay 3 started first
    assert stays[0][1][0, ehr.START["pH"]] == pytest.approx(7.2) and stays[1][1][1, ehr.START["Heart Rate"]] == 75
    w = tmp_path / "wide.csv"
    pd.DataFrame({"Hours": [0.5, 3.0], "Heart Rate": [88, None],
                  "Glascow coma scale eye opening": [None, "Spontaneously"]}).to_csv(w, index=False)
    x, _ = ehr.discretise(str(w))
    assert x.shape == (24, 76) and x[0, ehr.START["Heart Rate"]] == 88 and x[5, ehr.START["Heart Rate"]] == 88
    eye = ehr.START["Glascow coma scale eye opening"]
    assert x[1, eye + ehr.CATEGORIES["Glascow coma scale eye opening"].index("Spontaneously")] == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DecodeError, match="neither the long nor the wide column layout") as e:
        ehr.discretise(str(bad))
    assert e.value.error_class == "BadCSV"


# ----------------------------------------------------------------------------- reports, images, tables
def test_report_truncation_placeholders_and_empty(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text("  FINDINGS:\n\n mild   effusion [**Doctor Last Name**] " + "word " * 300)
    text = report.read_report(str(p), max_words=10)
    assert text.startswith("FINDINGS: mild effusion [**Doctor Last Name**] word")
    assert len(text.replace("[**Doctor Last Name**]", "X").split()) == 10  # the placeholder is one word
    p.write_text("   \n ")
    with pytest.raises(DecodeError) as e:
        report.read_report(str(p))
    assert e.value.error_class == "EmptyReport"


def test_images_gray_rgb_16bit_and_not_an_image(tmp_path):
    from PIL import Image

    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "a.png")
    img, meta = image2d.decode_image(str(tmp_path / "a.png"), 32, "rgb")
    assert img.shape == (3, 32, 32) and img[0].min() > 0.99 and img[1].max() < 0.01
    gray, _ = image2d.decode_image(str(tmp_path / "a.png"), 32, "gray")
    assert gray.shape == (1, 32, 32)
    deep = (np.arange(64 * 64).reshape(64, 64) * 10).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    img, meta = image2d.decode_image(str(tmp_path / "d.png"), 16)
    assert meta["original_mode"].startswith("I") and img.min() < 0.05 and img.max() > 0.95
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(DecodeError) as e:
        image2d.decode_image(str(tmp_path / "x.jpg"), 16)
    assert e.value.error_class == "CorruptHeader"


def test_tabular_fixed_numeric_layout(tmp_path):
    p = tmp_path / "cov.csv"
    pd.DataFrame({"patient_id": ["a", "b", "c"], "x": [1.0, 2.0, np.nan], "site": ["s1", "s2", "s3"],
                  "y": [3, 4, 5]}).to_csv(p, index=False)
    vec, cols = tabular.read_row(str(p), "b")
    assert cols == ["x", "y"] and vec.tolist() == [2.0, 4.0] and vec.dtype == np.float32
    with pytest.raises(DecodeError, match="columns=1") as e:
        tabular.read_row(str(p), "c")
    assert e.value.error_class == "NonFinite"
    with pytest.raises(DecodeError) as e:
        tabular.read_row(str(p), "zz")
    assert e.value.error_class == "MissingRow"


# ----------------------------------------------------------------------------- GeoTIFF
def _write_geotiff(path, bands, names, nodata=None, planar=True):
    import tifffile

    gdal = "<GDALMetadata>" + "".join(f'<Item name="DESCRIPTION" sample="{i}" role="description">{n}</Item>'
                                      for i, n in enumerate(names)) + "</GDALMetadata>"
    tags = [(33550, "d", 3, (10.0, 10.0, 0.0), True), (33922, "d", 6, (0, 0, 0, 500000.0, 4000000.0, 0.0), True),
            (42112, "s", 0, gdal, True)]
    if nodata is not None:
        tags.append((42113, "s", 0, str(nodata), True))
    data = bands if planar else np.moveaxis(bands, 0, -1)
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig="separate" if planar else "contig",
                     extratags=tags)


@pytest.mark.parametrize("planar", [True, False])
def test_geotiff_all_bands_nodata_tiles_and_geotransform(tmp_path, planar):
    rng = np.random.default_rng(0)
    bands = rng.integers(100, 5000, size=(5, 48, 40)).astype(np.uint16)
    bands[:, :16, :] = 0  # nodata stripe on top
    bands[2, 20, 20] = 0  # one band missing at one pixel: the others still count
    path = str(tmp_path / "s.tif")
    _write_geotiff(path, bands, ["blue", "green", "red", "nir", "swir1"], nodata=0, planar=planar)
    patches = geotiff.decode_scene(path, 32)
    # 2 x 2 grid of 32-px tiles over 48 x 40; all four tiles hold data (rows 16.. are valid)
    assert [p for p, _, _ in patches] == [0, 1, 2, 3]
    pos, img, meta = patches[0]
    assert img.shape == (5, 32, 32) and meta["bands"][3] == "nir"  # > 3 bands kept, not truncated
    assert img[:, :16].max() == 0 and 0 < meta["nodata_fraction"] < 1
    assert 0 <= img.min() and img.max() <= 1
    assert meta["geotransform"] == [500000.0, 10.0, 0.0, 4000000.0, 0.0, -10.0]
    assert patches[1][2]["geotransform"][0] == 500000.0 + 32 * 10.0  # second tile: 32 px to the east
    assert patches[2][2]["geotransform"][3] == 4000000.0 - 32 * 10.0  # third tile: 32 px to the south
    sub = geotiff.decode_scene(path, 32, bands=["red", 3])
    assert sub[0][1].shape == (2, 32, 32) and sub[0][2]["bands"] == ["red", "nir"]
    with pytest.raises(DecodeError, match="not in the scene"):
        geotiff.decode_scene(path, 32, bands=["thermal"])


def test_geotiff_all_nodata_is_quarantined(tmp_path):
    path = str(tmp_path / "z.tif")
    _write_geotiff(path, np.zeros((3, 8, 8), np.uint16), ["a", "b", "c"], nodata=0)
    with pytest.raises(DecodeError) as e:
        geotiff.decode_scene(path, 8)
    assert e.value.error_class == "AllNodata"


def test_geotiff_synthetic_scene(regions_cohort):
    root, _ = regions_cohort
    path = glob.glob(os.path.join(root, "regions", "*", "scene_0.tif"))[0]
    patches = geotiff.decode_scene(path, 32)
    assert patches and patches[0][1].shape == (6, 32, 32) and patches[0][2]["bands"][3] == "nir"


def test_monochrome1_is_inverted(tmp_path):
    ramp = np.tile(np.linspace(-1000, 400, 8), (8, 1))
    m2, _ = dicom.decode_slice(write_slice(str(tmp_path / "m2.dcm"), ramp), 8, (-1000, 400))
    p1 = write_slice(str(tmp_path / "m1.dcm"), ramp, extra={"PhotometricInterpretation": "MONOCHROME1"})
    m1, meta = dicom.decode_slice(p1, 8, (-1000, 400))
    np.testing.assert_allclose(m1, 1 - m2, atol=1e-6)
    assert meta["inverted"] is True


def test_no_window_means_per_slice_min_max(tmp_path):
    """``window: null``: each slice is scaled by its own min and max (documented in docs/ingest.md)."""
    import nibabel as nib

    from raypipe.config import load_config

    cfg = load_config(None, ["ingest.modalities.ct.window=null"])
    assert cfg.ingest.modalities["ct"].window is None
    hu = (np.arange(16 * 16) * 3 - 300.0).reshape(16, 16)  # integers: stored exactly
    img, meta = dicom.decode_slice(write_slice(str(tmp_path / "a.dcm"), hu), 16, None)
    np.testing.assert_allclose(img[0], (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-5)
    assert meta["normalisation"] == "slice_minmax" and meta["window"] is None
    flat, _ = dicom.decode_slice(write_slice(str(tmp_path / "b.dcm"), np.full((16, 16), 40.0)), 16, None)
    assert (flat == 0).all()  # a constant slice has no range: zeros, not NaN
    _, meta = dicom.decode_slice(str(tmp_path / "a.dcm"), 16, (-1000, 400))
    assert meta["normalisation"] == "window"
    # NIfTI: per slice too (slices of different ranges each reach 0 and 1)
    vol = np.stack([np.full((6, 6), 10.0 * z) + np.arange(36).reshape(6, 6) * (z + 1) for z in range(4)], axis=-1)
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), str(tmp_path / "v.nii.gz"))
    out = nifti.decode_volume(str(tmp_path / "v.nii.gz"), 6, None, "all")
    for _, im, m in out:
        assert im.min() == 0 and abs(im.max() - 1) < 1e-6 and m["normalisation"] == "slice_minmax"


@pytest.mark.parametrize("policy", ["all", "even"])
def test_decode_series_isolates_an_unexpected_failure(tmp_path, monkeypatch, policy):
    """A failure no check foresaw quarantines that slice only; the series keeps its other slices and order."""
    paths = [write_slice(str(tmp_path / f"s{i}.dcm"), np.full((8, 8), 100.0 * i), z=float(i), instance=5 - i)
             for i in range(5)]
    real = dicom._decode_dataset

    def flaky(ds, *args, **kwargs):
        if float(ds.ImagePositionPatient[2]) == 2.0:
            raise RuntimeError("simulated decoder bug")
        return real(ds, *args, **kwargs)

    monkeypatch.setattr(dicom, "_decode_dataset", flaky)
    slices, errors, unselected = dicom.decode_series(paths, 8, None, policy, count=5)
    assert [s.path for s in slices] == [paths[i] for i in (0, 1, 3, 4)]
    assert [s.position for s in slices] == [0, 1, 3, 4]  # a gap where the failed slice was
    assert [(p, e.error_class) for p, e in errors] == [(paths[2], "UnexpectedError")]
    # the type and raypipe's line are reported, never the exception's text (it may quote header values)
    assert "RuntimeError at dicom.py:" in str(errors[0][1]) and "simulated" not in str(errors[0][1])
    assert unselected == []

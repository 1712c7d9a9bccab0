"""Format decoders without Ray: files no one here wrote, and the synthetic cohort's files."""

from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd
import pytest

from raypipe.ingest import dicom, ehr, geotiff, nifti, report
from raypipe.ingest.common import DecodeError, select_indices


def _pydicom_files():
    from pydicom.data import get_testdata_files

    return sorted(set(get_testdata_files("*.dcm")) | set(get_testdata_files("*")))


def _nibabel_files():
    import nibabel

    root = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")
    return sorted(f for f in glob.glob(os.path.join(root, "*")) if f.endswith((".nii", ".nii.gz", ".hdr", ".img")))


@pytest.mark.parametrize("policy,n,expect", [
    ("all", 5, [0, 1, 2, 3, 4]), ("every_k", 7, [0, 3, 6]), ("central", 10, [3, 4, 5, 6]),
    ("even", 10, [0, 3, 6, 9]), ("even", 3, [0, 1, 2]),
])
def test_select_indices(policy, n, expect):
    assert select_indices(n, policy, count=4, k=3) == expect


def test_ct_small_hu_matches_pydicom_modality_lut():
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    np.testing.assert_allclose(dicom.hounsfield(path), apply_modality_lut(ds.pixel_array, ds))
    img, meta = dicom.decode_slice(path, 32, (-1000, 400))
    assert img.shape == (1, 32, 32) and 0 <= img.min() and img.max() <= 1 and meta["units"] == "HU"
    assert "PatientName" not in str(meta) and str(ds.PatientName) not in str(meta)


def test_every_shipped_pydicom_file_decodes_or_is_quarantined():
    files = _pydicom_files()
    assert len(files) > 50
    outcomes = {"ok": 0, "quarantined": 0}
    for f in files:
        try:
            dicom.read_header(f)
            dicom.decode_slice(f, 16, None)
            outcomes["ok"] += 1
        except DecodeError as e:
            assert e.error_class and str(e)
            outcomes["quarantined"] += 1
    assert outcomes["ok"] > 10 and outcomes["quarantined"] > 5


def test_compressed_syntax_error_names_syntax_and_extra():
    from pydicom.data import get_testdata_file

    try:
        import pylibjpeg  # noqa: F401
        pytest.skip("the dicom extra is installed: JPEG decodes")
    except ImportError:
        pass
    with pytest.raises(DecodeError) as info:
        dicom.decode_slice(get_testdata_file("JPEG-lossy.dcm"), 16, None)
    assert info.value.error_class == "UnsupportedTransferSyntax"
    assert "1.2.840.10008.1.2.4" in str(info.value) and "raypipe[dicom]" in str(info.value)


def test_every_shipped_nibabel_file_decodes_or_is_quarantined():
    files = _nibabel_files()
    assert len(files) > 5
    ok = 0
    for f in files:
        try:
            out = nifti.decode_volume(f, 16, None, count=4)
            assert all(img.shape == (1, 16, 16) for _, img, _ in out)
            ok += 1
        except DecodeError as e:
            assert e.error_class
    assert ok >= 3


def test_nifti_reoriented_to_ras(clinical_cohort):
    import nibabel as nib

    root, _ = clinical_cohort
    path = glob.glob(os.path.join(root, "patients", "*", "pet.nii.gz"))[0]
    vol, meta = nifti.load_volume(path)
    img = nib.load(path)
    canonical = nib.as_closest_canonical(img)
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S") and meta["orientation"] == "RAS"
    np.testing.assert_allclose(vol, np.transpose(canonical.get_fdata(), (2, 1, 0)), rtol=1e-5)
    # the file is stored L/P flipped: the first x column of RAS is the last of the file
    np.testing.assert_allclose(vol[:, :, 0], np.transpose(img.get_fdata()[::-1, ::-1, :], (2, 1, 0))[:, :, 0],
                               rtol=1e-5)


def test_synthetic_ct_order_and_hu(clinical_cohort):
    root, _ = clinical_cohort
    folder = sorted(glob.glob(os.path.join(root, "patients", "*", "ct")))[0]
    headers = [dicom.read_header(f) for f in glob.glob(os.path.join(folder, "*.dcm"))]
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
    del ds.PatientWeight
    _, meta = dicom.physical_values(ds, ds.pixel_array)
    assert meta["suv"] is False and "PatientWeight" in meta["suv_missing"]


def test_not_dicom_and_truncated(tmp_path, clinical_cohort):
    bad = tmp_path / "x.dcm"
    bad.write_text("hello")
    with pytest.raises(DecodeError) as e:
        dicom.read_header(str(bad))
    assert e.value.error_class == "NotDicom"
    root, _ = clinical_cohort
    src = glob.glob(os.path.join(root, "patients", "*", "ct", "*.dcm"))[0]
    trunc = tmp_path / "t.dcm"
    trunc.write_bytes(open(src, "rb").read()[:2000])
    with pytest.raises(DecodeError):
        dicom.decode_slice(str(trunc), 16, None)


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
    # text GCS values in either spelling land in the same column
    col = ehr.category_index("Glascow coma scale eye opening", "To Pain")
    assert col == ehr.category_index("Glascow coma scale eye opening", "To Pain".lower())
    assert ehr.category_index("Glascow coma scale eye opening", "2 To Pain") == \
        ehr.CATEGORIES["Glascow coma scale eye opening"].index("2 To pain")
    assert ehr.category_index("Glascow coma scale motor response", "3 Abnormal Flexion") == \
        ehr.CATEGORIES["Glascow coma scale motor response"].index("3 Abnorm flexion")


def test_ehr_forward_fill_and_normal_values(tmp_path):
    p = tmp_path / "e.csv"
    pd.DataFrame({"stay_id": [1, 1, 1], "charttime": ["2150-01-01 00:10:00", "2150-01-01 05:00:00",
                                                      "2150-01-01 05:30:00"],
                  "variable": ["Heart Rate", "Heart Rate", "Heart Rate"], "value": ["80", "90", "100"]}).to_csv(p)
    x, _ = ehr.discretise(str(p), 2.0, 48.0)
    hr = ehr.START["Heart Rate"]
    assert x[0, hr] == 80 and x[1, hr] == 80  # carried forward
    assert x[2, hr] == 100  # last value in the step wins
    assert x[23, hr] == 100
    assert np.all(x[:, ehr.START["Glucose"]] == 128.0)  # never observed: normal value
    stats = ehr.fit_normalisation(np.full(12, 10.0), np.full(12, 200.0), 10)
    z = ehr.standardise(x, stats)
    assert z[0, hr] == pytest.approx((80 - 1.0) / np.sqrt(200 / 10 - 1.0))  # mean 1, var E[x^2] - 1
    assert z[0, ehr.MASK_OFFSET + 8] == x[0, ehr.MASK_OFFSET + 8]  # masks untouched


def test_report_truncation_and_empty(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text("  FINDINGS:\n\n mild   effusion [**Date**] " + "word " * 300)
    text = report.read_report(str(p), max_words=10)
    assert text.split()[:4] == ["FINDINGS:", "mild", "effusion", "[**Date**]"] and len(text.split()) == 10
    p.write_text("   \n ")
    with pytest.raises(DecodeError) as e:
        report.read_report(str(p))
    assert e.value.error_class == "EmptyReport"


def test_geotiff_tiles_keep_all_bands_and_geotransform(regions_cohort):
    root, _ = regions_cohort
    path = glob.glob(os.path.join(root, "regions", "*", "scene_0.tif"))[0]
    patches = geotiff.decode_scene(path, 32)
    assert 1 <= len(patches) <= 4
    pos, img, meta = patches[0]
    assert img.shape == (6, 32, 32) and meta["bands"][3] == "nir"
    assert meta["geotransform"][1] == 10.0 and meta["geotransform"][5] == -10.0
    x0 = [p[2]["geotransform"][0] for p in patches]
    assert len(set(x0)) > 1  # patches carry their own origin
    sub = geotiff.decode_scene(path, 32, bands=["red", "nir"])
    assert sub[0][1].shape == (2, 32, 32)
    with pytest.raises(DecodeError, match="not in the scene"):
        geotiff.decode_scene(path, 32, bands=["thermal"])

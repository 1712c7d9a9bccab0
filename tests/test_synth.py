"""The synthetic cohorts: real formats that real readers open, and the laziness structure in the data."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pandas as pd
import pytest

from raypipe.synth.clinical import CT_RESCALE_INTERCEPT, write_clinical_cohort
from raypipe.synth.latent import MODALITIES, ClinicalParams, generate_truth


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "clinical")
    summary = write_clinical_cohort(out, n=12, seed=3, slices=10, image_size=32)
    return out, summary


def test_layout_and_manifest(cohort):
    out, summary = cohort
    for name in ("manifest.csv", "labels.csv", "truth.json", "truth.parquet"):
        assert os.path.isfile(os.path.join(out, name))
    manifest = pd.read_csv(os.path.join(out, "manifest.csv"))
    assert set(manifest.columns) == {"patient_id", "modality", "format", "path"}
    assert len(manifest) == summary["files"]
    assert all(os.path.isfile(os.path.join(out, p)) for p in manifest["path"])
    truth = pd.read_parquet(os.path.join(out, "truth.parquet"))
    # a modality has files exactly when the truth says it is available
    for m in MODALITIES:
        have = set(manifest.loc[manifest.modality == m, "patient_id"])
        assert have == set(truth.loc[truth[f"avail_{m}"], "patient_id"])
    # folders are named by case key, never by the medical record number
    assert not manifest["path"].str.contains("MRN").any()


def test_ct_dicom_needs_rescale_for_hu(cohort):
    import pydicom
    from pydicom.pixels import apply_modality_lut

    out, _ = cohort
    files = glob.glob(os.path.join(out, "patients", "*", "ct", "*.dcm"))
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "CT" and float(ds.RescaleIntercept) == CT_RESCALE_INTERCEPT
    raw = ds.pixel_array.astype(np.float64)
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert raw.min() >= 0  # stored values are not HU ...
    assert hu.min() == pytest.approx(-1024.0, abs=1)  # ... air is only right after rescale
    assert np.median(hu) < -500  # mostly air and lung in HU


def test_ct_instance_numbers_shuffled_against_z(cohort):
    import pydicom

    out, _ = cohort
    case = sorted(glob.glob(os.path.join(out, "patients", "*", "ct")))[0]
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in glob.glob(os.path.join(case, "*.dcm"))]
    z = [float(h.ImagePositionPatient[2]) for h in heads]
    inst = [int(h.InstanceNumber) for h in heads]
    assert len(set(h.SeriesInstanceUID for h in heads)) == 1
    assert sorted(inst) == list(range(1, len(heads) + 1))
    assert np.argsort(z).tolist() != np.argsort(inst).tolist()
    assert all(str(h.PatientName) and h.PatientID.startswith("MRN") for h in heads)  # PHI to be stripped


def test_pet_files_open(cohort):
    import nibabel as nib
    import pydicom

    out, _ = cohort
    nii = glob.glob(os.path.join(out, "patients", "*", "pet.nii.gz"))
    dcm = glob.glob(os.path.join(out, "patients", "*", "pet", "*.dcm"))
    assert nii and dcm
    img = nib.load(nii[0])
    assert img.ndim == 3 and np.isfinite(img.get_fdata()).all()
    assert nib.aff2axcodes(img.affine) != ("R", "A", "S")  # ingestion must reorient
    ds = pydicom.dcmread(dcm[0])
    assert ds.Modality == "PT" and ds.Units == "BQML"
    assert "RadiopharmaceuticalInformationSequence" in ds


def test_ehr_and_report(cohort):
    out, _ = cohort
    ehr = pd.read_csv(glob.glob(os.path.join(out, "patients", "*", "ehr.csv"))[0])
    assert list(ehr.columns) == ["stay_id", "charttime", "variable", "value"]
    hours = (pd.to_datetime(ehr.charttime) - pd.to_datetime(ehr.charttime).min()).dt.total_seconds() / 3600
    assert hours.max() <= 48
    assert ehr.variable.str.startswith("Glascow coma scale").any()
    report = open(glob.glob(os.path.join(out, "patients", "*", "report.txt"))[0]).read()
    assert "FINDINGS:" in report and "[**" in report


def test_same_seed_same_bytes(tmp_path):
    a = write_clinical_cohort(str(tmp_path / "a"), n=3, seed=5, slices=4, image_size=16)
    b = write_clinical_cohort(str(tmp_path / "b"), n=3, seed=5, slices=4, image_size=16)
    assert a == b
    ma = pd.read_csv(tmp_path / "a" / "manifest.csv")
    for p in ma["path"]:
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes()


def test_truth_json(cohort):
    out, summary = cohort
    truth = json.load(open(os.path.join(out, "truth.json")))
    assert truth["params"]["coef_dom"] == ClinicalParams().coef_dom
    assert 0.5 < truth["bayes_auroc"] <= 1.0


def _cv_auroc(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    p = cross_val_predict(LogisticRegression(max_iter=5000), x, y,
                          cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")[:, 1]
    return roc_auc_score(y, p)


def test_laziness_exists_in_the_data():
    """Default size and seed: concat < dominant alone < Bayes reference (plain logistic regression)."""
    from raypipe.config import SynthConfig
    from raypipe.synth.latent import bayes_auroc

    d = SynthConfig()
    truth = generate_truth(n=d.n, seed=d.seed, sites=d.sites)
    y = truth["label"].to_numpy()
    obs = {m: np.stack(truth[f"obs_{m}"].to_numpy()) for m in MODALITIES}
    dominant = _cv_auroc(obs["ct"], y)
    concat = _cv_auroc(np.hstack([obs[m] for m in MODALITIES]), y)
    bayes = bayes_auroc(truth)
    assert concat < dominant < bayes, (concat, dominant, bayes)
    # the lazy modality carries its latent where it is clean (site 0) and loses it elsewhere
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import cross_val_score

    clean = truth["site"].to_numpy() == 0
    r2 = {name: cross_val_score(LinearRegression(), obs["report"][rows], truth["u_lazy"].to_numpy()[rows], cv=5).mean()
          for name, rows in (("clean", clean), ("noisy", ~clean))}
    assert r2["clean"] > 0.3 and r2["noisy"] < 0.1, r2


def test_missingness_rates_and_mnar():
    truth = generate_truth(n=4000, seed=1)
    rates = ClinicalParams().missing_rate
    for m in ("ehr", "report"):
        assert abs((~truth[f"avail_{m}"]).mean() - rates[m]) < 0.03
    assert truth[[f"avail_{m}" for m in MODALITIES]].any(axis=1).all()  # nobody has nothing
    # PET is missing-not-at-random: more often missing for low-risk patients
    pet_missing = ~truth["avail_pet"]
    assert truth.loc[pet_missing, "prob"].mean() < truth.loc[~pet_missing, "prob"].mean()


def test_regions_geotiff(tmp_path):
    import tifffile

    from raypipe.synth.regions import BANDS, write_regions_cohort

    s = write_regions_cohort(str(tmp_path / "r"), n=6, seed=0, scene_size=32)
    assert 0 < s["bayes_r2"] < 1
    manifest = pd.read_csv(tmp_path / "r" / "manifest.csv")
    tif = manifest.loc[manifest.modality == "sat", "path"].iloc[0]
    with tifffile.TiffFile(tmp_path / "r" / tif) as t:
        assert t.series[0].shape == (len(BANDS), 32, 32)
        assert t.pages[0].geotiff_tags["ModelPixelScale"][:2] == [10.0, 10.0]
        assert "nir" in t.pages[0].tags[42112].value
    labels = pd.read_csv(tmp_path / "r" / "labels.csv")
    assert labels["label"].dtype.kind == "f"

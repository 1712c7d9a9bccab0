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


# ----------------------------------------------------------------------------- v2 generator (latent2)
@pytest.fixture(scope="module")
def truth_v2():
    from raypipe.synth import latent2

    return latent2.generate_truth(latent2.DEFAULT_N, 0)


def _obs(truth, m):
    return np.stack(truth[f"obs_{m}"].to_numpy()).astype(np.float64)


def test_v2_has_the_v1_columns_and_shapes(truth_v2):
    from raypipe.synth import latent2
    from raypipe.synth.embeddings import render_embeddings

    v1 = generate_truth(n=5, seed=0)
    assert set(v1.columns) <= set(truth_v2.columns)
    assert latent2.MODALITIES == MODALITIES
    for m in MODALITIES:
        assert _obs(truth_v2, m).shape == (len(truth_v2), 8) and truth_v2[f"avail_{m}"].dtype == bool
    emb = render_embeddings(truth_v2.head(10), dim=16)
    assert {k: v.shape for k, v in emb.items()} == {m: (10, 16) for m in MODALITIES}
    again = latent2.generate_truth(50, 3)
    pd.testing.assert_frame_equal(again, latent2.generate_truth(50, 3))  # deterministic in the seed


def test_v2_each_modality_latent_recoverable_from_the_others(truth_v2):
    """Cross-modal redundancy: ridge from the other three modalities' observations (5-fold, out of fold)."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict

    from raypipe.synth.latent2 import MODALITY_FACTORS

    r2 = {}
    for m in MODALITIES:
        x = np.hstack([_obs(truth_v2, o) for o in MODALITIES if o != m])
        target = truth_v2[list(MODALITY_FACTORS[m])].to_numpy()
        pred = cross_val_predict(Ridge(alpha=1.0), x, target, cv=KFold(5, shuffle=True, random_state=0))
        r2[m] = r2_score(target, pred)
    assert min(r2.values()) >= 0.3, r2
    # and the redundancy is the designed one: without the report, nothing else sees the physiology
    x = np.hstack([_obs(truth_v2, o) for o in ("ct", "pet")])
    pred = cross_val_predict(Ridge(alpha=1.0), x, truth_v2["u_phys"].to_numpy(), cv=5)
    assert r2_score(truth_v2["u_phys"], pred) < 0.05


def test_v2_pet_dominant_and_missing_by_site_and_severity(truth_v2):
    from raypipe.synth.latent2 import bayes_auroc

    y = truth_v2["label"].to_numpy()
    single = {m: _cv_auroc(_obs(truth_v2, m), y) for m in MODALITIES}
    concat = _cv_auroc(np.hstack([_obs(truth_v2, m) for m in MODALITIES]), y)
    bayes = bayes_auroc(truth_v2)
    assert max(single, key=single.get) == "pet", single
    assert bayes > max(concat, single["pet"]) + 0.01, (bayes, concat, single)  # room for fusion to gain
    avail = truth_v2["avail_pet"].to_numpy()
    assert 0.4 <= 1 - avail.mean() <= 0.65  # the dominant modality is missing for about half
    by_site = truth_v2.groupby("site")["avail_pet"].mean()
    assert by_site[0] > 0.6 and by_site[2] < 0.3  # site 2 has no PET scanner
    # not at random: within every site, patients with PET have the larger tumour burden
    for s, part in truth_v2.groupby("site"):
        assert part.loc[part.avail_pet, "u_tum"].mean() > part.loc[~part.avail_pet, "u_tum"].mean() + 0.3, s
    assert truth_v2[[f"avail_{m}" for m in MODALITIES]].any(axis=1).all()


def _gd_loss_fraction(x, y, steps, lr=0.5):
    """Share of the achievable log-loss reduction that full-batch gradient descent on standardised
    features reaches after ``steps`` (1.0 = the converged fit after 5000 steps)."""
    x = (x - x.mean(0)) / x.std(0)

    def run(k):
        w, b = np.zeros(x.shape[1]), 0.0
        for _ in range(k):
            g = 1 / (1 + np.exp(-(x @ w + b))) - y
            w, b = w - lr * x.T @ g / len(y), b - lr * g.mean()
        z = x @ w + b
        return np.mean(np.logaddexp(0, z) - y * z)

    base = -(y.mean() * np.log(y.mean()) + (1 - y.mean()) * np.log(1 - y.mean()))
    return (base - run(steps)) / (base - run(5000))


def test_v2_ehr_is_slow_to_fit_because_of_its_nuisance(truth_v2):
    from dataclasses import replace

    from raypipe.synth import latent2

    y = truth_v2["label"].to_numpy().astype(float)
    frac = {m: _gd_loss_fraction(_obs(truth_v2, m), y, 20) for m in MODALITIES}
    assert frac["ehr"] < 0.95 < min(frac[m] for m in ("ct", "pet", "report")), frac
    # remove the sympathetic-tone factor and the EHR fits as fast as the rest
    calm = latent2.generate_truth(latent2.DEFAULT_N, 0, params=replace(latent2.CohortParamsV2(), ehr_tone=0.0))
    assert _gd_loss_fraction(_obs(calm, "ehr"), calm["label"].to_numpy().astype(float), 20) > 0.97


def test_v2_templated_site_reports_are_noisier(truth_v2):
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import cross_val_score

    site = truth_v2["site"].to_numpy()
    rep, u = _obs(truth_v2, "report"), truth_v2["u_tum"].to_numpy()
    r2 = {s: cross_val_score(LinearRegression(), rep[site == s], u[site == s], cv=5).mean() for s in (0, 1)}
    assert r2[0] > r2[1] + 0.2, r2


def test_v2_cohort_files_and_config_key(tmp_path):
    from raypipe.config import load_config
    from raypipe.synth import write_cohort

    cfg = load_config(None, [f"run.out_dir={tmp_path}", "synth.generator=v2", "synth.n=16", "synth.slices=4",
                             "synth.image_size=16", "synth.seed=2"])
    summary = write_cohort(cfg, progress=False)
    out = cfg.cohort_dir
    truth = pd.read_parquet(os.path.join(out, "truth.parquet"))
    manifest = pd.read_csv(os.path.join(out, "manifest.csv"))
    assert summary["generator"] == "v2" and "u_tum" in truth.columns
    # the config's default synth.missing (v1's MCAR rates) leaves v2's structural missingness alone
    from raypipe.synth import latent2

    assert truth["avail_pet"].tolist() == latent2.generate_truth(16, 2)["avail_pet"].tolist()
    big = load_config(None, [f"run.out_dir={tmp_path / 'c'}", "synth.generator=v2", "synth.n=300", "synth.slices=2",
                             "synth.image_size=16"])
    assert write_cohort(big, progress=False)["available"]["pet"] < 0.6 * 300  # v1's default would keep 70 %
    assert json.load(open(os.path.join(out, "truth.json")))["params"]["coef_tum"] == 1.5
    for m in MODALITIES:
        assert set(manifest.loc[manifest.modality == m, "patient_id"]) == set(truth.loc[truth[f"avail_{m}"], "patient_id"])
    # an explicit synth.missing.rate replaces v2's structural missingness by MCAR rates
    cfg2 = load_config(None, [f"run.out_dir={tmp_path / 'b'}", "synth.generator=v2", "synth.n=8", "synth.slices=4",
                              "synth.image_size=16", "synth.missing.rate={pet: 0.0}"])
    assert write_cohort(cfg2, progress=False)["available"]["pet"] == 8

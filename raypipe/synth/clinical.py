"""Write the synthetic clinical cohort in real file formats (docs/synthetic.md).

Layout under ``out_dir``::

    manifest.csv        patient_id, modality, format, path (relative); one row per file
    labels.csv          patient_id, label, site, sex, age
    truth.json          generating parameters, Bayes reference AUROC, counts
    truth.parquet       latents and per-modality observations (before rendering)
    patients/<case>/ct/<random>.dcm      single-frame CT, InstanceNumber shuffled vs z
    patients/<case>/pet/<random>.dcm     PET (Modality=PT) for some patients ...
    patients/<case>/pet.nii.gz           ... NIfTI for the others
    patients/<case>/ehr.csv              long format: stay_id, charttime, variable, value
    patients/<case>/report.txt

Folders are named by a cohort-local case key, never by the medical record number;
the files themselves carry fake PHI (PatientName, PatientID, BirthDate) so that
de-identification can be tested.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from typing import Iterable

import numpy as np
import pandas as pd

from raypipe.synth.publish import publish_cohort

from raypipe.synth import latent2
from raypipe.synth.latent import MODALITIES, ClinicalParams, bayes_auroc, generate_truth

log = logging.getLogger(__name__)

__all__ = ["generate_truth", "write_clinical_cohort", "EHR_VARIABLES", "GCS_EYE", "GCS_MOTOR", "GCS_VERBAL"]

CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
PET_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.128"
CT_RESCALE_SLOPE = 1.0
CT_RESCALE_INTERCEPT = -1024.0
SLICE_THICKNESS_MM = 2.5

_FIRST = ["JOHN", "MARY", "ALEX", "SARA", "DAVID", "LINDA", "OMAR", "MEI", "IVAN", "ANA"]
_LAST = ["SMITHSON", "KOWALSKA", "OKAFOR", "TANAKA", "GARCIAZ", "NILSSONE", "DUBOISE", "ROSSIANO"]

# --------------------------------------------------------------------------- images
def _blob_centers(rng: np.random.Generator, k: int, slices: int, size: int) -> np.ndarray:
    """k fixed blob centres (z, y, x) inside the lungs, spread along z."""
    z = np.linspace(0.15, 0.85, k) * (slices - 1)
    side = np.where(np.arange(k) % 2 == 0, 0.35, 0.65)
    y = rng.uniform(0.35, 0.6, k)
    return np.stack([z, y * size, side * size], axis=1)


def _body_phantom(slices: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean body and lung masks of a (slices, size, size) torso phantom, and a z profile."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.33) ** 2 <= 1.0
    lung_l = ((xx - 0.33) / 0.13) ** 2 + ((yy - 0.48) / 0.22) ** 2 <= 1.0
    lung_r = ((xx - 0.67) / 0.13) ** 2 + ((yy - 0.48) / 0.22) ** 2 <= 1.0
    lungs = lung_l | lung_r
    zprof = np.sin(np.linspace(0.25, np.pi - 0.25, slices))  # lungs smaller at the apex and base
    return body, lungs, zprof


def _blobs(obs: np.ndarray, centers: np.ndarray, slices: int, size: int, sigma: float) -> np.ndarray:
    zz, yy, xx = np.mgrid[0:slices, 0:size, 0:size].astype(np.float32)
    out = np.zeros((slices, size, size), np.float32)
    sig_z = max(1.0, slices / 10)
    for amp, (cz, cy, cx) in zip(obs, centers):
        out += amp * np.exp(-((zz - cz) ** 2) / (2 * sig_z**2) - ((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return out


def render_ct_hu(obs: np.ndarray, rng: np.random.Generator, slices: int, size: int, centers: np.ndarray) -> np.ndarray:
    """CT volume in HU (slices, size, size): air, soft tissue, lungs, signal blobs, noise."""
    body, lungs, zprof = _body_phantom(slices, size)
    hu = np.full((slices, size, size), -1000.0, np.float32)
    for z in range(slices):
        hu[z][body] = 40.0
        if zprof[z] > 0.3:  # no lung at the very apex/base slices
            hu[z][lungs] = -850.0
    hu += 180.0 * _blobs(obs, centers, slices, size, sigma=size / 14)
    hu += rng.normal(0.0, 15.0, hu.shape).astype(np.float32)
    return np.clip(hu, -1024.0, 3071.0)


def render_pet_suv(obs: np.ndarray, rng: np.random.Generator, slices: int, size: int, centers: np.ndarray) -> np.ndarray:
    """PET volume in SUV (slices, size, size): background uptake plus signal hot spots (all >= 0)."""
    body, _, _ = _body_phantom(slices, size)
    suv = np.zeros((slices, size, size), np.float32)
    suv[:, body] = 0.8
    amps = 1.5 * np.exp(0.6 * np.asarray(obs, np.float64))  # monotone: keeps the sign information
    suv += _blobs(amps, centers, slices, size, sigma=size / 12)
    suv *= rng.lognormal(0.0, 0.05, suv.shape).astype(np.float32)
    return np.clip(suv, 0.0, None)


# --------------------------------------------------------------------------- DICOM
def _uid(rng: np.random.Generator) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(rng.integers(0, 2**63))]))


def _base_dataset(sop_class: str, sop_uid: str, phi: dict, study_uid: str, series_uid: str, frame_uid: str):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientName = phi["name"]
    ds.PatientID = phi["mrn"]
    ds.PatientBirthDate = phi["birth"]
    ds.PatientSex = phi["sex"]
    ds.StudyDate = phi["study_date"]
    ds.AccessionNumber = phi["accession"]
    ds.InstitutionName = phi["institution"]
    ds.ReferringPhysicianName = "DR^REFERRER"
    return ds


def _write_series(folder: str, volume_stored: np.ndarray, modality: str, rng: np.random.Generator, phi: dict,
                  spacing: float, extra_per_slice=None, extra_series=None) -> list[str]:
    """Write one single-frame file per slice; InstanceNumber shuffled, names random."""
    sop_class = CT_SOP_CLASS if modality == "CT" else PET_SOP_CLASS
    study_uid, series_uid, frame_uid = _uid(rng), _uid(rng), _uid(rng)
    slices, rows, cols = volume_stored.shape
    order = rng.permutation(slices) + 1  # InstanceNumber deliberately not the z order
    os.makedirs(folder, exist_ok=True)
    paths = []
    for z in range(slices):
        ds = _base_dataset(sop_class, _uid(rng), phi, study_uid, series_uid, frame_uid)
        ds.Modality = modality
        ds.SeriesDescription = f"synthetic {modality}"
        ds.InstanceNumber = int(order[z])
        ds.ImagePositionPatient = [-(cols * spacing) / 2, -(rows * spacing) / 2, -100.0 + z * SLICE_THICKNESS_MM]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = SLICE_THICKNESS_MM
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0 if volume_stored.dtype == np.uint16 else 1
        if extra_series:
            extra_series(ds)
        if extra_per_slice:
            extra_per_slice(ds, z)
        ds.PixelData = np.ascontiguousarray(volume_stored[z]).tobytes()
        name = f"{rng.integers(0, 16**12):012x}.dcm"
        path = os.path.join(folder, name)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_ct(folder: str, hu: np.ndarray, rng: np.random.Generator, phi: dict, spacing: float) -> list[str]:
    stored = np.round((hu - CT_RESCALE_INTERCEPT) / CT_RESCALE_SLOPE).astype(np.uint16)

    def series(ds):
        ds.RescaleSlope = CT_RESCALE_SLOPE
        ds.RescaleIntercept = CT_RESCALE_INTERCEPT
        ds.RescaleType = "HU"
        ds.KVP = 120

    return _write_series(folder, stored, "CT", rng, phi, spacing, extra_series=series)


def write_pet_dicom(folder: str, suv: np.ndarray, rng: np.random.Generator, phi: dict, spacing: float,
                    with_weight: bool) -> list[str]:
    """PET as Bq/ml with per-slice rescale; SUVbw is recoverable from weight, dose and decay tags."""
    from pydicom.dataset import Dataset

    weight_kg = float(np.round(rng.uniform(55, 95), 1))
    dose_bq = float(np.round(rng.uniform(250e6, 400e6), -6))
    half_life = 6586.2  # F-18, seconds
    delay_s = float(rng.integers(45, 75) * 60)
    decayed = dose_bq * 2.0 ** (-delay_s / half_life)
    activity = suv * decayed / (weight_kg * 1000.0)  # Bq/ml
    slopes = np.maximum(activity.reshape(len(activity), -1).max(axis=1), 1e-6) / 32000.0
    stored = np.round(activity / slopes[:, None, None]).astype(np.int16)
    start = "093000.00"
    hh, mm = 9 + int((30 + delay_s // 60) // 60), int((30 + delay_s // 60) % 60)
    acq = f"{hh:02d}{mm:02d}00.00"

    def series(ds):
        ds.Units = "BQML"
        ds.DecayCorrection = "START"
        ds.CorrectedImage = ["DECY", "ATTN"]
        ds.SeriesTime = acq
        ds.AcquisitionTime = acq
        ds.RescaleIntercept = 0.0
        if with_weight:
            ds.PatientWeight = weight_kg
        info = Dataset()
        info.Radiopharmaceutical = "Fluorodeoxyglucose"
        info.RadiopharmaceuticalStartTime = start
        info.RadionuclideTotalDose = dose_bq
        info.RadionuclideHalfLife = half_life
        ds.RadiopharmaceuticalInformationSequence = [info]

    def per_slice(ds, z):
        ds.RescaleSlope = float(slopes[z])

    return _write_series(folder, stored, "PT", rng, phi, spacing, extra_per_slice=per_slice, extra_series=series)


def write_pet_nifti(path: str, suv: np.ndarray, spacing: float) -> str:
    """PET SUV volume as NIfTI in a non-canonical (LPS-like) orientation: ingestion must reorient."""
    import nibabel as nib

    data = np.transpose(suv, (2, 1, 0))  # (x, y, z)
    data = data[::-1, ::-1, :]  # stored L->R and A->P reversed
    nx, ny, nz = data.shape
    affine = np.diag([-spacing, -spacing, SLICE_THICKNESS_MM, 1.0])
    affine[:3, 3] = [(nx - 1) * spacing / 2, (ny - 1) * spacing / 2, -100.0]
    img = nib.Nifti1Image(np.ascontiguousarray(data.astype(np.float32)), affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)
    return path


# --------------------------------------------------------------------------- EHR
#: The 17 MIMIC-III benchmark variables with (normal value, per-unit-of-signal shift, noise sd).
EHR_VARIABLES = {
    "Capillary refill rate": None,
    "Diastolic blood pressure": (68.0, -4.0, 6.0),
    "Fraction inspired oxygen": (0.21, 0.06, 0.03),
    "Glascow coma scale eye opening": None,
    "Glascow coma scale motor response": None,
    "Glascow coma scale total": None,
    "Glascow coma scale verbal response": None,
    "Glucose": (128.0, 22.0, 18.0),
    "Heart Rate": (84.0, 9.0, 7.0),
    "Height": (170.0, 0.0, 8.0),
    "Mean blood pressure": (80.0, -5.0, 6.0),
    "Oxygen saturation": (97.0, -1.5, 1.0),
    "Respiratory rate": (18.0, 3.0, 2.5),
    "Systolic blood pressure": (120.0, -8.0, 10.0),
    "Temperature": (37.0, 0.35, 0.3),
    "Weight": (80.0, 0.0, 12.0),
    "pH": (7.40, -0.03, 0.03),
}
GCS_EYE = ["No Response", "To Pain", "To Speech", "Spontaneously"]  # scores 1..4
GCS_MOTOR = ["No response", "Abnormal extension", "Abnormal Flexion", "Flex-withdraws", "Localizes Pain", "Obeys Commands"]
GCS_VERBAL = ["No Response-ETT", "Incomprehensible sounds", "Inappropriate Words", "Confused", "Oriented"]
# Which observation dimension drives which continuous variable (0..obs_dim-1).
_EHR_SIGNAL_DIM = {"Heart Rate": 0, "Respiratory rate": 1, "Glucose": 2, "Systolic blood pressure": 3,
                   "Mean blood pressure": 3, "Diastolic blood pressure": 3, "Temperature": 4,
                   "Oxygen saturation": 5, "Fraction inspired oxygen": 5, "pH": 7}


def render_ehr_events(obs: np.ndarray, rng: np.random.Generator, stay_id: int, hours: float = 48.0) -> list[tuple]:
    """Long-format events over the first ``hours`` of an ICU stay, as hospitals export them."""
    admit = np.datetime64("2150-01-01T00:00") + np.timedelta64(int(rng.integers(0, 3650 * 24 * 60)), "m")
    rows = []

    def emit(t_hours: float, var: str, value) -> None:
        ts = admit + np.timedelta64(int(t_hours * 60), "m")
        rows.append((stay_id, str(ts).replace("T", " ") + ":00", var, value))

    height = 170 + 9 * rng.standard_normal()
    weight = 80 + 14 * rng.standard_normal()
    emit(rng.uniform(0, 2), "Height", f"{height:.0f}")
    emit(rng.uniform(0, 2), "Weight", f"{weight:.1f}")
    for var, spec in EHR_VARIABLES.items():
        if spec is None or var in ("Height", "Weight"):
            continue
        normal, shift, sd = spec
        dim = _EHR_SIGNAL_DIM.get(var)
        level = normal + (shift * float(obs[dim]) if dim is not None else 0.0)
        every = 1.0 if var in ("Heart Rate", "Respiratory rate", "Oxygen saturation", "Systolic blood pressure",
                               "Diastolic blood pressure", "Mean blood pressure") else 6.0
        if rng.random() < 0.1:  # some channels are never observed for some patients
            continue
        t = rng.uniform(0, every)
        while t < hours:
            if rng.random() > 0.15:  # gaps
                value = level + sd * rng.standard_normal()
                if var == "Oxygen saturation":
                    value = min(value, 100.0)
                if var == "Fraction inspired oxygen":
                    value = float(np.clip(value, 0.21, 1.0))
                emit(t, var, f"{value:.2f}" if var in ("pH", "Fraction inspired oxygen") else f"{value:.1f}")
            t += every * rng.uniform(0.7, 1.3)
    # Neurological status and capillary refill: text values, every ~4 h
    gcs_drop = max(0.0, float(obs[6]))
    t = rng.uniform(0, 4)
    while t < hours:
        e = int(np.clip(round(4 - 1.2 * gcs_drop + 0.4 * rng.standard_normal()), 1, 4))
        mo = int(np.clip(round(6 - 1.8 * gcs_drop + 0.5 * rng.standard_normal()), 1, 6))
        v = int(np.clip(round(5 - 1.5 * gcs_drop + 0.5 * rng.standard_normal()), 1, 5))
        # Two spellings, as exports mix them: "Spontaneously" and "4 Spontaneously"
        spell = rng.random() < 0.5
        emit(t, "Glascow coma scale eye opening", f"{e} {GCS_EYE[e - 1]}" if spell else GCS_EYE[e - 1])
        emit(t, "Glascow coma scale motor response", f"{mo} {GCS_MOTOR[mo - 1]}" if spell else GCS_MOTOR[mo - 1])
        emit(t, "Glascow coma scale verbal response", f"{v} {GCS_VERBAL[v - 1]}" if spell else GCS_VERBAL[v - 1])
        emit(t, "Glascow coma scale total", str(e + mo + v))
        if rng.random() < 0.5:
            emit(t, "Capillary refill rate", "1.0" if rng.random() < 0.1 + 0.2 * gcs_drop else "0.0")
        t += rng.uniform(3, 5)
    rows.sort(key=lambda r: (r[1], r[2]))
    return rows


# --------------------------------------------------------------------------- reports
_FINDINGS = ["pulmonary nodule", "ground-glass opacity", "pleural effusion", "consolidation",
             "mediastinal lymphadenopathy", "emphysematous change", "atelectasis", "cardiomegaly"]
_GRADES = [(-1.0, "no evidence of {f}"), (-0.35, "no significant {f}"), (0.35, "possible minimal {f}"),
           (1.0, "mild {f}"), (2.0, "moderate {f}"), (np.inf, "extensive {f}")]
_SITE_HEADERS = ["CHEST CT WITH CONTRAST.", "CT THORAX - PRELIMINARY READ.", "CT CHEST (OUTSIDE STUDY REVIEW)."]


def render_report(obs: np.ndarray, rng: np.random.Generator, site: int) -> str:
    """Free-text radiology report whose graded findings encode the observation vector."""
    sentences = []
    for value, finding in zip(obs, _FINDINGS):
        phrase = next(t for bound, t in _GRADES if value < bound).format(f=finding)
        sentences.append(phrase[0].upper() + phrase[1:] + ".")
    order = rng.permutation(len(sentences))
    body = " ".join(sentences[i] for i in order)
    header = _SITE_HEADERS[site % len(_SITE_HEADERS)]
    return (f"{header}\nHISTORY: [**Age over 90 **] patient, dyspnea. Comparison: [**Date**].\n"
            f"FINDINGS: {body}\nIMPRESSION: see findings above. Dictated by [**Doctor Last Name**].\n")


# --------------------------------------------------------------------------- cohort
def _phi(rng: np.random.Generator, mrn: str, sex: str, age: int, site: int) -> dict:
    return {
        "name": f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}",
        "mrn": mrn,
        "birth": f"{2150 - age - 1:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        "sex": sex,
        "study_date": "21500101",
        "accession": f"ACC{int(rng.integers(10**7, 10**8))}",
        "institution": f"SYNTHETIC GENERAL HOSPITAL {site}",
    }


def write_clinical_cohort(out_dir: str, n: int = 200, seed: int = 0, slices: int = 24, image_size: int = 64,
                          sites: int = 3, pet_nifti_fraction: float = 0.5, missing_rate: dict | None = None,
                          mnar: dict | None = None, progress: bool = False, generator: str = "v1") -> dict:
    """Write the clinical cohort to ``out_dir`` (atomically) and return the truth summary.

    ``generator``: ``"v1"`` (:mod:`raypipe.synth.latent`, independent factors) or ``"v2"``
    (:mod:`raypipe.synth.latent2`: cross-modal redundancy, PET dominant and missing by site and
    severity, slow-to-fit EHR). Both render their 8-value observations into the same files.
    For v2, ``missing_rate`` (if given) replaces the structural missingness of the named
    modalities by missing-completely-at-random rates and ``mnar`` is ignored.
    Same ``seed`` -> same files (UIDs, names and pixel values are all seeded).
    """
    if generator == "v1":
        params = ClinicalParams()
        if missing_rate is not None:
            params = replace(params, missing_rate=dict(missing_rate))
        if mnar is not None:
            params = replace(params, mnar=dict(mnar))
        truth = generate_truth(n=n, seed=seed, sites=sites, params=params)
        bayes = bayes_auroc(truth)
        roles = {"ct": "dominant", "pet": "redundant (same latent as ct)", "ehr": "weaker informative",
                 "report": "lazy (heavy-tailed noise outside the clean sites)"}
    elif generator == "v2":
        params = latent2.CohortParamsV2(missing_rate=dict(missing_rate or {}))
        truth = latent2.generate_truth(n=n, seed=seed, sites=sites, params=params)
        bayes = latent2.bayes_auroc(truth)
        roles = {"ct": "tumour burden (shared with pet and the report)",
                 "pet": "dominant (tumour burden and metabolic activity), missing by site and severity",
                 "ehr": "physiology (shared with the report), slow to fit: signal beside a larger nuisance",
                 "report": "describes the ct findings and the physiology; templated at some sites"}
    else:
        raise ValueError(f"unknown synthetic clinical generator {generator!r} (use 'v1' or 'v2')")
    rng = np.random.default_rng(seed + 1)
    geo_rng = np.random.default_rng(params.direction_seed + 1)
    ct_centers = _blob_centers(geo_rng, params.obs_dim, slices, image_size)
    pet_centers = _blob_centers(geo_rng, params.obs_dim, slices, image_size)
    spacing = 350.0 / image_size  # ~35 cm field of view

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synth-", dir=parent)
    manifest: list[tuple[str, str, str, str]] = []
    iterator: Iterable = truth.itertuples(index=False)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=n, desc="synth clinical", unit="patient")
    try:
        for row in iterator:
            prng = np.random.default_rng([seed, int(row.sample_id.split("_")[1])])
            case_dir = os.path.join(tmp, "patients", row.sample_id)
            os.makedirs(case_dir, exist_ok=True)
            phi = _phi(prng, row.patient_id, row.sex, int(row.age), int(row.site))
            rel = lambda p: os.path.relpath(p, tmp)  # noqa: E731
            if row.avail_ct:
                hu = render_ct_hu(row.obs_ct, prng, slices, image_size, ct_centers)
                for p in sorted(write_ct(os.path.join(case_dir, "ct"), hu, prng, phi, spacing)):
                    manifest.append((row.patient_id, "ct", "dicom", rel(p)))
            if row.avail_pet:
                suv = render_pet_suv(row.obs_pet, prng, slices, image_size, pet_centers)
                if prng.random() < pet_nifti_fraction:
                    p = write_pet_nifti(os.path.join(case_dir, "pet.nii.gz"), suv, spacing)
                    manifest.append((row.patient_id, "pet", "nifti", rel(p)))
                else:
                    with_weight = prng.random() > 0.1  # some exports lack PatientWeight: no SUV
                    for p in sorted(write_pet_dicom(os.path.join(case_dir, "pet"), suv, prng, phi, spacing, with_weight)):
                        manifest.append((row.patient_id, "pet", "dicom", rel(p)))
            if row.avail_ehr:
                p = os.path.join(case_dir, "ehr.csv")
                with open(p, "w", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(["stay_id", "charttime", "variable", "value"])
                    w.writerows(render_ehr_events(row.obs_ehr, prng, stay_id=200000 + int(row.sample_id[5:])))
                manifest.append((row.patient_id, "ehr", "csv", rel(p)))
            if row.avail_report:
                p = os.path.join(case_dir, "report.txt")
                with open(p, "w") as fh:
                    fh.write(render_report(row.obs_report, prng, int(row.site)))
                manifest.append((row.patient_id, "report", "text", rel(p)))

        pd.DataFrame(manifest, columns=["patient_id", "modality", "format", "path"]).to_csv(
            os.path.join(tmp, "manifest.csv"), index=False)
        labels = truth[["patient_id", "label", "site", "sex", "age"]].copy()
        labels["site"] = "site" + labels["site"].astype(str)
        labels.to_csv(os.path.join(tmp, "labels.csv"), index=False)
        truth.to_parquet(os.path.join(tmp, "truth.parquet"), index=False)
        summary = {
            "cohort": "clinical",
            "generator": generator,
            "n": n,
            "seed": seed,
            "sites": sites,
            "slices": slices,
            "image_size": image_size,
            "modalities": list(MODALITIES),
            "roles": roles,
            "params": params.to_json(),
            "bayes_auroc": bayes,
            "prevalence": float(truth["label"].mean()),
            "available": {m: int(truth[f"avail_{m}"].sum()) for m in MODALITIES},
            "files": len(manifest),
        }
        publish_cohort(tmp, out_dir, summary)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote clinical cohort of %d patients (%d files) to %s", n, len(manifest), out_dir)
    return summary

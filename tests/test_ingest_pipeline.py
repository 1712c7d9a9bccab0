"""Ingestion on Ray Data: shipped third-party files, a hand-built hospital-style cohort, the synthetic cohort.

Checks the pipeline's promises: nothing lost (every file ingested or quarantined, counts
reconcile), no identity leaked (grep of every output byte), deterministic bytes, records in
key order and slices in anatomical order, EHR statistics from the training split only.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.config import load_config
from raypipe.ids import pseudonym
from raypipe.ingest.safety import MARKER, path_key, pseudonymous_path, write_marker
from raypipe.schema import RECORDS_SCHEMA, record_array

pytestmark = pytest.mark.ray

SECRET = os.environ["RAYPIPE_ID_SECRET"].encode()
PHI = ["Doe^Jane", "MRN-774411", "19410203"]  # what write_slice puts in every header
PATIENTS = ["MRN-1001", "MRN-1002", "MRN-1003", "MRN-1004"]


def _cfg(out, cohort, *extra):
    return load_config(None, [f"run.out_dir={out}", f"ingest.input={cohort}", "ray.progress_bars=false", *extra])


def _outputs(records_dir):
    return {os.path.relpath(f, records_dir): open(f, "rb").read()
            for f in sorted(glob.glob(os.path.join(records_dir, "**", "*"), recursive=True)) if os.path.isfile(f)}


# ----------------------------------------------------------------------------- files no one here wrote
@pytest.fixture(scope="module")
def shipped_cohort(tmp_path_factory):
    """Every file pydicom ships in data/test_files and every NIfTI/Analyze file nibabel ships, one patient each."""
    import nibabel
    import pydicom

    root = tmp_path_factory.mktemp("shipped")
    rows, labels = [], []
    sources = [("scan", "dicom", sorted(glob.glob(os.path.join(os.path.dirname(pydicom.__file__), "data",
                                                                   "test_files", "*"))))]
    nib_dir = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")
    sources.append(("vol", "nifti", sorted(f for f in glob.glob(os.path.join(nib_dir, "*"))
                                           if f.endswith((".nii", ".nii.gz", ".hdr")))))
    os.makedirs(root / "files")
    for modality, fmt, files in sources:
        for i, src in enumerate(files):
            pid = f"{modality}{i:03d}"
            rel = os.path.join("files", f"{pid}_{os.path.basename(src)}")
            # copies, not symlinks: a symlink out of the input folder is quarantined (PathOutsideInput)
            (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, root / rel)  # a folder: NotAFile
            if src.endswith(".hdr"):  # Analyze pairs: the .img travels with its header
                img = src[:-4] + ".img"
                if os.path.exists(img):
                    shutil.copyfile(img, root / (rel[:-4] + ".img"))
            rows.append((pid, modality, fmt, rel))
            labels.append((pid, i % 2))
    pd.DataFrame(rows, columns=["patient_id", "modality", "format", "path"]).to_csv(root / "manifest.csv", index=False)
    pd.DataFrame(labels, columns=["patient_id", "label"]).to_csv(root / "labels.csv", index=False)
    return str(root), rows


def test_every_shipped_file_is_ingested_or_quarantined(ray_session, shipped_cohort, tmp_path):
    from raypipe.ingest.pipeline import run_ingest

    root, rows = shipped_cohort
    cfg = _cfg(tmp_path, root, "ingest.group_columns=[]", "ingest.error_budget=1.0",
               "ingest.modalities={scan: {kind: volume, size: 16, slices: {policy: all}}, "
               "vol: {kind: volume, size: 16, slices: {policy: even, n: 4}}}")
    summary = run_ingest(cfg)
    assert summary["reconciled"] and summary["ok"]
    assert summary["files_seen"] == len(rows) == summary["files_ingested"] + summary["files_quarantined"]
    rec = pd.read_parquet(os.path.join(cfg.records_dir, "records"))
    errors = pd.read_parquet(os.path.join(cfg.records_dir, "errors.parquet"))
    assert (errors.message.str.len() > 10).all() and errors.error_class.notna().all()
    ingested_samples = set(rec.sample_id)
    quarantined = set(errors.source_path)
    key = path_key(SECRET)
    for pid, modality, _, rel in rows:
        sid = pseudonym(SECRET, pid)
        # exactly one of the two outcomes per file (one patient per file); paths pseudonymised per component
        assert (sid in ingested_samples) != (pseudonymous_path(rel, key) in quarantined), rel
    per = summary["per_modality"]
    assert per["scan"]["ingested"] >= 15 and per["vol"]["ingested"] >= 3
    assert {"CorruptHeader", "NoPixelData", "UnsupportedPhotometric"} <= set(per["scan"]["quarantined_by_class"])
    assert "UnexpectedError" not in set(errors.error_class)
    ct_small = rec[rec.sample_id == pseudonym(SECRET, next(r[0] for r in rows if r[3].endswith("_CT_small.dcm")))]
    assert len(ct_small) == 1 and list(ct_small["shape"].iloc[0]) == [1, 16, 16]
    rtdose = rec[rec.sample_id == pseudonym(SECRET, next(r[0] for r in rows if r[3].endswith("_rtdose.dcm")))]
    assert sorted(rtdose.position) == list(range(15))  # a 15-frame file: every frame, ordered


# ----------------------------------------------------------------------------- a hospital-style cohort
@pytest.fixture(scope="module")
def hospital_cohort(tmp_path_factory):
    """Folder convention (no manifest), patient folders named by the raw patient id, bad files mixed in."""
    import nibabel as nib
    from PIL import Image

    from test_ingest_decoders import write_slice

    root = tmp_path_factory.mktemp("hospital") / "cohort"
    rng = np.random.default_rng(1)
    truth = {}
    for k, pid in enumerate(PATIENTS):
        pdir = root / "patients" / pid
        os.makedirs(pdir / "ct")
        n = 7
        inst = rng.permutation(n) + 1
        uid = f"1.2.826.0.1.{k}"
        zs = []
        for z in range(n):
            hu = np.full((24, 24), -1000.0 + 200.0 * z) + rng.normal(0, 5, (24, 24))
            write_slice(str(pdir / "ct" / f"{rng.integers(1e12):012x}.dcm"), hu, z=-40.0 + 5 * z,
                        instance=int(inst[z]), series=uid)
            zs.append(-40.0 + 5 * z)
        truth[pid] = zs
        vol = rng.random((12, 10, 9)).astype(np.float32) * 8
        nib.save(nib.Nifti1Image(vol, np.diag([-2.0, -2.0, 2.0, 1.0])), str(pdir / "pet.nii.gz"))
        times = pd.date_range("2150-03-01", periods=30, freq="90min")
        ev = pd.DataFrame({"stay_id": 500 + k, "charttime": times.astype(str), "variable": "Heart Rate",
                           "value": (80 + 10 * k + rng.normal(0, 3, 30)).round(1).astype(str)})
        gcs = pd.DataFrame({"stay_id": 500 + k, "charttime": [str(times[3])], "variable": "Glascow coma scale eye opening",
                            "value": ["To Pain"]})
        ev = pd.concat([ev, gcs])
        if k == 0:  # a second, later stay
            ev = pd.concat([ev, ev.assign(stay_id=900, charttime=(pd.to_datetime(ev.charttime)
                                                                   + pd.Timedelta(days=30)).astype(str))])
        ev.to_csv(pdir / "ehr.csv", index=False)
        (pdir / "report.txt").write_text("" if k == 3 else f"FINDINGS: nodule {k} mm. [**Doctor Last Name**]\n")
        Image.fromarray((rng.random((30, 40)) * 255).astype(np.uint8)).save(pdir / "cxr.png")
    bad = root / "patients" / PATIENTS[1] / "ct"
    good = sorted(glob.glob(str(bad / "*.dcm")))[0]
    (bad / "truncated.dcm").write_bytes(open(good, "rb").read()[:-600])
    write_slice(str(bad / "mr.dcm"), np.zeros((24, 24)), modality="MR", series="1.2.826.0.1.99")
    (root / "patients" / PATIENTS[2] / "ct" / "notes.dcm").write_text("not DICOM")
    pd.DataFrame({"patient_id": PATIENTS, "label": [0, 1, 0, 1], "site": ["a", "b", "a", "b"], "sex": "F",
                  "age": [45, 70, 90, 60]}).to_csv(root / "labels.csv", index=False)
    return str(root), truth


HOSPITAL_MODALITIES = ("ingest.modalities={ct: {kind: volume, window: [-1000, 400], size: 16, slices: {policy: even, "
                       "n: 4}}, pet: {kind: volume, window: [0, 8], size: 16, slices: {policy: central, n: 3}}, "
                       "ehr: {kind: ehr}, report: {kind: text, max_words: 5}, cxr: {kind: image, size: 16}}")


@pytest.fixture(scope="module")
def hospital_run(ray_session, hospital_cohort, tmp_path_factory):
    from raypipe.ingest.pipeline import run_ingest

    root, _ = hospital_cohort
    cfg = _cfg(tmp_path_factory.mktemp("run"), root, HOSPITAL_MODALITIES, "ingest.test_fraction=0.5",
               "ingest.error_budget=0.2", "ingest.items_per_task=5")
    return cfg, run_ingest(cfg)


def test_hospital_reconciliation_and_quarantine(hospital_run):
    cfg, summary = hospital_run
    assert summary["reconciled"] and summary["ok"]
    ct = summary["per_modality"]["ct"]
    # 28 good slices (4 selected per series) + 3 bad files
    assert ct == {"seen": 31, "ingested": 16, "not_selected": 12, "quarantined": 3, "empty_as_missing": 0,
                  "reconciled": True, "quarantined_by_class": {"CorruptHeader": 1, "TruncatedFile": 1,
                                                               "WrongModality": 1}}
    assert summary["per_modality"]["report"]["empty_as_missing"] == 1
    assert summary["files_seen"] == sum(summary[f"files_{s}"] for s in ("ingested", "quarantined", "empty_as_missing",
                                                                         "not_selected"))
    assert set(summary["per_modality"]) == {"ct", "pet", "ehr", "report", "cxr"}
    disk = json.load(open(os.path.join(cfg.records_dir, "ingest_summary.json")))
    assert disk["files_seen"] == summary["files_seen"] and "printed" not in disk
    assert "quarantined" in summary["printed"] and "ct" in summary["printed"]
    errors = pd.read_parquet(os.path.join(cfg.records_dir, "errors.parquet"))
    assert (errors.stage == "ingest").all()
    # the patient's folder name is an identifier: every path component is a keyed hash instead
    assert pseudonymous_path(f"patients/{PATIENTS[1]}/ct/truncated.dcm", path_key(SECRET)) in set(errors.source_path)
    assert not any(p in sp for p in PATIENTS for sp in errors.source_path)


def test_hospital_records_sorted_and_anatomical(hospital_run, hospital_cohort):
    from raypipe.ingest import dicom

    cfg, _ = hospital_run
    _, truth = hospital_cohort
    parts = sorted(glob.glob(os.path.join(cfg.records_dir, "records", "part-*.parquet")))
    assert len(parts) > 1  # items_per_task=5: several tasks, several files
    rec = pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)  # file-name order
    schema = pq.read_schema(parts[0])
    # records schema 2: the v1 columns, then one fixed-shape tensor column per modality of fixed shape
    assert schema.names == RECORDS_SCHEMA.names + ["tensor_ct", "tensor_cxr", "tensor_ehr", "tensor_pet"]
    assert schema.field("tensor_ct").type == pa.fixed_shape_tensor(pa.uint8(), [1, 16, 16])
    assert schema.field("tensor_ehr").type == pa.fixed_shape_tensor(pa.float16(), [24, 76])
    assert schema.metadata[b"raypipe.schema_version"] == b"2"
    keys = list(zip(rec.sample_id, rec.modality, rec.source_key, rec.position))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for pid, zs in truth.items():
        ct = rec[(rec.sample_id == pseudonym(SECRET, pid)) & (rec.modality == "ct")].sort_values("position")
        z = [json.loads(m)["z_mm"] for m in ct.meta]
        # the even-4 selection of 7 slices ordered by z, whatever InstanceNumber and file names said
        assert z == [zs[i] for i in (0, 2, 4, 6)]
        files = {dicom.read_header(f).position: f for f in glob.glob(os.path.join(cfg.ingest_input, "patients", pid,
                                                                                   "ct", "*.dcm"))
                 if os.path.basename(f) not in ("truncated.dcm", "mr.dcm", "notes.dcm")}
        for (_, r), zz in zip(ct.iterrows(), z):
            want, _ = dicom.decode_slice(files[zz], 16, (-1000, 400))
            # stored uint8 = round(255 * windowed value), in the tensor column, not as payload bytes
            assert r["payload"] is None and r["dtype"] == "uint8"
            np.testing.assert_array_equal(record_array(r, as_float=False),
                                          np.clip(np.rint(want * 255.0), 0, 255).astype(np.uint8))
            np.testing.assert_allclose(record_array(r), want, atol=0.5 / 255 + 1e-6)
    pet = rec[rec.modality == "pet"]
    assert set(map(tuple, pet["shape"])) == {(1, 16, 16)} and pet.groupby("sample_id").size().eq(3).all()
    cxr = rec[rec.modality == "cxr"]
    assert len(cxr) == 4 and set(map(tuple, cxr["shape"])) == {(1, 16, 16)}
    reports = rec[rec.modality == "report"]
    assert len(reports) == 3 and reports.payload.isna().all()
    # 5 words, the placeholder counting as one and kept verbatim
    assert set(reports.text) == {f"FINDINGS: nodule {k} mm. [**Doctor Last Name**]" for k in range(3)}


def test_hospital_ehr_stays_and_train_only_statistics(hospital_run):
    from raypipe.ingest import ehr

    cfg, _ = hospital_run
    rec = pd.read_parquet(os.path.join(cfg.records_dir, "records"))
    samples = pd.read_parquet(os.path.join(cfg.records_dir, "samples.parquet"))
    assert list(samples.columns) == ["sample_id", "label", "site", "sex", "age_band", "split"]
    assert set(samples.split) == {"train", "test"} and set(samples.age_band) == {"<50", "65-79", "80+", "50-64"}
    rows = rec[rec.modality == "ehr"]
    assert set(map(tuple, rows["shape"])) == {(24, 76)}
    first = rows[rows.sample_id == pseudonym(SECRET, PATIENTS[0])]
    assert sorted(first.position) == [0, 1]  # two stays, chronological
    stats = json.load(open(os.path.join(cfg.records_dir, "ehr_normalisation.json")))
    assert stats["fitted_on"] == "train"
    # refit from the raw files of the training patients only
    train = set(samples.loc[samples.split == "train", "sample_id"])
    xs = [x for pid in PATIENTS if pseudonym(SECRET, pid) in train
          for _, x, _ in ehr.discretise_stays(os.path.join(cfg.ingest_input, "patients", pid, "ehr.csv"))]
    cols = ehr.CONTINUOUS_COLUMNS
    allx = np.concatenate(xs)[:, cols]
    np.testing.assert_allclose(stats["mean"], allx.mean(0), rtol=1e-5)
    # a test patient's stay is standardised with those statistics, unchanged
    test_pid = next(p for p in PATIENTS if pseudonym(SECRET, p) not in train)
    (_, raw, _), = ehr.discretise_stays(os.path.join(cfg.ingest_input, "patients", test_pid, "ehr.csv"))
    r = rows[rows.sample_id == pseudonym(SECRET, test_pid)].iloc[0]
    assert r["dtype"] == "float16"  # stored as float16: the reference rounded to float16, exactly
    np.testing.assert_array_equal(record_array(r),
                                  ehr.standardise(raw, stats).astype(np.float16).astype(np.float32))


def test_hospital_no_phi_in_any_output_byte(hospital_run):
    cfg, _ = hospital_run
    blobs = _outputs(cfg.records_dir)
    assert len(blobs) >= 5
    for value in PHI + PATIENTS:
        needle = value.encode()
        leaks = [name for name, b in blobs.items() if needle in b]
        assert not leaks, f"identifying value {value[:3]}... found in {leaks}"


def test_hospital_rerun_is_byte_identical_and_loaded_statistics(hospital_run, hospital_cohort, tmp_path):
    from raypipe.ingest.pipeline import run_ingest

    cfg, summary = hospital_run
    root, _ = hospital_cohort
    again = _cfg(tmp_path / "again", root, HOSPITAL_MODALITIES, "ingest.test_fraction=0.5",
                 "ingest.error_budget=0.2", "ingest.items_per_task=5")
    run_ingest(again)
    a, b = _outputs(cfg.records_dir), _outputs(again.records_dir)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    # inference-style run: statistics loaded from the first run, applied unchanged whatever the split
    stats_path = os.path.join(cfg.records_dir, "ehr_normalisation.json")
    loaded = _cfg(tmp_path / "loaded", root, HOSPITAL_MODALITIES, "ingest.test_fraction=0.5", "run.seed=7",
                  f"ingest.ehr.normalisation={stats_path}", "ingest.error_budget=0.0")
    out = run_ingest(loaded)
    assert out["ok"] is False and out["within_error_budget"] is False and out["reconciled"]  # budget 0: exceeded
    s1, s2 = json.load(open(stats_path)), json.load(open(os.path.join(loaded.records_dir, "ehr_normalisation.json")))
    assert s1["mean"] == s2["mean"] and s2["fitted_on"].startswith("loaded")
    r1 = pd.read_parquet(os.path.join(cfg.records_dir, "records")).query("modality == 'ehr'")
    r2 = pd.read_parquet(os.path.join(loaded.records_dir, "records")).query("modality == 'ehr'")
    assert len(r1) == len(r2) and r1.payload.isna().all()
    assert all(np.array_equal(a, b) for a, b in zip(r1.tensor_ehr, r2.tensor_ehr))


def test_rerun_replaces_previous_output_atomically(ray_session, hospital_cohort, tmp_path, monkeypatch):
    from raypipe.ingest import pipeline

    root, _ = hospital_cohort
    cfg = _cfg(tmp_path, root, HOSPITAL_MODALITIES, "ingest.error_budget=0.5", "ingest.test_fraction=0.5")
    os.makedirs(cfg.records_dir)
    open(os.path.join(cfg.records_dir, "stale.txt"), "w").write("old")
    write_marker(cfg.records_dir, "ingest")  # what an earlier run leaves: replaceable, but only on success

    def boom(*a, **k):
        raise RuntimeError("crash before the rename")

    monkeypatch.setattr(pipeline, "summarise", boom)
    with pytest.raises(RuntimeError):
        pipeline.run_ingest(cfg)
    assert sorted(os.listdir(cfg.records_dir)) == [MARKER, "stale.txt"]  # untouched by the failed run
    assert not [d for d in os.listdir(os.path.dirname(cfg.records_dir)) if d.startswith(".ingest-")]


def test_missing_secret_refuses_to_start(hospital_cohort, tmp_path, monkeypatch):
    from raypipe.ids import MissingSecretError
    from raypipe.ingest.pipeline import run_ingest

    monkeypatch.delenv("RAYPIPE_ID_SECRET", raising=False)
    with pytest.raises(MissingSecretError, match="RAYPIPE_ID_SECRET"):
        run_ingest(_cfg(tmp_path, hospital_cohort[0]))


# ----------------------------------------------------------------------------- the synthetic cohort
def test_synthetic_cohort_order_hu_ehr_phi_and_counts(ray_session, clinical_cohort, tmp_path):
    import pydicom

    from raypipe.ingest.pipeline import run_ingest

    root, truth = clinical_cohort
    cfg = _cfg(tmp_path, root, "ingest.modalities.ct={kind: volume, window: [-1000, 400], size: 32, "
               "slices: {policy: all}}", "ingest.modalities.pet={kind: volume, window: [0, 10], size: 32}")
    summary = run_ingest(cfg)
    assert summary["ok"] and summary["reconciled"] and summary["files_quarantined"] == 0
    manifest = pd.read_csv(os.path.join(root, "manifest.csv"))
    assert summary["files_seen"] == len(manifest) == truth["files"]
    rec = pd.read_parquet(os.path.join(cfg.records_dir, "records"))
    ct = rec[rec.modality == "ct"]
    assert ct.sample_id.nunique() == truth["available"]["ct"]
    assert len(ct) == truth["available"]["ct"] * truth["slices"]  # policy all: every slice once
    for _, series in ct.groupby("source_key"):
        z = [json.loads(m)["z_mm"] for m in series.sort_values("position").meta]
        assert z == sorted(z) and len(set(z)) == len(z)
    # HU: the synthetic air outside the body is -1024 HU -> 0 after the lung window, soft tissue > 0.5
    img = record_array(ct.iloc[0])
    assert img[0, 0, 0] == pytest.approx(0.0, abs=0.02) and img.max() > 0.5
    assert set(map(tuple, rec[rec.modality == "ehr"]["shape"])) == {(24, 76)}
    assert (rec.modality == "ehr").sum() == truth["available"]["ehr"]
    phi = set()
    for f in glob.glob(os.path.join(root, "patients", "*", "*", "*.dcm"))[:300]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        phi |= {str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate), str(ds.AccessionNumber),
                str(ds.InstitutionName)}
    blobs = _outputs(cfg.records_dir)
    for value in phi:
        assert not any(value.encode() in b for b in blobs.values()), f"PHI leaked: {value[:3]}..."
    shutil.rmtree(cfg.records_dir)


def test_regions_cohort_geotiff_patches_and_tabular(ray_session, regions_cohort, tmp_path):
    from raypipe.ingest.pipeline import run_ingest

    root, truth = regions_cohort
    cfg = _cfg(tmp_path, root, "ingest.group_columns=[zone]",
               "ingest.modalities={sat: {kind: geotiff, size: 32}, covariates: {kind: tabular}}")
    summary = run_ingest(cfg)
    assert summary["ok"] and summary["reconciled"]
    rec = pd.read_parquet(os.path.join(cfg.records_dir, "records"))
    sat = rec[rec.modality == "sat"]
    assert set(map(tuple, sat["shape"])) == {(6, 32, 32)}  # all six bands kept
    metas = [json.loads(m) for m in sat.meta]
    assert all(len(m["geotransform"]) == 6 and m["bands"][3] == "nir" for m in metas)
    assert sat.sample_id.nunique() == truth["available"]["sat"]
    cov = rec[rec.modality == "covariates"]
    assert set(map(tuple, cov["shape"])) == {(6,)} and json.loads(cov.meta.iloc[0])["columns"][0] == "pop_density"
    # every band kept: no shape fixed by the config, so uint8 payload bytes; covariates stay float32
    assert set(sat.dtype) == {"uint8"} and sat.payload.notna().all() and set(cov.dtype) == {"float32"}
    assert 0.0 <= record_array(sat.iloc[0]).min() and record_array(sat.iloc[0]).max() <= 1.0


def test_unlabelled_cohort_for_inference(hospital_run, hospital_cohort, tmp_path):
    """No labels.csv (a raw cohort to predict): every manifest patient is a sample with null labels."""
    from raypipe.ingest.pipeline import UNLABELLED_SPLIT, run_ingest

    trained_cfg, _ = hospital_run
    root = str(tmp_path / "cohort")
    shutil.copytree(hospital_cohort[0], root, ignore=shutil.ignore_patterns("labels.csv"))
    cfg = _cfg(tmp_path / "out", root, HOSPITAL_MODALITIES, "ingest.error_budget=0.2")
    with pytest.raises(ValueError, match="ingest.ehr.normalisation"):
        run_ingest(cfg)  # EHR files and nothing to fit their statistics on: refuse before starting
    stats_path = os.path.join(trained_cfg.records_dir, "ehr_normalisation.json")
    cfg = _cfg(tmp_path / "out", root, HOSPITAL_MODALITIES, "ingest.error_budget=0.2",
               f"ingest.ehr.normalisation={stats_path}")
    summary = run_ingest(cfg)
    assert summary["ok"] and summary["labelled"] is False
    assert summary["samples"] == len(PATIENTS) and "NoLabel" not in json.dumps(summary)
    samples = pq.read_table(os.path.join(cfg.records_dir, "samples.parquet")).to_pandas()
    assert sorted(samples.sample_id) == sorted(pseudonym(SECRET, p) for p in PATIENTS)
    assert samples["label"].isna().all() and (samples["split"] == UNLABELLED_SPLIT).all()
    assert (samples["site"] == "unknown").all()
    rec = pd.concat([pq.read_table(p).to_pandas()
                     for p in sorted(glob.glob(os.path.join(cfg.records_dir, "records", "*.parquet")))])
    assert set(rec.sample_id) == set(samples.sample_id)
    assert all(json.loads(m)["standardised"] for m in rec[rec.modality == "ehr"].meta)
    # same records as the labelled run (the labels never touch the records)
    labelled = pd.concat([pq.read_table(p).to_pandas()
                          for p in sorted(glob.glob(os.path.join(trained_cfg.records_dir, "records", "*.parquet")))])
    assert len(labelled) == len(rec)
    assert list(labelled.source_key) == list(rec.source_key)

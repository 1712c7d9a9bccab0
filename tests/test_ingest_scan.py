"""Ingest from a folder without a manifest: `raypipe scan` and `raypipe ingest --input DIR`.

A hand-built export tree (every file's fate worked out by hand below), pydicom's own
test files copied into a folder tree, and the CLI. Checks: every file found is a
manifest row or one scan error row, the inferred manifest groups by PatientID and maps
DICOM Modality as configured, unmapped modalities are reported (never dropped), and no
PatientID, name or folder name reaches what is written or printed.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import pandas as pd
import pytest

from raypipe.config import load_config
from raypipe.ingest import scan

PYDICOM_FILES = os.path.join(os.path.dirname(__import__("pydicom").__file__), "data", "test_files")
CT_SMALL = os.path.join(PYDICOM_FILES, "CT_small.dcm")
MR_SMALL = os.path.join(PYDICOM_FILES, "MR_small.dcm")
#: planted identity: in headers, folder names and file names of the hand-built tree
PHI = ["Quixote^Alonso", "MRN-HB-5501", "MRN-HB-7702", "19390412", "ACC99119911", "Quixote_19390412"]
MODALITIES = {"ct": "volume", "pet": "volume", "mr": "volume", "ehr": "ehr", "report": "text"}


def _dicom(src, dst, patient_id, modality=None, series="1.2.826.0.1.3680043.2.1125.1", study="1.2.3.4.5"):
    import pydicom

    ds = pydicom.dcmread(src)
    ds.PatientID = patient_id
    ds.PatientName = "Quixote^Alonso"
    ds.PatientBirthDate = "19390412"
    ds.AccessionNumber = "ACC99119911"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    if modality is not None:
        ds.Modality = modality
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    ds.save_as(dst)


@pytest.fixture
def export_tree(tmp_path):
    """A small PACS-style export and the fate of each of its files, worked out by hand."""
    root = tmp_path / "export"
    p1 = root / "Quixote_19390412" / "ACC99119911"  # a folder named after the patient, as exports do
    _dicom(CT_SMALL, str(p1 / "IM0001"), "MRN-HB-5501", series="1.2.3.4.5.1")  # no extension: probed
    _dicom(CT_SMALL, str(p1 / "IM0002.dcm"), "MRN-HB-5501", series="1.2.3.4.5.1")
    _dicom(MR_SMALL, str(p1 / "MR" / "IM0003.dcm"), "MRN-HB-5501", series="1.2.3.4.5.2")
    _dicom(CT_SMALL, str(p1 / "US0001.dcm"), "MRN-HB-5501", modality="US", series="1.2.3.4.5.3")
    (p1 / "report.txt").write_text("No acute findings.")  # beside one patient's DICOM files: that patient
    _dicom(CT_SMALL, str(root / "other" / "CT1.dcm"), "MRN-HB-7702", series="1.2.3.4.6.1", study="1.2.3.4.6")
    _dicom(CT_SMALL, str(root / "other" / "anon.dcm"), "", series="1.2.3.4.7.1")  # no PatientID
    _dicom(CT_SMALL, str(root / "other" / "named.dcm"), "MRN-HB-7702", modality="Quixote", series="1.2.3.4.6.2",
           study="1.2.3.4.6")  # a name where the Modality code belongs
    data = open(CT_SMALL, "rb").read()
    (root / "other" / "cut.dcm").write_bytes(data[:200])  # truncated inside the header
    (root / "other" / "notes.json").write_text("{}")
    os.makedirs(root / "sub-77" / "anat")
    shutil.copy(CT_SMALL, root / "sub-77" / "anat" / "pet.nii.gz")  # a BIDS folder names the patient
    (root / "other" / ".DS_Store").write_bytes(b"\0\1")
    (root / "labels.csv").write_text("patient_id,label\nMRN-HB-5501,1\n")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    os.symlink(outside, root / "other" / "link_out.txt")
    os.symlink(root / "other" / "CT1.dcm", root / "other" / "link_in.dcm")
    os.mkfifo(root / "other" / "pipe.dcm")
    fate = {  # relative path -> (outcome or "manifest", class or modality)
        "Quixote_19390412/ACC99119911/IM0001": ("manifest", "ct"),
        "Quixote_19390412/ACC99119911/IM0002.dcm": ("manifest", "ct"),
        "Quixote_19390412/ACC99119911/MR/IM0003.dcm": ("manifest", "mr"),
        "Quixote_19390412/ACC99119911/US0001.dcm": ("unmapped", "UnmappedModality"),
        "Quixote_19390412/ACC99119911/report.txt": ("manifest", "report"),
        "other/CT1.dcm": ("manifest", "ct"),
        "other/anon.dcm": ("unassigned", "NoPatientID"),
        "other/named.dcm": ("unmapped", "UnmappedModality"),
        "other/cut.dcm": ("unreadable", "CorruptHeader"),
        "other/notes.json": ("skipped", "UnsupportedFormat"),
        "other/.DS_Store": ("skipped", "Hidden"),
        "other/link_out.txt": ("unreadable", "PathOutsideInput"),
        "other/link_in.dcm": ("skipped", "Symlink"),
        "other/pipe.dcm": ("unreadable", "NotAFile"),
        "sub-77/anat/pet.nii.gz": ("manifest", "pet"),
        "labels.csv": ("skipped", "CohortFile"),
    }
    return str(root), fate


def _scan_pure(root, modalities=MODALITIES, modality_map=scan.DEFAULT_MODALITY_MAP):
    candidates, walk_errors = scan.list_files(root)
    facts = {c["rel"]: scan.dicom_facts(os.path.join(root, c["rel"]), probe=c["format"] is None)
             for c in candidates if scan.needs_header(c)}
    manifest, errors = scan.infer_manifest(candidates, facts, modalities, modality_map)
    return len(candidates) + len(walk_errors), manifest, walk_errors + errors


def test_every_file_has_its_hand_worked_fate(export_tree):
    root, fate = export_tree
    n, manifest, errors = _scan_pure(root)
    assert n == len(fate)
    got = {r["path"]: ("manifest", r["modality"]) for r in manifest.to_dict("records")}
    got.update({e["rel"]: (e["outcome"], e["error_class"]) for e in errors})
    assert got == fate
    assert scan.accounted(n, manifest, errors)
    # grouping: the two CT files of patient 1 are one series; patient 2's CT another; report -> patient 1
    pid = dict(zip(manifest["path"], manifest["patient_id"]))
    assert pid["Quixote_19390412/ACC99119911/report.txt"] == "MRN-HB-5501"
    assert pid["other/CT1.dcm"] == "MRN-HB-7702" and pid["sub-77/anat/pet.nii.gz"] == "77"
    summary = scan.summarise(n, manifest, errors)
    # DICOM CT found: 3 series in 4 files (anon.dcm's series has no PatientID: counted, unassigned), 2 patients
    assert summary["per_dicom_modality"]["CT"] == {"patients": 2, "studies": 2, "series": 3, "files": 4,
                                                   "ingested_as": ["ct"], "unmapped": 0, "unassigned": 1}
    assert summary["per_dicom_modality"]["US"]["unmapped"] == 1
    assert summary["per_modality"]["ct"] == {"patients": 2, "studies": 2, "series": 2, "files": 3}
    assert summary["reconciled"]


def test_unconfigured_target_is_reported_with_the_fix(export_tree):
    root, _ = export_tree
    mods = {m: k for m, k in MODALITIES.items() if m != "mr"}
    _, manifest, errors = _scan_pure(root, modalities=mods)
    assert "mr" not in set(manifest["modality"])
    mr = [e for e in errors if e["rel"].endswith("IM0003.dcm")]
    assert [e["error_class"] for e in mr] == ["UnmappedModality"]
    assert "ingest.modalities.mr.kind=volume" in mr[0]["message"]


def test_review_copy_and_table_hold_no_identity(export_tree):
    root, _ = export_tree
    n, manifest, errors = _scan_pure(root)
    review, err = scan.review_tables(manifest, errors, b"id-secret", b"source-secret", b"path-key")
    text = review.to_csv() + err.to_csv() + scan.scan_table(scan.summarise(n, manifest, errors)) + \
        json.dumps(scan.summarise(n, manifest, errors))
    for value in PHI + ["Quixote", "ACC99119911", "1.2.3.4.5.1"]:
        assert value not in text
    assert set(review.columns) >= {"sample_id", "modality", "format", "path", "series_key"}
    assert len(review) == len(manifest) and len(err) == len(errors)
    # with plain paths (privacy.plain_paths) the folder names are the user's choice
    review_plain, _ = scan.review_tables(manifest, errors, b"id-secret", b"source-secret", None)
    assert "Quixote_19390412/ACC99119911/IM0002.dcm" in set(review_plain["path"])


def test_dicom_facts_of_damaged_and_preamble_less_files(tmp_path):
    facts = scan.dicom_facts(os.path.join(PYDICOM_FILES, "ExplVR_LitEndNoMeta.dcm"), probe=True)  # no preamble
    assert facts["ok"] and facts["dicom_modality"] == "RTPLAN"
    text = tmp_path / "x"
    text.write_text("hello, this is not DICOM at all\n" * 20)
    assert scan.dicom_facts(str(text), probe=True)["outcome"] == "skipped"
    assert scan.dicom_facts(str(text), probe=False)["error_class"] == "CorruptHeader"
    missing = scan.dicom_facts(str(tmp_path / "nope.dcm"))
    assert missing["error_class"] == "FileMissing"


# ----------------------------------------------------------------------------- on Ray
def _copy_pydicom_tree(dst) -> int:
    shutil.copytree(PYDICOM_FILES, dst)
    return sum(len(files) + sum(os.path.islink(os.path.join(d, x)) for x in dirs)
               for d, dirs, files in os.walk(dst))


@pytest.mark.ray
def test_ingest_input_on_pydicom_test_files_reconciles(tmp_path, ray_session):
    """`ingest --input` on pydicom's shipped test files in a folder tree without a manifest."""
    import pydicom

    from raypipe.ingest.scan_pipeline import run_ingest_auto

    tree = str(tmp_path / "export")
    n_files = _copy_pydicom_tree(tree)
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}", f"ingest.input={tree}", "ray.progress_bars=false",
                             "ingest.modalities.mr.kind=volume", "ingest.error_budget=1.0"])
    summary = run_ingest_auto(cfg)
    assert summary["scan"]["files_found"] == n_files
    assert summary["reconciled"] and summary["ok"]
    sc = summary["scan"]
    assert sc["manifest_rows"] + sc["files_unreadable"] + sc["files_unmapped"] + sc["files_unassigned"] + \
        sc["files_skipped"] == n_files
    assert summary["files_seen"] == sc["manifest_rows"] > 0
    assert summary["files_seen"] == summary["files_ingested"] + summary["files_quarantined"] + \
        summary["files_empty_as_missing"] + summary["files_not_selected"]
    assert summary["records"] > 0 and set(summary["per_modality"]) == {"ct", "mr"}
    # every file not in the manifest is one scan error row; unmapped modalities are named
    scan_dir = sc["scan_dir"]
    err = pd.read_parquet(os.path.join(scan_dir, "scan_errors.parquet"))
    assert len(err) == n_files - sc["manifest_rows"]
    assert {"US", "RTDOSE"} <= set(err.loc[err["outcome"] == "unmapped", "modality"])
    review = pd.read_csv(os.path.join(scan_dir, "inferred_manifest.csv"))
    assert len(review) == sc["manifest_rows"]
    # no PatientID (of 6+ characters: shorter ones occur by chance in binary payloads) in any output
    ids = set()
    for f in glob.glob(os.path.join(tree, "**", "*"), recursive=True):
        try:
            ids.add(str(pydicom.dcmread(f, stop_before_pixels=True, force=True).get("PatientID", "")).strip())
        except Exception:  # noqa: BLE001 - non-DICOM files of the tree
            pass
    ids = {i for i in ids if len(i) >= 6}
    assert ids
    blobs = [open(f, "rb").read() for f in glob.glob(os.path.join(tmp_path / "run", "**", "*"), recursive=True)
             if os.path.isfile(f)]
    assert blobs
    for i in ids:
        assert not any(i.encode() in b for b in blobs), "a PatientID reached an output"


@pytest.mark.ray
def test_cli_scan_prints_summary_and_refuses_foreign_out(tmp_path, ray_session, capsys):
    from raypipe import cli

    tree = str(tmp_path / "export")
    n_files = _copy_pydicom_tree(tree)
    run = tmp_path / "run"
    rc = cli.main(["scan", "--input", tree, "--out-dir", str(run), "--set", "ray.progress_bars=false"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"files found {n_files} = manifest rows" in out and "reconciled" in out
    assert "DICOM CT" in out and "DICOM MR" in out and "-- unmapped" in out
    summary = json.load(open(run / "scan" / "scan_summary.json"))
    assert summary["files_found"] == n_files and summary["paths"] == "pseudonymised"
    # a folder raypipe did not write is never replaced
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("mine")
    rc = cli.main(["scan", "--input", tree, "--set", f"ingest.scan.out={foreign}", "--set", "ray.progress_bars=false"])
    assert rc == 1 and (foreign / "thesis.docx").read_text() == "mine"
    # nor the input, nor a folder inside it
    rc = cli.main(["scan", "--input", tree, "--set", f"ingest.scan.out={tree}/scan", "--set",
                   "ray.progress_bars=false"])
    assert rc == 1 and not os.path.exists(os.path.join(tree, "scan"))


@pytest.mark.parametrize("vr", [b"OB", b"UN", b"UT", b"SQ", b"OW"])
def test_flipped_sop_class_vr_is_unreadable_and_quotes_nothing(tmp_path, vr, caplog):
    """A flipped VR code of SOPClassUID swallows the header into that element: the scan calls the file
    unreadable, and neither its answer nor a warning or log line quotes the swallowed names and ids."""
    import logging
    import warnings

    src = tmp_path / "src.dcm"
    _dicom(CT_SMALL, str(src), "MRN-HB-5501")
    data = src.read_bytes()
    pos = data.find(b"\x08\x00\x16\x00UI")
    assert pos > 0
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(data[:pos + 4] + vr + data[pos + 6:])
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        facts = scan.dicom_facts(str(bad))
    assert facts["ok"] is False and facts["error_class"] == "CorruptHeader"
    said = json.dumps(facts) + " ".join(str(w.message) for w in caught) + caplog.text
    for value in PHI[:4]:
        assert value not in said


def test_ingest_scans_only_a_folder_without_manifest_or_patients(tmp_path):
    from raypipe.ingest.scan_pipeline import wants_scan

    cfg = load_config(None, [])
    export = tmp_path / "export"
    export.mkdir()
    assert wants_scan(cfg, str(export))
    (export / "patients").mkdir()  # the folder convention (docs/ingest.md) wins
    assert not wants_scan(cfg, str(export))
    (export / "patients").rmdir()
    (export / "manifest.csv").write_text("patient_id,modality,format,path\n")
    assert not wants_scan(cfg, str(export))
    assert wants_scan(load_config(None, ["ingest.scan.use=always"]), str(export))
    assert not wants_scan(load_config(None, ["ingest.scan.use=never"]), str(tmp_path / "empty"))

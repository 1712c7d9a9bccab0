"""Fuzz suite: ingest on 250+ hostile files (tests/hostile_files.py) in two Ray runs.

The corpus is seeded and built from pydicom's and nibabel's shipped files plus a small
synthetic cohort with identity planted in headers, folder names and file names. Run 1
ingests a cohort whose manifest lists every hostile file (and hostile paths); run 2 runs
``raypipe ingest --input`` (scan, then ingest) on a hostile export tree without a manifest.
For each run: no crash (the run returns its summary), no hang (pytest-timeout), every
input reconciled (a record or an error row, counts add up), no planted identity in any
output file, log line or Ray session log, no non-finite payload, no ``UnexpectedError``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from raypipe.config import load_config

sys.path.insert(0, os.path.dirname(__file__))
import hostile_files  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

#: a run of a few hundred files on 2 cores takes 10-40 s; a hostile file that hangs a task would
#: keep it running until this limit (pytest-timeout fails the test)


class _Capture(logging.Handler):
    """Every log record the driver emits during a run (formatted, with arguments)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - a record that cannot be formatted
            self.lines.append(str(record.msg))


def _run(fn, cfg):
    """``fn(cfg)`` with the driver's log records captured (root logger at INFO, raypipe at DEBUG)."""
    cap = _Capture()
    root, rp = logging.getLogger(), logging.getLogger("raypipe")
    levels = (root.level, rp.level)
    root.addHandler(cap)
    root.setLevel(logging.INFO)
    rp.setLevel(logging.DEBUG)
    try:
        result = fn(cfg)
    finally:
        root.removeHandler(cap)
        root.setLevel(levels[0])
        rp.setLevel(levels[1])
    return result, cap.lines


def _cfg(out, inp):
    return load_config(None, [f"run.out_dir={out}", f"ingest.input={inp}", "ray.progress_bars=false",
                              *hostile_files.FUZZ_OVERRIDES])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return hostile_files.build(str(tmp_path_factory.mktemp("hostile")), seed=0)


@pytest.fixture(scope="module")
def manifest_run(corpus, tmp_path_factory, ray_session):
    from raypipe.ingest.pipeline import run_ingest

    out = str(tmp_path_factory.mktemp("fuzz_manifest_run"))
    summary, logs = _run(run_ingest, _cfg(out, corpus.manifest_cohort))
    return out, summary, logs


@pytest.fixture(scope="module")
def scan_run(corpus, tmp_path_factory, ray_session):
    from raypipe.ingest.scan_pipeline import run_ingest_auto

    out = str(tmp_path_factory.mktemp("fuzz_scan_run"))
    summary, logs = _run(run_ingest_auto, _cfg(out, corpus.scan_folder))
    return out, summary, logs


def _output_texts(out_dir) -> dict[str, bytes]:
    """Every output file's bytes; Parquet files also decoded (compressed pages would hide a string)."""
    texts = {}
    for f in sorted(glob.glob(os.path.join(out_dir, "**", "*"), recursive=True)):
        if not os.path.isfile(f):
            continue
        data = open(f, "rb").read()
        if f.endswith(".parquet"):
            t = pq.read_table(f)
            parts = [json.dumps({k.decode(errors="replace"): v.decode(errors="replace")
                                 for k, v in (t.schema.metadata or {}).items()})]
            for col in t.column_names:
                for v in t.column(col).to_pylist():
                    parts.append(v.decode("latin-1") if isinstance(v, bytes) else str(v))
            data += "\n".join(parts).encode("utf-8", "replace")
        texts[os.path.relpath(f, out_dir)] = data
    return texts


def _session_logs() -> dict[str, bytes]:
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    logs = {}
    for f in glob.glob(os.path.join(session, "logs", "**", "*"), recursive=True):
        if os.path.isfile(f):
            with open(f, "rb") as fh:
                logs[f] = fh.read()
    # the workers' own stdout/stderr files are there (a grep of nothing would prove nothing)
    assert any(os.path.basename(f).startswith("worker-") for f in logs), sorted(logs)[:5]
    return logs


def _leaks(phi: list[str], blobs: dict[str, bytes]) -> list[tuple[str, str]]:
    return [(value, name) for value in phi for name, blob in blobs.items()
            if value.encode() in blob or value.lower().encode() in blob.lower()]


def _phi_values(corpus) -> list[str]:
    return corpus.phi + [os.environ["RAYPIPE_ID_SECRET"]]


def _non_finite_payloads(records_dir) -> int:
    from raypipe.schema import payload_to_array

    bad = 0
    for f in sorted(glob.glob(os.path.join(records_dir, "records", "*.parquet"))):
        t = pq.read_table(f, columns=["payload", "dtype", "shape"]).to_pylist()
        for r in t:
            if r["payload"] is None:
                continue
            a = payload_to_array(r["payload"], r["dtype"], r["shape"])
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                bad += 1
    return bad


# ----------------------------------------------------------------------------- hostile configs
@pytest.mark.timeout(30)
@pytest.mark.parametrize("override", ["ingest.modalities.ct.window=[.nan, .nan]",
                                      "ingest.modalities.ct.window=[400, -1000]",
                                      "ingest.modalities.ct.window=[.inf, 1]",
                                      "ingest.modalities.ct.size=20000"])
def test_hostile_config_stops_with_one_line(override):
    from raypipe.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value) and "ingest.modalities.ct" in str(err.value)


# ----------------------------------------------------------------------------- the corpus itself
def test_corpus_covers_the_hostile_classes(corpus):
    assert corpus.n_files >= 200
    needed = {"dicom_truncated", "dicom_byte_flip", "dicom_vr_flip_sop_class", "dicom_zeroed_header",
              "dicom_huge_dimensions", "dicom_huge_frames", "nifti_huge_header", "nifti_gzip_bomb", "nifti_non_finite",
              "symlink_dev_zero", "fifo", "symlink_out", "path_dotdot", "path_absolute", "report_is_dicom",
              "ehr_bad_value", "ehr_bad_csv", "tricky_id", "synthetic_planted_phi"}
    assert needed <= set(corpus.categories)
    # the planted identity really is in the inputs (else the grep below proves nothing)
    blob = b"".join(open(os.path.join(corpus.manifest_cohort, p), "rb").read()
                    for p in corpus.manifest["path"] if p.endswith(".dcm") and "synthetic" in p)
    for value in ("Zqvrelle^Orrinthia", "PHIMRN-7316-5520", "ACCPHI88117733"):
        assert value.encode() in blob
    assert any(hostile_files.PLANTED["folder"] in p for p in corpus.manifest["path"])


# ----------------------------------------------------------------------------- run 1: a hostile manifest
def test_manifest_run_reconciles_every_row(corpus, manifest_run):
    out, summary, _ = manifest_run
    assert isinstance(summary, dict) and "files_seen" in summary  # the run finished: no crash
    assert summary["reconciled"]
    assert summary["files_seen"] + sum(summary["skipped_modalities"].values()) == len(corpus.manifest)
    assert summary["skipped_modalities"] == {"ultrasound": 1}
    errors = pq.read_table(os.path.join(summary["records_dir"], "errors.parquet")).to_pandas()
    assert len(errors) >= summary["files_quarantined"] + summary["files_empty_as_missing"]
    assert summary["files_ingested"] > 0  # the intact files and the synthetic cohort still get through
    # per row: a configured row without an error row is ingested (or a slice not selected), one with an
    # error row is quarantined (or an empty report): the counts of both kinds of row match the summary
    state = _state_by_row(corpus, summary["records_dir"])
    configured = corpus.manifest["modality"] != "ultrasound"
    clean = sum(s == "ok" for s, c in zip(state, configured) if c)
    assert clean == summary["files_ingested"] + summary["files_not_selected"]
    assert sum(configured) - clean == summary["files_quarantined"] + summary["files_empty_as_missing"]


#: hostile class -> the one error class each of its files must end in (the issue's "one class per cause")
EXPECTED_CLASS = {
    "path_dotdot": "PathOutsideInput", "path_absolute": "PathOutsideInput", "symlink_out": "PathOutsideInput",
    "symlink_out_folder": "PathOutsideInput", "symlink_dev_zero": "PathOutsideInput",
    "fifo": "NotAFile", "folder_as_file": "NotAFile", "missing_file": "FileMissing",
    "dicom_huge_dimensions": "ResourceLimit", "dicom_huge_frames": "ResourceLimit",
    "dicom_deflate_bomb": "ResourceLimit", "nifti_huge_header": "ResourceLimit", "nifti_gzip_bomb": "ResourceLimit",
    "image_huge_dimensions": "ResourceLimit",
    "nifti_non_finite": "NonFinite", "report_is_dicom": "UnsupportedFormat", "report_is_binary": "UnsupportedFormat",
    "unknown_format": "UnsupportedFormat", "ehr_bad_csv": "BadCSV", "report_empty": "EmptyReport",
}
#: hostile-looking inputs that are valid and must be ingested (no error row)
MUST_INGEST = {"dicom_intact", "nifti_intact", "report_intact", "report_huge", "report_latin1", "image_intact",
               "ehr_intact", "synthetic_planted_phi", "nifti_gzip_trailing_bomb"}


def _state_by_row(corpus, records_dir) -> list[str]:
    """Per manifest row: its error classes ("+"-joined) or "ok". Rows are matched to ``errors.source_path`` by
    the documented keyed hash of each path component (or the plain path with ``privacy.plain_paths``)."""
    from raypipe.ingest import safety

    errors = pq.read_table(os.path.join(records_dir, "errors.parquet")).to_pandas()
    key = safety.path_key(os.environ["RAYPIPE_ID_SECRET"].encode())
    by_path: dict[str, set] = {}
    for p, c in zip(errors["source_path"], errors["error_class"]):
        by_path.setdefault(p, set()).add(c)
    return ["+".join(sorted(by_path.get(safety.pseudonymous_path(p, key), {"ok"}))) for p in corpus.manifest["path"]]


def test_manifest_run_one_clear_class_per_cause(corpus, manifest_run):
    _, summary, _ = manifest_run
    m = corpus.manifest.assign(state=_state_by_row(corpus, summary["records_dir"]))
    wrong = {}
    for cat, cls in EXPECTED_CLASS.items():
        got = m.loc[m["category"] == cat, "state"].value_counts().to_dict()
        if set(got) != {cls}:
            wrong[cat] = got
    for cat in MUST_INGEST:
        got = m.loc[m["category"] == cat, "state"].value_counts().to_dict()
        if set(got) != {"ok"}:
            wrong[cat] = got
    # ids pandas would read as missing are ids like any other; only the empty one is an error row
    ids = m[m["category"] == "tricky_id"]
    if list(ids.loc[ids["patient_id"] == "", "state"]) != ["MissingId"] or \
            set(ids.loc[ids["patient_id"] != "", "state"]) != {"ok"}:
        wrong["tricky_id"] = dict(zip(ids["patient_id"], ids["state"]))
    assert wrong == {}


def test_manifest_run_decoder_panic_is_corrupt_pixel_data(corpus, manifest_run):
    """A native decoder that panics on a damaged RLE stream: the file's pixel data is corrupt, its worker was
    neither out of memory nor to be retried (a task that dies costs Ray's retries, ~a minute here)."""
    _, summary, _ = manifest_run
    m = corpus.manifest.assign(state=_state_by_row(corpus, summary["records_dir"]))
    assert list(m.loc[m["category"] == "dicom_rle_decoder_panic", "state"]) == ["CorruptPixelData"]


@pytest.mark.timeout(60)
def test_decoder_panic_is_a_quarantine_reason(tmp_path):
    """The same damaged RLE stream without Ray: the DICOM decoder reports it, it does not raise."""
    from raypipe.ingest import dicom

    path = tmp_path / "panic.dcm"
    path.write_bytes(hostile_files.rle_decoder_panic())
    _, errors, _ = dicom.decode_series([str(path)], 32, None, "all", 16, 2)
    assert [e.error_class for _, e in errors] == ["CorruptPixelData"]


def test_manifest_run_has_no_unexpected_error(manifest_run):
    _, summary, _ = manifest_run
    errors = pq.read_table(os.path.join(summary["records_dir"], "errors.parquet")).to_pandas()
    unexpected = errors[errors["error_class"] == "UnexpectedError"]
    assert unexpected.empty, unexpected["message"].value_counts().to_dict()


def test_manifest_run_payloads_are_finite(manifest_run):
    _, summary, _ = manifest_run
    assert _non_finite_payloads(summary["records_dir"]) == 0
    stats = json.load(open(os.path.join(summary["records_dir"], "ehr_normalisation.json")))
    for key in ("mean", "std"):
        assert np.isfinite(np.asarray(stats.get(key, []), float)).all()
    assert summary["ok"]


def test_manifest_run_leaks_no_planted_identity(corpus, manifest_run):
    out, summary, logs = manifest_run
    blobs = _output_texts(out)
    assert any(name.endswith("errors.parquet") for name in blobs)
    blobs["driver log"] = "\n".join(logs).encode()
    assert _leaks(_phi_values(corpus), blobs) == []
    assert _leaks(_phi_values(corpus), _session_logs()) == []


# ----------------------------------------------------------------------------- run 2: a hostile folder, no manifest
def test_scan_run_reconciles_every_file(corpus, scan_run):
    _, summary, _ = scan_run
    sc = summary["scan"]
    assert sc["files_found"] == corpus.scan_files
    assert sc["manifest_rows"] + sc["files_unreadable"] + sc["files_unmapped"] + sc["files_unassigned"] + \
        sc["files_skipped"] == corpus.scan_files
    assert summary["reconciled"]
    assert summary["files_seen"] == sc["manifest_rows"] > 0
    assert sc["files_unreadable"] >= 4  # the link out, the FIFO, /dev/zero, a truncated header at least


def test_scan_run_has_no_unexpected_error_and_finite_payloads(scan_run):
    _, summary, _ = scan_run
    errors = pq.read_table(os.path.join(summary["records_dir"], "errors.parquet")).to_pandas()
    scan_errors = pq.read_table(os.path.join(summary["scan"]["scan_dir"], "scan_errors.parquet")).to_pandas()
    assert "UnexpectedError" not in set(errors["error_class"]) | set(scan_errors["error_class"])
    assert _non_finite_payloads(summary["records_dir"]) == 0


def test_scan_run_leaks_no_planted_identity(corpus, scan_run):
    out, _, logs = scan_run
    blobs = _output_texts(out)
    assert any(name.endswith("inferred_manifest.csv") for name in blobs)
    blobs["driver log"] = "\n".join(logs).encode()
    assert _leaks(_phi_values(corpus), blobs) == []
    assert _leaks(_phi_values(corpus), _session_logs()) == []

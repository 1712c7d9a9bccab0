"""Issue 15, failures 1-7: ingestion on hostile input never leaks identity, escapes the input folder,
hangs, writes NaN, deletes data, crashes on ordinary ids, or hides the cause behind UnexpectedError.

Each test names the failure it covers and fails on the code before the fix (checked by running it
against the earlier commit). Real files nobody here wrote are used where possible: pydicom's
``data/test_files`` (copied, with planted PHI where a test needs it) and nibabel's ``tests/data``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from raypipe.ingest import dicom, ehr, image2d, nifti, report, tabular
from raypipe.ingest.common import DecodeError
from raypipe.ingest.safety import (MARKER, VOCABULARY, Limits, UnsafeOutputError, confine, path_key,
                                   pseudonymous_path)

PYDICOM_FILES = os.path.join(os.path.dirname(__import__("pydicom").__file__), "data", "test_files")
NIBABEL_FILES = os.path.join(os.path.dirname(__import__("nibabel").__file__), "tests", "data")
#: planted in headers, folder names and file names; none may reach an output, a message or a log line
PLANTED = {"PatientName": "Doe^Plantedname", "PatientID": "PID-PLANTED-77", "PatientBirthDate": "19400101",
           "AccessionNumber": "ACC9988776"}
PHI_STRINGS = ["Plantedname", "PID-PLANTED-77", "19400101", "ACC9988776"]


def _planted_ct(path: str) -> bytes:
    """pydicom's CT_small.dcm with PLANTED identity; returns the file's bytes."""
    import pydicom

    ds = pydicom.dcmread(os.path.join(PYDICOM_FILES, "CT_small.dcm"))
    for k, v in PLANTED.items():
        setattr(ds, k, v)
    ds.save_as(path)
    return open(path, "rb").read()


def _vr_flipped(raw: bytes, vr: bytes) -> bytes:
    """``raw`` with the value representation of SOPClassUID (0008,0016) replaced by ``vr``."""
    i = raw.index(b"\x08\x00\x16\x00", 132)
    return raw[:i + 4] + vr + raw[i + 6:]


def _assert_clean_message(err: DecodeError):
    msg = str(err)
    assert not any(p in msg for p in PHI_STRINGS), msg[:300]
    assert msg.startswith(VOCABULARY[err.error_class]) and len(msg) < 400


# ----------------------------------------------------------------------------- 1. PHI in the errors table
@pytest.mark.parametrize("vr", [b"OB", b"UN", b"OW", b"UT", b"SQ"])
def test_flipped_vr_swallowing_the_header_quotes_no_phi(tmp_path, vr):
    """Failure 1: a flipped VR of SOPClassUID made pydicom swallow the header into that element, and the
    quarantine message quoted it (PatientName, birth date, accession number; 40-135 KB messages)."""
    raw = _planted_ct(str(tmp_path / "good.dcm"))
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(_vr_flipped(raw, vr))
    for call in (lambda: dicom.read_header(str(bad), {"CT"}), lambda: dicom.decode_slice(str(bad), 16, None),
                 lambda: dicom.decode_series([str(bad)], 16, None, "all")):
        try:
            out = call()
        except DecodeError as err:
            _assert_clean_message(err)
            continue
        if isinstance(out, tuple) and len(out) == 3:  # decode_series: errors are data
            for _, err in out[1]:
                _assert_clean_message(err)


def test_source_path_pseudonymises_every_component():
    """Failure 1: source_path kept folder names such as <name>_<birth date>_<accession>/IM0000.dcm."""
    key = path_key(b"s3cret")
    rel = "Doe^Plantedname_19400101_ACC9988776/IM0000.dcm"
    out = pseudonymous_path(rel, key)
    assert not any(p in out for p in PHI_STRINGS + ["IM0000"])
    assert out.endswith(".dcm") and out.count("/") == 1
    assert out == pseudonymous_path(rel, key) != pseudonymous_path(rel, path_key(b"other"))
    assert pseudonymous_path(rel, key, plain=True) == rel  # privacy.plain_paths: the user's opt-in


def test_header_text_never_reaches_meta(tmp_path):
    """Failure 1: header values that are not defined terms (a hostile Modality or PET Units) stay out of meta."""
    from test_ingest_decoders import write_slice

    p = write_slice(str(tmp_path / "x.dcm"), np.zeros((8, 8)), modality="Plantedname",
                    extra={"Units": "PID-PLANTED-77"})
    _, meta = dicom.decode_slice(p, 8, None)
    assert not any(v in json.dumps(meta) for v in PHI_STRINGS)
    p = write_slice(str(tmp_path / "pt.dcm"), np.zeros((8, 8)), modality="PT", extra={"Units": "ACC9988776"})
    _, meta = dicom.decode_slice(p, 8, None)
    assert meta["units"] == "other" and "ACC9988776" not in json.dumps(meta)


# ----------------------------------------------------------------------------- 2. paths escape the input root
def test_confine_refuses_paths_out_of_the_input(tmp_path):
    """Failure 2: ../../x, absolute paths, /proc/self/environ and symlinks out of the root were read."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    os.makedirs(root / "sub")
    os.makedirs(outside)
    (outside / "secret.txt").write_text("TOPSECRET")
    (root / "sub" / "ok.txt").write_text("fine")
    os.symlink(outside / "secret.txt", root / "link.txt")
    os.symlink(outside, root / "linkdir")
    os.symlink(root / "sub" / "ok.txt", root / "inside_link.txt")
    for rel in ["../outside/secret.txt", "sub/../../outside/secret.txt", "/etc/passwd", "/proc/self/environ",
                "link.txt", "linkdir/secret.txt"]:
        with pytest.raises(DecodeError) as e:
            confine(str(root), rel)
        assert e.value.error_class == "PathOutsideInput", rel
    assert confine(str(root), "inside_link.txt") == os.path.realpath(root / "sub" / "ok.txt")
    assert confine(str(root), "sub/../sub/ok.txt") == os.path.realpath(root / "sub" / "ok.txt")


def test_only_regular_files_are_opened(tmp_path):
    """Failure 3 (FIFO hang) and 7 (a missing file got four classes): one class per cause, nothing opened."""
    os.mkfifo(tmp_path / "fifo.txt")  # opening it would block the task forever
    os.makedirs(tmp_path / "folder.dcm")
    for rel, cls in [("fifo.txt", "NotAFile"), ("folder.dcm", "NotAFile"), ("missing.dcm", "FileMissing"),
                     ("missing.nii.gz", "FileMissing"), ("no/such/dir.txt", "FileMissing")]:
        with pytest.raises(DecodeError) as e:
            confine(str(tmp_path), rel)
        assert e.value.error_class == cls, rel


def test_decoders_agree_on_a_missing_file(tmp_path):
    """Failure 7: a missing file was NotDicom / NotNifti / NotAnImage / Unreadable depending on its format."""
    p = str(tmp_path / "gone")
    calls = [lambda: dicom.decode_slice(p + ".dcm", 8, None), lambda: nifti.load_volume(p + ".nii"),
             lambda: image2d.decode_image(p + ".png", 8), lambda: report.read_report(p + ".txt"),
             lambda: ehr.discretise(p + ".csv"), lambda: tabular.read_row(p + "_t.csv", "x")]
    classes = set()
    for call in calls:
        with pytest.raises(DecodeError) as e:
            call()
        classes.add(e.value.error_class)
    assert classes == {"FileMissing"}


def test_binary_file_listed_as_report_is_not_text(tmp_path):
    """Failure 2: a DICOM file listed as a .txt report was ingested with its whole binary header as text."""
    p = tmp_path / "report.txt"
    p.write_bytes(_planted_ct(str(tmp_path / "ct.dcm")))
    with pytest.raises(DecodeError) as e:
        report.read_report(str(p))
    assert e.value.error_class == "UnsupportedFormat"
    _assert_clean_message(e.value)
    p.write_text("caf\u00e9 " * 10, encoding="latin-1")  # Latin-1 text is still text
    assert report.read_report(str(p)).startswith("caf\u00e9")


# ----------------------------------------------------------------------------- 3. hangs and memory blow-ups
def _set_tags(src: str, dst: str, **tags) -> str:
    import pydicom

    ds = pydicom.dcmread(src)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(dst)
    return dst


def test_declared_sizes_are_refused_before_decoding(tmp_path):
    """Failure 3: a 7.8 KB RLE file declaring 65535 x 65535 and a file declaring 2**31 - 1 frames grew
    workers to gigabytes; now one ResourceLimit each, before any pixel is decoded."""
    rle = _set_tags(os.path.join(PYDICOM_FILES, "MR_small_RLE.dcm"), str(tmp_path / "rle.dcm"),
                    Rows=65535, Columns=65535)
    frames = _set_tags(os.path.join(PYDICOM_FILES, "rtdose.dcm"), str(tmp_path / "frames.dcm"),
                       NumberOfFrames=2**31 - 1)
    for path, expected in ((rle, {"MR"}), (frames, None)):
        for call in (lambda: dicom.read_header(path, expected), lambda: dicom.decode_slice(path, 16, None)):
            with pytest.raises(DecodeError) as e:
                call()
            assert e.value.error_class == "ResourceLimit" and "ingest.limits.max_" in str(e.value), path
        for policy in ("all", "even"):
            _, errors, _ = dicom.decode_series([path], 16, None, policy)
            assert [e.error_class for _, e in errors] == ["ResourceLimit"]


def test_deflated_dicom_bomb_is_measured_before_pydicom_inflates_it(tmp_path):
    """Failure 3, every transfer syntax: Deflated Explicit VR Little Endian is inflated whole by pydicom;
    pydicom's own image_dfl.dcm file meta in front of a deflate stream of 64 MB of zeros (~64 KB)."""
    import zlib

    from pydicom.filereader import _read_file_meta_info, read_preamble

    src = os.path.join(PYDICOM_FILES, "image_dfl.dcm")
    with open(src, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        head = open(src, "rb").read()[:fh.tell()]
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = comp.compress(b"\0" * (64 << 20)) + comp.flush()
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(head + body)
    assert os.path.getsize(bomb) < 200_000
    with pytest.raises(DecodeError) as e:
        dicom.read_header(str(bomb), limits=Limits(max_file_bytes=8 << 20))
    assert e.value.error_class == "ResourceLimit" and "inflated" in str(e.value)
    h = dicom.read_header(src)  # the genuine deflated file still reads
    assert h.transfer_syntax == "1.2.840.10008.1.2.1.99"
    # the full read (pixels too: decode_slice, decode_series with policy all) reads the file's bytes once
    # and runs the guard only when they hold the deflated syntax's UID: the bomb is still measured first
    with pytest.raises(DecodeError) as e:
        dicom._read(str(bomb), stop_before_pixels=False, limits=Limits(max_file_bytes=8 << 20))
    assert e.value.error_class == "ResourceLimit" and "inflated" in str(e.value)
    slices, errors, _ = dicom.decode_series([str(bomb)], 32, (-1000.0, 400.0), "all",
                                            limits=Limits(max_file_bytes=8 << 20))
    assert not slices and [err.error_class for _, err in errors] == ["ResourceLimit"]
    full = dicom._read(src, stop_before_pixels=False)
    assert str(full.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.1.99" and "PixelData" in full


def test_nifti_declared_voxels_and_gzip_bomb(tmp_path):
    """Failure 3: a 171-byte NIfTI header declaring 1024**3 voxels and a .nii.gz bomb were loaded whole;
    4-D NIfTI loaded every frame to use one."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1024, 1024, 1024))
    hdr.set_data_dtype(np.float32)
    tiny = tmp_path / "tiny.nii"
    tiny.write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 16)  # header + extension flag + a few voxels
    with pytest.raises(DecodeError) as e:
        nifti.load_volume(str(tiny))
    assert e.value.error_class == "ResourceLimit" and "1024x1024x1024" in str(e.value)

    # a gzip bomb: 64**3 zero voxels compress to ~1 KB; a limit below its size refuses it unread
    bomb = tmp_path / "bomb.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.float32), np.eye(4)), str(bomb))
    assert os.path.getsize(bomb) < 5000
    with pytest.raises(DecodeError) as e:
        nifti.load_volume(str(bomb), limits=Limits(max_voxels=100_000))
    assert e.value.error_class == "ResourceLimit"

    # 4-D: the limit applies to the one 3-D frame read, so a long series of small frames loads
    four_d = os.path.join(NIBABEL_FILES, "example4d.nii.gz")
    shape = nib.load(four_d).shape
    vol, meta = nifti.load_volume(four_d, frame=1, limits=Limits(max_voxels=int(np.prod(shape[:3]))))
    assert vol.shape == shape[:3][::-1] and meta["frame"] == 1 and meta["frames"] == shape[3]


def test_report_read_with_a_byte_cap(tmp_path):
    """Failure 3: /dev/zero as a report grew the worker without bound; now at most the cap is read."""
    big = tmp_path / "big.txt"
    big.write_text("word " * 200_000)  # 1 MB
    assert report.read_report(str(big), max_words=3, max_bytes=100) == "word word word"
    with pytest.raises(DecodeError) as e:  # and /dev/zero itself is not a regular file
        confine("/", "dev/zero")
    assert e.value.error_class == "NotAFile"


def test_config_maxima_and_windows():
    """Failure 3 (ct.size=20000) and 4 (window [nan, nan] gave 80/80 NaN images, [400, -1000] all zeros)."""
    from raypipe.config import ConfigError, load_config

    for bad in ["ingest.modalities.ct.size=20000", "ingest.modalities.ct.window=[.nan, .nan]",
                "ingest.modalities.ct.window=[400, -1000]", "ingest.modalities.ct.window=[.inf, 1]",
                "ingest.ehr.step_hours=0.0001"]:
        with pytest.raises(ConfigError):
            load_config(None, [bad])
    assert load_config(None, ["ingest.modalities.ct.window=null"]).ingest.modalities["ct"].window is None


# ----------------------------------------------------------------------------- 4. silent NaN
def test_ehr_value_beyond_float32_is_an_outlier_not_nan(tmp_path):
    """Failure 4: one EHR value 1e39 (inf in float32) made the channel's mean inf and std NaN for everyone."""
    from raypipe.ingest.pipeline import _ehr_sums_batch
    import pyarrow as pa

    times = pd.date_range("2150-01-01", periods=5, freq="h").astype(str)
    for name, values in (("a", ["80", "1e39", "90", "inf", "85"]), ("b", ["70", "75", "72", "71", "73"])):
        pd.DataFrame({"stay_id": 1, "charttime": times, "variable": "Heart Rate", "value": values}).to_csv(
            tmp_path / f"{name}.csv", index=False)
    (_, x, meta), = ehr.discretise_stays(str(tmp_path / "a.csv"))
    hr = x[:, ehr.START["Heart Rate"]]
    assert np.isfinite(x).all() and hr.max() <= 390 and meta["outliers"] == 1 and meta["unknown_values"] == 1
    sums = _ehr_sums_batch(pa.table({"path": ["a.csv", "b.csv"]}), {"step_hours": 2.0, "window_hours": 48.0},
                           root=str(tmp_path)).to_pylist()[0]
    stats = ehr.fit_normalisation(np.array(sums["s"]), np.array(sums["sq"]), sums["n"])
    assert np.isfinite(stats["mean"]).all() and np.isfinite(stats["std"]).all()
    # configurable limits: a tighter range drops more
    (_, _, meta2), = ehr.discretise_stays(str(tmp_path / "a.csv"), ranges={**ehr.OUTLIER_RANGES,
                                                                           "Heart Rate": (0.0, 84.0)})
    assert meta2["outliers"] == 3


def test_tabular_value_beyond_float32_is_nonfinite(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("patient_id,x\nNA,1e39\nnull,2\n")
    with pytest.raises(DecodeError) as e:
        tabular.read_row(str(p), "NA")
    assert e.value.error_class == "NonFinite"
    assert tabular.read_row(str(p), "null")[0].tolist() == [2.0]  # "null" is an id as written


# ----------------------------------------------------------------------------- 5. data loss
def _tiny_cohort(root):
    os.makedirs(root / "p")
    (root / "p" / "r.txt").write_text("a report")
    pd.DataFrame({"patient_id": ["P1"], "modality": ["report"], "format": ["text"], "path": ["p/r.txt"]}).to_csv(
        root / "manifest.csv", index=False)
    pd.DataFrame({"patient_id": ["P1"], "label": [1]}).to_csv(root / "labels.csv", index=False)


def _snapshot(folder):
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(folder) for f in fs}


def test_ingest_never_deletes_the_input_or_foreign_files(tmp_path):
    """Failure 5: --out pointed at the input cohort wiped it; pointed at a user's folder it deleted their file."""
    from raypipe.config import load_config
    from raypipe.ingest.pipeline import run_ingest

    root = tmp_path / "cohort"
    _tiny_cohort(root)
    before = _snapshot(root)
    user = tmp_path / "mine"
    os.makedirs(user)
    (user / "thesis.docx").write_text("years of work")
    for out in (root, tmp_path, user):  # the input, a parent of it, a folder with a foreign file
        cfg = load_config(None, [f"ingest.input={root}", f"ingest.out={out}", "ray.progress_bars=false"])
        with pytest.raises(UnsafeOutputError, match="never deletes|input"):
            run_ingest(cfg)
    assert _snapshot(root) == before and (user / "thesis.docx").read_text() == "years of work"


def test_output_dir_replaced_only_with_raypipe_marker(tmp_path):
    from raypipe.ingest.safety import check_output_dir, write_marker

    out = tmp_path / "records"
    check_output_dir(str(out), [str(tmp_path / "in")], "ingest")  # absent: fine
    os.makedirs(out)
    check_output_dir(str(out), [], "ingest")  # empty: fine
    (out / "errors.parquet").write_text("x")
    with pytest.raises(UnsafeOutputError):
        check_output_dir(str(out), [], "ingest")
    write_marker(str(out), "ingest")
    check_output_dir(str(out), [], "ingest")  # an earlier run's output: replaceable
    with pytest.raises(UnsafeOutputError):
        check_output_dir(str(out), [], "embed")  # another stage's marker: not ours to replace
    (out / "notes.txt").write_text("added by the user afterwards")
    with pytest.raises(UnsafeOutputError):
        check_output_dir(str(out), [], "ingest")
    assert json.load(open(out / MARKER))["entries"] == ["errors.parquet"]


# ----------------------------------------------------------------------------- 6. ids as written
def test_manifest_and_labels_keep_ids_as_written(tmp_path):
    """Failure 6: patient ids "NA", "", "null", "N/A" were read as missing and crashed the run."""
    from raypipe.ingest.manifest import read_labels, read_manifest

    ids = ["NA", "null", "N/A", "None", "nan"]
    pd.DataFrame({"patient_id": ids + [""], "modality": "report", "format": "", "path": [f"{i}.txt" for i in range(6)]}
                 ).to_csv(tmp_path / "manifest.csv", index=False)
    (tmp_path / "labels.csv").write_text("patient_id,label,site\n" + "".join(f"{i},1,NA\n" for i in ids))
    man = read_manifest(str(tmp_path))
    assert sorted(man.patient_id) == sorted(ids + [""]) and set(man.format) == {"text"}
    lab = read_labels(str(tmp_path), ["label"], ["site"])
    assert sorted(lab.patient_id) == sorted(ids) and (lab.label == 1).all()
    (tmp_path / "labels.csv").write_text("patient_id,label\nA,yes\nB,1\n")
    with pytest.raises(ValueError, match="non-numeric values"):  # failure 7: was a raw pyarrow message
        read_labels(str(tmp_path), ["label"], [])


# ----------------------------------------------------------------------------- one hostile cohort through Ray
@pytest.fixture(scope="module")
def hostile_run(ray_session, tmp_path_factory):
    """A cohort mixing good files, planted PHI, escapes, bombs, odd ids and bad values; one ingest run."""
    import nibabel as nib

    from raypipe.config import load_config
    from raypipe.ingest.pipeline import run_ingest

    base = tmp_path_factory.mktemp("hostile")
    root, outside = base / "cohort", base / "outside"
    os.makedirs(outside)
    (outside / "secret.txt").write_text("TOPSECRET-OUTSIDE")
    phi_dir = root / "Doe^Plantedname_19400101_ACC9988776"
    os.makedirs(phi_dir)
    raw = _planted_ct(str(phi_dir / "IM0000.dcm"))
    (phi_dir / "IM0001.dcm").write_bytes(_vr_flipped(raw, b"OB"))
    _set_tags(os.path.join(PYDICOM_FILES, "MR_small_RLE.dcm"), str(root / "rle_bomb.dcm"), Rows=65535,
              Columns=65535, Modality="CT")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1024, 1024, 1024))
    (root / "huge.nii").write_bytes(hdr.binaryblock + b"\0" * 20)
    with gzip.open(root / "bomb.nii.gz", "wb") as fh:  # declares 1024 x 1024 x 512 float32 (1 GiB), ~1 KB on disk
        hdr2 = nib.Nifti1Header()
        hdr2.set_data_shape((1024, 1024, 512))
        hdr2.set_data_dtype(np.float32)
        fh.write(hdr2.binaryblock + b"\0" * 4)
        fh.write(b"\0" * (1 << 20))
    shutil.copyfile(os.path.join(NIBABEL_FILES, "example4d.nii.gz"), root / "four_d.nii.gz")
    os.mkfifo(root / "fifo.txt")
    os.symlink(outside / "secret.txt", root / "link.txt")
    shutil.copyfile(root / phi_dir.name / "IM0000.dcm", root / "dicom_as_report.txt")
    (root / "odd.xyz").write_text("?")
    times = pd.date_range("2150-01-01", periods=6, freq="h").astype(str)
    for i, pid in enumerate(["NA", "null", "N/A", "P4"]):
        values = ["80", "1e39", "90", "inf", "85", "88"] if pid == "NA" else [str(70 + i)] * 6
        pd.DataFrame({"stay_id": "NA", "charttime": times, "variable": "Heart Rate", "value": values}).to_csv(
            root / f"ehr_{i}.csv", index=False)
    rows = [("NA", "ct", "dicom", f"{phi_dir.name}/IM0000.dcm"), ("NA", "ct", "dicom", f"{phi_dir.name}/IM0001.dcm"),
            ("null", "ct", "dicom", "rle_bomb.dcm"), ("null", "pet", "nifti", "huge.nii"),
            ("N/A", "pet", "nifti", "bomb.nii.gz"), ("P4", "pet", "nifti", "four_d.nii.gz"),
            ("P4", "report", "text", "fifo.txt"), ("P4", "report", "text", "link.txt"),
            ("N/A", "report", "text", "../outside/secret.txt"), ("null", "report", "text", "/proc/self/environ"),
            ("NA", "report", "text", "dicom_as_report.txt"), ("NA", "report", "", "odd.xyz"),
            ("P4", "ct", "dicom", "missing.dcm"), ("P4", "pet", "nifti", "missing.nii.gz"),
            ("", "report", "text", "odd.xyz")]
    rows += [(pid, "ehr", "csv", f"ehr_{i}.csv") for i, pid in enumerate(["NA", "null", "N/A", "P4"])]
    pd.DataFrame(rows, columns=["patient_id", "modality", "format", "path"]).to_csv(root / "manifest.csv", index=False)
    pd.DataFrame({"patient_id": ["NA", "null", "N/A", "P4"], "label": [0, 1, 0, 1]}).to_csv(root / "labels.csv",
                                                                                            index=False)
    cfg = load_config(None, [f"run.out_dir={base / 'run'}", f"ingest.input={root}", "ray.progress_bars=false",
                             "ingest.error_budget=1.0", "ingest.test_fraction=0", "ingest.group_columns=[]",
                             "ingest.modalities={ct: {kind: volume, size: 16}, pet: {kind: volume, size: 16, frame: 1},"
                             " report: {kind: text}, ehr: {kind: ehr}}"])
    return cfg, rows, run_ingest(cfg)


def _errors_by_path(cfg):
    err = pd.read_parquet(os.path.join(cfg.records_dir, "errors.parquet"))
    return err, dict(zip(err.source_path, err.error_class))


@pytest.mark.ray
def test_hostile_cohort_reconciles_with_one_class_per_cause(hostile_run):
    """Failures 2, 3, 6, 7 through Ray: the run ends, every row is reconciled, each cause has its class."""
    cfg, rows, summary = hostile_run
    assert summary["reconciled"] and summary["files_seen"] == len(rows)
    err, by_path = _errors_by_path(cfg)
    key = path_key(os.environ["RAYPIPE_ID_SECRET"].encode())
    expect = {"rle_bomb.dcm": "ResourceLimit", "huge.nii": "ResourceLimit", "bomb.nii.gz": "ResourceLimit",
              "fifo.txt": "NotAFile", "link.txt": "PathOutsideInput", "../outside/secret.txt": "PathOutsideInput",
              "/proc/self/environ": "PathOutsideInput", "dicom_as_report.txt": "UnsupportedFormat",
              "missing.dcm": "FileMissing", "missing.nii.gz": "FileMissing"}
    for rel, cls in expect.items():
        assert by_path[pseudonymous_path(rel, key)] == cls, rel
    assert set(err.loc[err.source_path == pseudonymous_path("odd.xyz", key), "error_class"]) == {
        "UnsupportedFormat", "MissingId"}  # the unknown extension, and the row with an empty id
    assert "UnexpectedError" not in set(err.error_class)
    assert not err.message.str.contains("nan").any()  # "format 'nan'" before
    rec = pd.read_parquet(os.path.join(cfg.records_dir, "records"))
    samples = pd.read_parquet(os.path.join(cfg.records_dir, "samples.parquet"))
    from raypipe.ids import pseudonym

    secret = os.environ["RAYPIPE_ID_SECRET"].encode()
    assert {pseudonym(secret, p) for p in ["NA", "null", "N/A", "P4"]} == set(samples.sample_id)
    assert set(rec.loc[rec.modality == "ehr", "sample_id"]) == set(samples.sample_id)
    four_d = rec[(rec.modality == "pet")]
    assert len(four_d) > 0 and all(json.loads(m)["frame"] == 1 for m in four_d.meta)


@pytest.mark.ray
def test_hostile_cohort_outputs_carry_no_phi_no_secret_no_nan(hostile_run):
    """Failures 1, 2, 4: no planted PHI, no outside file, no secret, no non-finite payload in any output."""
    from raypipe.schema import payload_to_array

    cfg, _, summary = hostile_run
    blob = b"".join(open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(cfg.records_dir) for f in fs)
    for s in PHI_STRINGS + ["TOPSECRET", "IM0000", os.environ["RAYPIPE_ID_SECRET"], "dicom_as_report"]:
        assert s.encode() not in blob, s
    rec = pd.read_parquet(os.path.join(cfg.records_dir, "records"))
    for p, dt, sh in zip(rec.payload, rec.dtype, rec["shape"]):
        if p is not None:
            assert np.isfinite(payload_to_array(p, dt, sh)).all()
    ehr_meta = [json.loads(m) for m in rec.loc[rec.modality == "ehr", "meta"]]
    assert sum(m["outliers"] for m in ehr_meta) == 1  # the 1e39
    stats = json.load(open(os.path.join(cfg.records_dir, "ehr_normalisation.json")))
    assert np.isfinite(stats["mean"]).all() and np.isfinite(stats["std"]).all()
    assert json.load(open(os.path.join(cfg.records_dir, MARKER)))["stage"] == "ingest"


@pytest.mark.ray
def test_a_task_killed_twice_becomes_resource_limit_and_the_run_goes_on(ray_session, tmp_path, monkeypatch):
    """Failure 3: a task killed by Ray's memory monitor was retried forever and the run never ended. Here
    the decode task holding one report dies (the worker process exits) on every attempt: Ray does not retry
    it (a memory-monitor kill would be retried without limit otherwise), the driver re-runs its items one
    per task, the others are ingested and the culprit, killed twice in all, is one ResourceLimit row."""
    from raypipe.config import load_config
    from raypipe.ingest import pipeline

    root = tmp_path / "cohort"
    os.makedirs(root)
    pids = [f"P{i}" for i in range(4)]
    for p in pids:
        (root / f"{p}.txt").write_text(f"report of {p}")
    (root / "killer.txt").write_text("this one kills its worker")
    rows = [(p, "report", "text", f"{p}.txt") for p in pids] + [("P1", "report", "text", "killer.txt")]
    pd.DataFrame(rows, columns=["patient_id", "modality", "format", "path"]).to_csv(root / "manifest.csv", index=False)
    pd.DataFrame({"patient_id": pids, "label": [0, 1, 0, 1]}).to_csv(root / "labels.csv", index=False)
    real = pipeline._decode_batch
    deaths = str(tmp_path / "deaths.log")

    def dies_on_killer(batch, **kwargs):
        if any(r.endswith("killer.txt") for r in batch.column("rel").to_pylist()):
            with open(deaths, "a") as fh:
                fh.write("x")
            os._exit(1)  # what a kill by the memory monitor looks like from Ray's side: the worker is gone
        return real(batch, **kwargs)

    monkeypatch.setattr(pipeline, "_decode_batch", dies_on_killer)
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}", f"ingest.input={root}", "ray.progress_bars=false",
                             "ingest.error_budget=1.0", "ingest.test_fraction=0", "ingest.group_columns=[]",
                             "ingest.modalities={report: {kind: text}}", "ingest.items_per_task=100"])
    summary = pipeline.run_ingest(cfg)
    assert summary["reconciled"] and summary["files_ingested"] == 4 and summary["files_quarantined"] == 1
    err = pd.read_parquet(os.path.join(cfg.records_dir, "errors.parquet"))
    assert list(err.error_class) == ["ResourceLimit"] and "died twice" in err.message.iloc[0]
    assert open(deaths).read() == "xx"  # killed twice, never retried in a loop


# ----------------------------------------------------------------------------- a task that fails, not a file
def _report_cohort(root, extra=()):
    """Four one-line reports (P0..P3) and ``extra`` (file name, patient) rows; returns the manifest's rows."""
    os.makedirs(root)
    pids = [f"P{i}" for i in range(4)]
    for p in pids:
        (root / f"{p}.txt").write_text(f"report of {p}")
    rows = [(p, "report", "text", f"{p}.txt") for p in pids]
    for name, pid in extra:
        (root / name).write_text(f"the report named {name}")
        rows.append((pid, "report", "text", name))
    pd.DataFrame(rows, columns=["patient_id", "modality", "format", "path"]).to_csv(root / "manifest.csv", index=False)
    pd.DataFrame({"patient_id": pids, "label": [0, 1, 0, 1]}).to_csv(root / "labels.csv", index=False)
    return rows


def _report_cfg(tmp_path, root, *extra):
    from raypipe.config import load_config

    return load_config(None, [f"run.out_dir={tmp_path / 'run'}", f"ingest.input={root}", "ray.progress_bars=false",
                              "ingest.error_budget=1.0", "ingest.test_fraction=0", "ingest.group_columns=[]",
                              "ingest.modalities={report: {kind: text}}", *extra])


def _tree_bytes(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(folder) for f in fs}


@pytest.mark.ray
@pytest.mark.parametrize("code, words", [("ENOSPC", "no space left on device"), ("EACCES", "permission denied")])
def test_a_full_or_forbidden_output_fails_the_stage_and_quarantines_nothing(ray_session, tmp_path, monkeypatch,
                                                                             code, words):
    """Review: a decode task whose part cannot be written (a full disk; no permission on the output folder) was
    retried item by item and every input ended as a ResourceLimit row ("died twice ... give the workers more
    memory"). The inputs are not at fault: the stage fails with the cause and the output location (a config
    value), names no input, quarantines nothing, and the previous output stays as it was."""
    import errno

    from raypipe.ingest import pipeline

    root = tmp_path / "cohort"
    _report_cohort(root)
    cfg = _report_cfg(tmp_path, root, "ingest.items_per_task=2")
    assert pipeline.run_ingest(cfg)["files_ingested"] == 4  # a previous, good output
    before = _tree_bytes(cfg.records_dir)
    real = pipeline._decode_batch
    scope = str(tmp_path)
    err_no = getattr(errno, code)

    def decode_on_a_full_disk(batch, **kwargs):
        # in the worker: its part writer fails as the OS would, for this test's output only (workers are reused)
        from raypipe.ingest import pipeline as worker_pipeline

        writer = getattr(worker_pipeline.write_records, "real_writer", worker_pipeline.write_records)

        def write(table, path):
            if path.startswith(scope):
                tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
                open(tmp, "wb").write(b"partial")  # what a write cut short leaves
                raise OSError(err_no, os.strerror(err_no), tmp)
            return writer(table, path)

        write.real_writer = writer
        worker_pipeline.write_records = write
        return real(batch, **kwargs)

    monkeypatch.setattr(pipeline, "_decode_batch", decode_on_a_full_disk)
    with pytest.raises(pipeline.OutputWriteError) as e:
        pipeline.run_ingest(cfg)
    text = str(e.value)
    assert e.value.errno == err_no and code in text and words in text, text
    assert cfg.records_dir in text and "ingest.out" in text, text
    for rel in [f"P{i}.txt" for i in range(4)] + ["report of"]:
        assert rel not in text
    assert _tree_bytes(cfg.records_dir) == before  # the earlier output: every byte as it was, no ResourceLimit rows
    assert [f for f in os.listdir(os.path.dirname(cfg.records_dir)) if f.startswith(".ingest-")] == []


@pytest.mark.ray
def test_the_driver_side_writes_fail_with_the_same_clear_error(ray_session, tmp_path, monkeypatch):
    """The small tables the driver writes after the decode pass: a full disk there is the same stage error."""
    import errno

    from raypipe.ingest import pipeline

    root = tmp_path / "cohort"
    _report_cohort(root)
    cfg = _report_cfg(tmp_path, root)

    def full(*_, **__):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pipeline.safety, "write_marker", full)
    with pytest.raises(pipeline.OutputWriteError, match="ENOSPC"):
        pipeline.run_ingest(cfg)
    assert not os.path.exists(cfg.records_dir)
    assert [f for f in os.listdir(os.path.dirname(cfg.records_dir)) if f.startswith(".ingest-")] == []


@pytest.mark.ray
def test_a_failed_last_rename_puts_the_earlier_output_back(ray_session, tmp_path, monkeypatch):
    """Review: the earlier output is moved aside before the new one is renamed into place; when that last
    rename failed, the error said the earlier output was unchanged while it sat in a hidden folder."""
    import errno

    from raypipe.ingest import pipeline

    root = tmp_path / "cohort"
    _report_cohort(root)
    cfg = _report_cfg(tmp_path, root)
    assert pipeline.run_ingest(cfg)["files_ingested"] == 4
    before = _tree_bytes(cfg.records_dir)
    real_replace = os.replace
    final = os.path.abspath(cfg.records_dir)

    def replace(src, dst):
        if os.path.abspath(dst) == final and ".ingest-old-" not in str(src):  # the new output's rename only
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(pipeline.os, "replace", replace)
    with pytest.raises(pipeline.OutputWriteError, match="ENOSPC"):
        pipeline.run_ingest(cfg)
    assert _tree_bytes(cfg.records_dir) == before
    assert [f for f in os.listdir(os.path.dirname(cfg.records_dir)) if f.startswith(".ingest-")] == []


@pytest.mark.ray
def test_a_task_that_raises_for_one_file_quarantines_that_file_as_unexpected(ray_session, tmp_path, monkeypatch):
    """An exception in a decode task's own glue (outside the per-file try) used to end as ResourceLimit rows for
    every item of the task. Now the task's items are decoded again one per task: the others are ingested and the
    one whose own task raises again is an UnexpectedError row naming the exception type (a bug to report)."""
    from raypipe.ingest import pipeline

    root = tmp_path / "cohort"
    _report_cohort(root, [("glitch.txt", "P1")])
    real = pipeline._decode_batch

    def glue_fails_on_glitch(batch, **kwargs):
        if any(r.endswith("glitch.txt") for r in batch.column("rel").to_pylist()):
            raise TypeError("a bug in the task's glue")
        return real(batch, **kwargs)

    monkeypatch.setattr(pipeline, "_decode_batch", glue_fails_on_glitch)
    cfg = _report_cfg(tmp_path, root, "ingest.items_per_task=100")
    summary = pipeline.run_ingest(cfg)
    assert summary["reconciled"] and summary["files_ingested"] == 4 and summary["files_quarantined"] == 1
    err = pd.read_parquet(os.path.join(cfg.records_dir, "errors.parquet"))
    assert list(err.error_class) == ["UnexpectedError"], list(err.error_class)
    assert "TypeError" in err.message.iloc[0] and "memory" not in err.message.iloc[0]
    assert "glitch" not in err.message.iloc[0] and "a bug in the task" not in err.message.iloc[0]


@pytest.mark.ray
def test_tasks_that_raise_whatever_their_input_fail_the_stage(ray_session, tmp_path, monkeypatch):
    """A glue exception in every task is raypipe's fault, not the inputs': the stage fails with the exception's
    type; no input is quarantined and nothing is written."""
    from raypipe.ingest import pipeline

    root = tmp_path / "cohort"
    _report_cohort(root)

    def always_fails(batch, **kwargs):
        raise KeyError("P1.txt")  # text that quotes an input: it must not reach the message

    monkeypatch.setattr(pipeline, "_decode_batch", always_fails)
    cfg = _report_cfg(tmp_path, root, "ingest.items_per_task=2")
    with pytest.raises(RuntimeError) as e:
        pipeline.run_ingest(cfg)
    assert "KeyError" in str(e.value) and "P1" not in str(e.value) and "ResourceLimit" not in str(e.value)
    assert not os.path.exists(cfg.records_dir)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_real_full_disk_error_from_pyarrow_is_named_by_its_errno():
    """pyarrow's own OSError for a full device (written to /dev/full, which fails every write with ENOSPC)
    becomes the output error with the cause's name; the exception's text (it may quote a path) is dropped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.ingest import pipeline

    with pytest.raises(OSError) as e:
        pq.write_table(pa.table({"x": np.arange(300_000, dtype=np.float64)}), "/dev/full")
    out = pipeline._output_error(e.value)
    assert isinstance(out, pipeline.OutputWriteError) and out.errno == 28
    assert str(out) == "[Errno 28] no space left on device (ENOSPC)"


def test_an_output_error_known_only_from_its_text_keeps_the_number_only():
    """An OSError that gives its errno only in its text (no errno attribute): the number is taken, not the text."""
    from raypipe.ingest import pipeline

    out = pipeline._output_error(OSError("Error writing /some/place/P7.parquet: [errno 122] quota"))
    assert out.errno == 122 and "EDQUOT" in str(out) and "P7" not in str(out)


def test_a_part_that_cannot_be_written_leaves_no_temporary_file(tmp_path, monkeypatch):
    """write_records: a write cut short (a full disk) removes its hidden temporary file, which would hold on to
    the space, and writes no part."""
    import errno

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.ingest import pipeline

    def full(table, where, **_):
        open(where, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(OSError):
        pipeline.write_records(pa.table({"x": [1, 2]}), str(tmp_path / "part-00000.parquet"))
    assert os.listdir(tmp_path) == []

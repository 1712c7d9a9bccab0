"""Ingest from a folder without a manifest: file facts -> inferred manifest (pure; no Ray here).

A PACS or research export is a tree of files, most of them DICOM, often without
extensions, named by the exporting software. This module turns that tree into the
``manifest.csv`` rows that :mod:`raypipe.ingest.pipeline` ingests::

    list_files(root)          walk the tree (symlinks and special files are never followed or opened)
    dicom_facts(path)         PatientID, StudyInstanceUID, SeriesInstanceUID, Modality of one file,
                              read with ``stop_before_pixels`` and only those tags
    infer_manifest(...)       group by patient / study / series, map DICOM Modality to the configured
                              modalities, assign NIfTI / PNG / JPEG / GeoTIFF / CSV / TXT files by
                              extension and folder, and account for every file
    review_tables(...)        the inferred manifest and the scan's error rows with pseudonymous ids
                              and paths, for the user to review
    scan_table(summary)       the summary a user reads (patients, studies, series per modality)

Every file found ends in exactly one outcome: a manifest row, or one scan error row
(``unreadable``, ``unmapped``, ``unassigned`` or ``skipped``, with a class and a
fixed-vocabulary message). Nothing read from a file or a path reaches a message:
PatientIDs, UIDs and names are only compared and hashed. The Ray Data pass that
calls :func:`dicom_facts` in parallel lives in :mod:`raypipe.ingest.scan_pipeline`.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter, defaultdict
from typing import Iterable, Mapping

import pandas as pd

from raypipe.ids import pseudonym
from raypipe.ingest.dicom import quiet_pydicom
from raypipe.ingest.manifest import guess_format
from raypipe.ingest.safety import DICOM_MODALITIES, pseudonymous_path

log = logging.getLogger(__name__)

#: the only DICOM elements the scan reads (pixel data and every other element are skipped, not parsed)
SCAN_TAGS = ["SOPClassUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"]
#: values longer than this are not read by the header scan (a swallowed header can claim hundreds of MB)
DEFER_BYTES = 1024
#: DICOMDIR (media storage directory): an index of the other files, not an image
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: the four outcomes of a file that is not a manifest row
OUTCOMES = ("unreadable", "unmapped", "unassigned", "skipped")
#: which modality kinds can decode which formats
KINDS_OF_FORMAT = {"dicom": ("volume", "image"), "nifti": ("volume",), "png": ("image",), "jpeg": ("image",),
                   "geotiff": ("geotiff",), "csv": ("ehr", "tabular"), "text": ("text",)}
#: files at the root of the input that describe the cohort instead of holding data
COHORT_FILES = {"labels.csv", "manifest.csv"}
#: DICOM Modality (0008,0060) -> the configured modality it feeds (``ingest.scan.modality_map`` overrides)
DEFAULT_MODALITY_MAP = {"CT": "ct", "PT": "pet", "MR": "mr", "CR": "xray", "DX": "xray", "DR": "xray"}


def _error(rel: str, fmt: str | None, outcome: str, error_class: str, message: str, **extra) -> dict:
    return {"rel": rel, "format": fmt, "outcome": outcome, "error_class": error_class, "message": message, **extra}


# ----------------------------------------------------------------------------- walking the tree
def list_files(root: str) -> tuple[list[dict], list[dict]]:
    """(candidates, errors): every entry under ``root``, sorted by path, each in one of the two lists.

    Candidates are regular files (``rel``, ``format`` from the extension or None when it must be
    probed as DICOM). Symlinks are never followed: one that leads out of the root is
    ``PathOutsideInput``, one that stays inside is skipped (its target is scanned where it lies).
    FIFOs, devices and sockets are ``NotAFile`` and never opened; hidden entries (``.name``) and
    the root's ``labels.csv``/``manifest.csv`` are skipped. Unreadable folders are ``Unreadable``.
    """
    root = os.path.realpath(root)
    candidates: list[dict] = []
    errors: list[dict] = []

    def walk(folder: str) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            errors.append(_error(os.path.relpath(folder, root), None, "unreadable", "Unreadable",
                                 "cannot list this folder (permissions?); fix its permissions or remove it"))
            return
        for e in entries:
            rel = os.path.relpath(e.path, root)
            try:
                st = os.lstat(e.path)
            except OSError:
                errors.append(_error(rel, None, "unreadable", "FileMissing",
                                     "the file vanished or cannot be examined during the scan; scan again"))
                continue
            if stat.S_ISLNK(st.st_mode):
                target = os.path.realpath(e.path)
                if os.path.commonpath([root, target]) != root:
                    errors.append(_error(rel, guess_format(e.name), "unreadable", "PathOutsideInput",
                                         "a symbolic link that leads outside the input folder; copy the file "
                                         "into the input folder to ingest it"))
                else:
                    errors.append(_error(rel, guess_format(e.name), "skipped", "Symlink",
                                         "a symbolic link inside the input folder: its target is scanned where "
                                         "it lies, the link is not followed"))
                continue
            if e.name.startswith("."):
                errors.append(_error(rel, None, "skipped", "Hidden", "a hidden file or folder; not scanned"))
                continue
            if stat.S_ISDIR(st.st_mode):
                walk(e.path)
                continue
            if not stat.S_ISREG(st.st_mode):
                errors.append(_error(rel, None, "unreadable", "NotAFile",
                                     "not a regular file (a FIFO, device or socket); never opened"))
                continue
            if folder == root and e.name in COHORT_FILES:
                errors.append(_error(rel, "csv", "skipped", "CohortFile",
                                     "a cohort description file (labels.csv is read by ingest as the labels)"))
                continue
            candidates.append({"rel": rel, "format": guess_format(e.name), "size": st.st_size})

    walk(root)
    return candidates, errors


def needs_header(fact: Mapping) -> bool:
    """Files whose DICOM header is read: ``.dcm``/``.dicom`` and files without a known extension."""
    return fact["format"] in ("dicom", None)


# ----------------------------------------------------------------------------- one DICOM header
def _text(value) -> str:
    """A header value as a stripped string ('' when absent or not representable)."""
    if value is None:
        return ""
    try:
        s = str(value).strip().strip("\x00").strip()
    except Exception:  # noqa: BLE001 - a malformed value: treated as absent
        return ""
    return s


class _Oversized(Exception):
    """A grouping element longer than DICOM allows for it (e.g. a flipped VR that swallowed the header)."""


def _element_text(ds, keyword: str, max_len: int = 256) -> str:
    """A grouping element's value as text, its raw length checked first: values longer than ``max_len``
    bytes (UIDs are at most 64, LO 64, CS 16) were deferred by the read and are never loaded."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return ""
    length = getattr(ds.get_item(tag), "length", 0) or 0
    if length > max_len:
        raise _Oversized(keyword)
    return _text(ds[tag].value)


def dicom_facts(path: str, probe: bool = False) -> dict:
    """The grouping facts of one DICOM file, read without pixel data and without raising.

    ``probe``: the file has no DICOM extension; when it is not DICOM the answer is ``skipped``
    (``UnsupportedFormat``) instead of ``unreadable``. Returns ``{"ok": True, "patient_id",
    "study_uid", "series_uid", "dicom_modality", "dicomdir"}`` or ``{"ok": False, "outcome",
    "error_class", "message"}``; messages never quote the file.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    def fail(outcome, cls, msg):
        return {"ok": False, "outcome": outcome, "error_class": cls, "message": msg}

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return fail("unreadable", "NotAFile", "not a regular file; never opened")
    except OSError:
        return fail("unreadable", "FileMissing", "the file vanished or cannot be examined; scan again")
    if probe:
        try:
            with open(path, "rb") as fh:
                probe = fh.read(132)[128:] != b"DICM"  # a DICM prefix: DICOM whatever its name
        except OSError:
            return fail("unreadable", "Unreadable", "cannot open the file (permissions?); fix or remove it")
    ds = None
    with quiet_pydicom():
        for force in (False, True):
            try:
                with open(path, "rb") as fh:
                    ds = pydicom.dcmread(fh, stop_before_pixels=True, force=force, specific_tags=SCAN_TAGS,
                                         defer_size=DEFER_BYTES)
                if force:
                    try:
                        sop = _element_text(ds, "SOPClassUID")
                    except _Oversized:
                        sop = ""
                    if not sop:
                        ds = None  # forced parsing of a non-DICOM file "succeeds" with garbage: need an SOP class
                break
            except InvalidDicomError:
                continue  # no preamble / DICM prefix: try the raw dataset form once
            except PermissionError:
                return fail("unreadable", "Unreadable", "permission denied; fix the file's permissions")
            except MemoryError:
                return fail("unreadable", "ResourceLimit", "the header declares more memory than is available")
            except Exception:  # noqa: BLE001 - pydicom fails in many ways on corrupt headers; message is ours
                ds = None
                break
    if ds is None:
        if probe:
            return fail("skipped", "UnsupportedFormat", "not a DICOM file and no supported extension (.dcm .nii "
                        ".nii.gz .hdr .png .jpg .tif .csv .txt); not ingested")
        return fail("unreadable", "CorruptHeader", "a DICOM file whose header cannot be read (truncated or "
                    "damaged); check the export or remove the file")
    try:
        with quiet_pydicom():  # converting a raw element validates it, and the warning quotes the value
            meta_sop = _text(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", None))
            facts = {"ok": True, "patient_id": _element_text(ds, "PatientID"),
                     "study_uid": _element_text(ds, "StudyInstanceUID"),
                     "series_uid": _element_text(ds, "SeriesInstanceUID"),
                     "dicom_modality": _element_text(ds, "Modality").upper(),
                     "dicomdir": DICOMDIR_SOP_CLASS in (meta_sop, _element_text(ds, "SOPClassUID"))}
    except _Oversized:
        return fail("unreadable", "CorruptHeader", "an identifying element of the header is longer than DICOM "
                    "allows (a damaged value representation swallowed the header); re-export the file")
    except Exception:  # noqa: BLE001 - a value that cannot be decoded (e.g. a flipped VR)
        return fail("unreadable", "CorruptHeader", "the identifying elements of the header cannot be decoded; "
                    "check the export or remove the file")
    if not any(facts[k] for k in ("patient_id", "study_uid", "series_uid", "dicom_modality")) and not facts["dicomdir"]:
        # pydicom stops quietly at the end of a file cut inside its header: nothing to group by
        return fail("unreadable", "CorruptHeader", "the DICOM header holds none of PatientID, StudyInstanceUID, "
                    "SeriesInstanceUID, Modality (truncated or damaged); check the export or remove the file")
    # only a DICOM defined term is kept (it is printed and written): a hostile header may put a name there
    if facts["dicom_modality"] not in DICOM_MODALITIES:
        facts["dicom_modality"] = "?" if facts["dicom_modality"] else ""
    return facts


# ----------------------------------------------------------------------------- facts -> manifest
def _modality_by_name(parts: list[str], fmt: str, modalities: Mapping[str, str]) -> str | None:
    """A configured modality named by the file's stem or one of its folders (nearest first)."""
    stem = parts[-1].split(".")[0].lower()
    for name in [stem, *[p.lower() for p in reversed(parts[:-1])]]:
        if name in modalities and modalities[name] in KINDS_OF_FORMAT.get(fmt, ()):
            return name
    return None


def infer_manifest(candidates: list[dict], facts: Mapping[str, dict], modalities: Mapping[str, str],
                   modality_map: Mapping[str, str]) -> tuple[pd.DataFrame, list[dict]]:
    """(manifest, scan errors) from the walked files and the DICOM facts keyed by relative path.

    ``modalities``: configured modality name -> kind; ``modality_map``: DICOM Modality -> configured
    name. DICOM files take their patient from PatientID and their modality from the map (a DICOM
    Modality without a mapping, or mapped to a modality that is not configured or cannot hold
    DICOM, is ``unmapped``; an empty PatientID is ``unassigned``). Other files take their modality
    from their stem or folder name (``pet.nii.gz``, ``report/x.txt``), else from the one
    configured modality whose kind reads that format; their patient from ``patients/<id>/``, a
    BIDS ``sub-<id>`` folder, or the one PatientID of the DICOM files in their folder or the
    nearest folder above it. The manifest holds raw patient ids: it never leaves the process
    (see :func:`review_tables` for the copy that is written).
    """
    rows: list[dict] = []
    errors: list[dict] = []
    dicom_rows: list[dict] = []
    folder_patients: dict[str, set[str]] = defaultdict(set)
    others: list[dict] = []
    for c in candidates:
        rel, fmt = c["rel"], c["format"]
        if not needs_header(c):
            others.append(c)
            continue
        f = facts.get(rel) or {"ok": False, "outcome": "unreadable", "error_class": "UnexpectedError",
                               "message": "the header scan returned nothing for this file (a bug: please report)"}
        if not f["ok"]:
            errors.append(_error(rel, "dicom" if f["outcome"] != "skipped" else None, f["outcome"],
                                 f["error_class"], f["message"]))
            continue
        base = {"rel": rel, "format": "dicom", "dicom_modality": f["dicom_modality"] or "?",
                "study_uid": f["study_uid"], "series_uid": f["series_uid"]}
        if f["dicomdir"]:
            errors.append(_error(rel, "dicom", "skipped", "DicomDir",
                                 "a DICOMDIR index file (no image); the files it lists are scanned directly",
                                 dicom_modality=""))
            continue
        if not f["patient_id"]:
            errors.append(_error(rel, "dicom", "unassigned", "NoPatientID",
                                 "the DICOM header has no PatientID; write a manifest.csv row for it to ingest it",
                                 dicom_modality=base["dicom_modality"], study_uid=f["study_uid"],
                                 series_uid=f["series_uid"]))
            continue
        folder_patients[os.path.dirname(rel)].add(f["patient_id"])
        target = modality_map.get(f["dicom_modality"])
        if target is None or target not in modalities or modalities[target] not in KINDS_OF_FORMAT["dicom"]:
            why = ("no ingest.scan.modality_map entry for it" if target is None else
                   f"mapped to {target!r}, which is not a configured ingest modality (add it, e.g. "
                   f"--set ingest.modalities.{target}.kind=volume)" if target not in modalities else
                   f"mapped to {target!r}, whose kind cannot hold DICOM images")
            errors.append(_error(rel, "dicom", "unmapped", "UnmappedModality", f"DICOM modality not ingested: {why}",
                                 dicom_modality=base["dicom_modality"], patient_id=f["patient_id"],
                                 study_uid=f["study_uid"], series_uid=f["series_uid"]))
            continue
        dicom_rows.append({**base, "patient_id": f["patient_id"], "modality": target})
    rows.extend(dicom_rows)

    def patient_of(rel: str) -> str | None:
        parts = rel.split(os.sep)
        if len(parts) >= 3 and parts[0] == "patients" and parts[1]:
            return parts[1]
        for p in parts[:-1]:
            if p.startswith("sub-") and len(p) > 4:
                return p[4:]
        folder = os.path.dirname(rel)
        while True:
            found = folder_patients.get(folder)
            if found:
                return next(iter(found)) if len(found) == 1 else None
            if not folder:
                return None
            folder = os.path.dirname(folder)

    for c in others:
        rel, fmt = c["rel"], c["format"]
        parts = rel.split(os.sep)
        name = _modality_by_name(parts, fmt, modalities)
        if name is None:
            fitting = [m for m, kind in sorted(modalities.items()) if kind in KINDS_OF_FORMAT.get(fmt, ())]
            name = fitting[0] if len(fitting) == 1 else None
            if name is None:
                why = ("no configured modality reads this format" if not fitting else
                       f"several configured modalities read this format ({', '.join(fitting)}): name the file or "
                       "its folder after one of them, or write a manifest.csv")
                errors.append(_error(rel, fmt, "unmapped", "UnmappedModality", f"{fmt} file not ingested: {why}",
                                     dicom_modality=""))
                continue
        pid = patient_of(rel)
        if not pid:
            errors.append(_error(rel, fmt, "unassigned", "NoPatientID",
                                 "cannot tell whose file this is (no patients/<id>/ or sub-<id>/ folder, and not "
                                 "beside the DICOM files of exactly one patient); write a manifest.csv row",
                                 dicom_modality=""))
            continue
        rows.append({"rel": rel, "format": fmt, "patient_id": pid, "modality": name, "dicom_modality": "",
                     "study_uid": "", "series_uid": ""})
    manifest = pd.DataFrame(rows, columns=["patient_id", "modality", "format", "rel", "dicom_modality", "study_uid",
                                           "series_uid"]).rename(columns={"rel": "path"})
    manifest = manifest.astype({"patient_id": str, "path": str})
    manifest = manifest.sort_values(["patient_id", "modality", "path"], kind="stable").reset_index(drop=True)
    errors.sort(key=lambda e: e["rel"])
    return manifest, errors


def accounted(n_found: int, manifest: pd.DataFrame, errors: list[dict]) -> bool:
    """Every file found is one manifest row or one scan error row."""
    return n_found == len(manifest) + len(errors)


# ----------------------------------------------------------------------------- what is written and printed
def public_rel_path(rel: str, key: bytes | None) -> str:
    """``rel`` with every component replaced by a keyed hash (a well-known extension kept), as in the
    ingest's ``errors.source_path``; plain when ``key`` is None. Folder and file names of an export often
    carry names, birth dates and accession numbers."""
    return rel if key is None else pseudonymous_path(rel, key)


def review_tables(manifest: pd.DataFrame, errors: list[dict], id_secret: bytes, source_secret: bytes,
                  path_key: bytes | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The inferred manifest and the scan errors as written for review: no raw id, UID or name.

    Manifest columns: sample_id (the ingest's pseudonymous id of the patient), modality, format,
    path (components hashed with ``path_key``; plain when None), dicom_modality, study_key and
    series_key (keyed hashes of the UIDs; series_key equals the records' source_key of a DICOM
    series). Errors: the ``ERRORS_SCHEMA`` columns (stage ``scan``) plus the outcome.
    """
    def key(uid: str) -> str:
        return pseudonym(source_secret, uid) if uid else ""

    review = pd.DataFrame({
        "sample_id": [pseudonym(id_secret, p) for p in manifest["patient_id"]],
        "modality": manifest["modality"].astype(str), "format": manifest["format"].astype(str),
        "path": [public_rel_path(p, path_key) for p in manifest["path"]],
        "dicom_modality": manifest["dicom_modality"].astype(str),
        "study_key": [key(u) for u in manifest["study_uid"]], "series_key": [key(u) for u in manifest["series_uid"]],
    })
    err = pd.DataFrame({
        "source_path": [public_rel_path(e["rel"], path_key) for e in errors],
        "stage": "scan", "modality": [e.get("dicom_modality") or e.get("format") or "" for e in errors],
        "error_class": [e["error_class"] for e in errors], "message": [e["message"] for e in errors],
        "outcome": [e["outcome"] for e in errors],
    }, columns=["source_path", "stage", "modality", "error_class", "message", "outcome"])
    return review, err


def summarise(n_found: int, manifest: pd.DataFrame, errors: list[dict]) -> dict:
    """Counts a user reads: per configured modality and per DICOM modality (patients, studies, series,
    files), files per outcome and class; ``reconciled`` when every file is accounted for."""
    def counts(df_rows: Iterable[dict]) -> dict:
        rows = list(df_rows)
        return {"patients": len({r["patient_id"] for r in rows if r.get("patient_id")}),
                "studies": len({r["study_uid"] for r in rows if r.get("study_uid")}),
                "series": len({r["series_uid"] for r in rows if r.get("series_uid")}),
                "files": len(rows)}

    recs = manifest.to_dict("records")
    per_modality = {m: counts(r for r in recs if r["modality"] == m) for m in sorted(set(manifest["modality"]))}
    per_dicom: dict[str, dict] = {}
    dicom_like = [{**r, "state": "manifest"} for r in recs if r["format"] == "dicom"] + \
        [{**e, "state": e["outcome"]} for e in errors if e.get("dicom_modality")]
    for dm in sorted({r["dicom_modality"] for r in dicom_like}):
        rows = [r for r in dicom_like if r["dicom_modality"] == dm]
        into = sorted({r["modality"] for r in rows if r["state"] == "manifest"})
        per_dicom[dm] = {**counts(rows), "ingested_as": into,
                         "unmapped": sum(r["state"] == "unmapped" for r in rows),
                         "unassigned": sum(r["state"] == "unassigned" for r in rows)}
    by_outcome = {o: dict(sorted(Counter(e["error_class"] for e in errors if e["outcome"] == o).items()))
                  for o in OUTCOMES}
    return {"files_found": n_found, "manifest_rows": len(manifest),
            **{f"files_{o}": sum(by_outcome[o].values()) for o in OUTCOMES},
            "patients": int(manifest["patient_id"].nunique()), "per_modality": per_modality,
            "per_dicom_modality": per_dicom, "by_outcome": by_outcome,
            "reconciled": accounted(n_found, manifest, errors)}


def scan_table(summary: dict) -> str:
    """The scan summary as printed by ``raypipe scan``."""
    lines = [f"{'modality':<14}{'patients':>9}{'studies':>9}{'series':>8}{'files':>8}  ingested as"]
    for dm, v in summary["per_dicom_modality"].items():
        into = ", ".join(v["ingested_as"]) or ("-- unmapped" if v["unmapped"] else "--")
        extra = f" ({v['unassigned']} files without PatientID)" if v["unassigned"] else ""
        lines.append(f"DICOM {dm:<8}{v['patients']:>9}{v['studies']:>9}{v['series']:>8}{v['files']:>8}  {into}{extra}")
    for m, v in summary["per_modality"].items():
        lines.append(f"-> {m:<11}{v['patients']:>9}{v['studies']:>9}{v['series']:>8}{v['files']:>8}")
    lines.append(f"files found {summary['files_found']} = manifest rows {summary['manifest_rows']} + unreadable "
                 f"{summary['files_unreadable']} + unmapped {summary['files_unmapped']} + unassigned "
                 f"{summary['files_unassigned']} + skipped {summary['files_skipped']}: "
                 f"{'reconciled' if summary['reconciled'] else 'NOT RECONCILED (a bug: please report)'}")
    for o in OUTCOMES:
        if summary["by_outcome"][o]:
            lines.append(f"  {o}: " + ", ".join(f"{c} {n}" for c, n in summary["by_outcome"][o].items()))
    return "\n".join(lines)

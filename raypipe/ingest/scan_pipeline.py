"""Ingest from a folder without a manifest, on Ray Data (`raypipe scan`, `raypipe ingest --input DIR`).

::

    walk DIR (driver; lstat only, no symlink followed, no special file opened)
        --DICOM candidates, cut into tasks of ingest.scan.files_per_task--> Ray Data map_batches:
          one header read per file (stop_before_pixels, only the grouping tags)
        --facts back to the driver (in memory only)--> scan.infer_manifest
    <scan.out>/inferred_manifest.csv   pseudonymous ids and paths, for review
    <scan.out>/scan_errors.parquet     ERRORS_SCHEMA rows (stage "scan") + outcome: every file not in the manifest
    <scan.out>/scan_summary.json       counts; reconciled when files found = manifest rows + scan error rows
    then (ingest only) the normal ingest of the inferred manifest

The pure part (what a header says, how files group, what is written) is
:mod:`raypipe.ingest.scan`; this module only runs it in parallel and writes it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import warnings

import pandas as pd
import pyarrow as pa

from raypipe.config import Config
from raypipe.ingest import scan

log = logging.getLogger(__name__)

#: marker of a scan output folder: only a folder holding it is ever replaced
SUMMARY_FILE = "scan_summary.json"


def _facts_batch(batch: pa.Table) -> pa.Table:
    """map_batches UDF: the DICOM facts of each file (never raises: a bad file is a fact too)."""
    out = {k: [] for k in ("rel", "ok", "outcome", "error_class", "message", "patient_id", "study_uid",
                           "series_uid", "dicom_modality", "dicomdir")}
    for rel, path, probe in zip(batch.column("rel").to_pylist(), batch.column("path").to_pylist(),
                                batch.column("probe").to_pylist()):
        try:
            f = scan.dicom_facts(path, probe=probe)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # noqa: BLE001 - incl. native panics (BaseException); no message leaks
            f = {"ok": False, "outcome": "unreadable", "error_class": "UnexpectedError",
                 "message": "the header scan failed unexpectedly (a bug: please report)"}
        out["rel"].append(rel)
        for k in list(out)[1:]:
            out[k].append(f.get(k))
    return pa.table(out)


def read_facts(root: str, candidates: list[dict], files_per_task: int) -> dict[str, dict]:
    """DICOM facts of the candidates that need a header read, keyed by relative path (Ray Data, parallel)."""
    import ray.data

    todo = [c for c in candidates if scan.needs_header(c)]
    if not todo:
        return {}
    items = [{"rel": c["rel"], "path": os.path.join(root, c["rel"]), "probe": c["format"] is None} for c in todo]
    ctx = ray.data.DataContext.get_current()
    old = ctx.max_errored_blocks
    ctx.max_errored_blocks = -1  # a task whose worker died twice loses its facts, not the scan
    try:
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / files_per_task)))
        with warnings.catch_warnings():  # Ray 2.60 has no named max_retries (ray_remote_args "deprecated")
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated.*")
            ds = ds.map_batches(_facts_batch, batch_format="pyarrow", batch_size=None, max_retries=1)
        rows = ds.take_all()
    finally:
        ctx.max_errored_blocks = old
    facts = {r["rel"]: r for r in rows}
    lost = len(todo) - len(facts)
    if lost:
        log.warning("scan: %d header reads lost with tasks that died twice (killed for memory or crashed)", lost)
        for c in todo:
            facts.setdefault(c["rel"], {"ok": False, "outcome": "unreadable", "error_class": "ResourceLimit",
                                        "message": "the header scan task of this file died twice (killed for "
                                        "memory or crashed); scan again with fewer ingest.scan.files_per_task"})
    return facts


def scan_folder(cfg: Config, root: str) -> tuple[int, pd.DataFrame, list[dict]]:
    """(files found, inferred manifest with raw ids -- in memory only --, scan error rows) of ``root``."""
    from raypipe.runtime import init_ray

    root = os.path.realpath(root)
    candidates, walk_errors = scan.list_files(root)
    n_found = len(candidates) + len(walk_errors)
    log.info("scan: %d files under the input folder, %d to read a DICOM header from", n_found,
             sum(scan.needs_header(c) for c in candidates))
    init_ray(cfg)
    facts = read_facts(root, candidates, cfg.ingest.scan.files_per_task)
    modalities = {m: c.kind for m, c in cfg.ingest.modalities.items()}
    manifest, errors = scan.infer_manifest(candidates, facts, modalities, cfg.ingest.scan.modality_map)
    errors = sorted(walk_errors + errors, key=lambda e: e["rel"])
    return n_found, manifest, errors


def scan_out_dir(cfg: Config) -> str:
    return os.path.abspath(cfg.ingest.scan.out or cfg.path("scan"))


def _check_out(out: str, root: str) -> None:
    """Refuse an output folder that would overwrite the input or a folder raypipe did not write."""
    out_r, root_r = os.path.realpath(out), os.path.realpath(root)
    if os.path.commonpath([out_r, root_r]) in (out_r, root_r):
        raise ValueError(f"scan output {out} is the input folder, inside it or a parent of it: set "
                         "ingest.scan.out (or --out-dir) to a folder outside the input")
    if os.path.lexists(out) and (not os.path.isdir(out) or os.path.islink(out) or
                                 (os.listdir(out) and not os.path.isfile(os.path.join(out, SUMMARY_FILE)))):
        raise ValueError(f"scan output {out} exists and was not written by `raypipe scan` (no {SUMMARY_FILE}); "
                         "remove it or choose another ingest.scan.out")


def write_scan(cfg: Config, root: str, n_found: int, manifest: pd.DataFrame, errors: list[dict]) -> dict:
    """Write the review copy of the inferred manifest, the scan errors and the summary; returns the summary."""
    import pyarrow.parquet as pq

    from raypipe.ids import resolve_secret
    from raypipe.ingest.pipeline import source_key_secret
    from raypipe.ingest.safety import path_key as source_path_key
    from raypipe.schema import ERRORS_SCHEMA

    secret = resolve_secret(cfg)
    source_secret = source_key_secret(secret)
    path_key = None if cfg.privacy.plain_paths else source_path_key(secret)
    review, err = scan.review_tables(manifest, errors, secret, source_secret, path_key)
    summary = scan.summarise(n_found, manifest, errors)
    out = scan_out_dir(cfg)
    _check_out(out, root)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".scan-", dir=parent)
    try:
        review.to_csv(os.path.join(tmp, "inferred_manifest.csv"), index=False)
        schema = ERRORS_SCHEMA.append(pa.field("outcome", pa.string()))
        pq.write_table(pa.Table.from_pandas(err, schema=schema, preserve_index=False),
                       os.path.join(tmp, "scan_errors.parquet"))
        with open(os.path.join(tmp, SUMMARY_FILE), "w") as fh:
            json.dump({**summary, "paths": "plain" if path_key is None else "pseudonymised"}, fh, indent=2,
                      sort_keys=True)
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=".scan-old-", dir=parent)
            os.rmdir(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("scan: %d files -> %d manifest rows of %d patients; inferred manifest in %s", n_found, len(manifest),
             summary["patients"], out)
    return {**summary, "scan_dir": out}


def _scan(cfg: Config) -> tuple[dict, pd.DataFrame]:
    from raypipe.ids import resolve_secret

    resolve_secret(cfg)  # before Ray starts: a run without a secret stops at once
    root = os.path.abspath(cfg.ingest_input)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"input folder {root} does not exist (ingest.input / --input)")
    n_found, manifest, errors = scan_folder(cfg, root)
    return write_scan(cfg, root, n_found, manifest, errors), manifest


def run_scan(cfg: Config) -> dict:
    """`raypipe scan`: scan ``ingest.input`` and write the inferred manifest for review (nothing ingested)."""
    summary, _ = _scan(cfg)
    return {**summary, "ok": bool(summary["reconciled"]), "printed": scan.scan_table(summary)}


def wants_scan(cfg: Config, root: str) -> bool:
    """Whether ``raypipe ingest`` infers the manifest by scanning (``ingest.scan.use``)."""
    use = cfg.ingest.scan.use
    if use != "auto":
        return use == "always"
    return not (os.path.isfile(os.path.join(root, "manifest.csv")) or os.path.isdir(os.path.join(root, "patients")))


def ingest_manifest(cfg: Config, manifest: pd.DataFrame) -> dict:
    """The normal ingest (:func:`raypipe.ingest.pipeline.run_ingest`) of ``ingest.input`` with ``manifest``
    (patient_id, modality, format, path; raw ids, in memory) in place of a manifest.csv."""
    from raypipe.ingest.pipeline import run_ingest

    return run_ingest(cfg, manifest=manifest)


def run_ingest_auto(cfg: Config) -> dict:
    """`raypipe ingest`: the manifest (or folder convention) when the input has one, else scan, write the
    inferred manifest for review and ingest it. The summary then also carries the scan's counts, and
    ``reconciled`` covers both: files found = files seen by the ingest + scan error rows."""
    from raypipe.ingest.pipeline import run_ingest

    root = os.path.abspath(cfg.ingest_input)
    if not os.path.isdir(root) or not wants_scan(cfg, root):
        return run_ingest(cfg)
    scanned, manifest = _scan(cfg)
    result = ingest_manifest(cfg, manifest[["patient_id", "modality", "format", "path"]].copy())
    seen = result.get("files_seen", 0) + sum(result.get("skipped_modalities", {}).values())
    reconciled = bool(result.get("reconciled")) and scanned["reconciled"] and seen == scanned["manifest_rows"]
    printed = "\n".join([f"scan of the input folder (inferred manifest for review: {scanned['scan_dir']})",
                         scan.scan_table(scanned), "", result.get("printed", "")])
    scan_part = {k: scanned[k] for k in ("files_found", "manifest_rows", "files_unreadable", "files_unmapped",
                                         "files_unassigned", "files_skipped", "scan_dir")}
    return {**result, "scan": scan_part, "reconciled": reconciled, "ok": bool(result.get("ok")) and reconciled,
            "printed": printed}

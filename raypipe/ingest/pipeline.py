"""Ingestion on Ray Data: raw cohort -> records, samples and errors tables (`raypipe ingest`).

::

    manifest + labels --(driver)--> samples (pseudonymous ids, grouped stratified test split)
    DICOM files --header pass (Ray Data)--> series grouped, ordered, slices selected (driver, metadata only)
    selected slices, NIfTI, images, GeoTIFF, EHR, reports, tables --decode pass (Ray Data)--> rows
    EHR rows --statistics of the training split--> standardised
    rows --sort by id--> records/ (Parquet)   errors.parquet   ingest_summary.json

Every file is either ingested or quarantined (an ``errors`` row, with the reason);
the per-row try/except lives in the UDFs, so one bad file never drops a block of good
rows. Outputs are written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from raypipe.config import Config
from raypipe.ids import pseudonym, resolve_secret
from raypipe.ingest.common import DecodeError, select_indices
from raypipe.schema import (ERRORS_SCHEMA, NORMALISATION_KEY, RECORDS_SCHEMA, array_to_payload, samples_schema,
                            with_json_metadata)

log = logging.getLogger(__name__)

#: one schema for everything the decode pass emits: a record or an error
ROW_SCHEMA = pa.schema([
    pa.field("kind", pa.string()), pa.field("item", pa.int64()), pa.field("sample_id", pa.string()),
    pa.field("modality", pa.string()), pa.field("source_key", pa.string()), pa.field("position", pa.int32()),
    pa.field("payload", pa.binary()), pa.field("dtype", pa.string()), pa.field("shape", pa.list_(pa.int32())),
    pa.field("text", pa.string()), pa.field("meta", pa.string()), pa.field("source_path", pa.string()),
    pa.field("error_class", pa.string()), pa.field("message", pa.string()), pa.field("train", pa.bool_()),
])
HEADER_SCHEMA = pa.schema([
    pa.field("item", pa.int64()), pa.field("series", pa.string()), pa.field("position", pa.float64()),
    pa.field("instance", pa.int64()), pa.field("frames", pa.int64()), pa.field("error_class", pa.string()),
    pa.field("message", pa.string()),
])
UNEXPECTED = "UnexpectedError"


# ----------------------------------------------------------------------------- UDFs (run in Ray tasks)
def _header_batch(batch: pa.Table) -> pa.Table:
    from raypipe.ingest import dicom

    out = defaultdict(list)
    for item, path in zip(batch.column("item").to_pylist(), batch.column("path").to_pylist()):
        series = pos = inst = frames = err = msg = None
        try:
            h = dicom.read_header(path)
            series, pos, inst, frames = h.series_uid, h.position, h.instance, h.frames
        except DecodeError as e:
            err, msg = e.error_class, str(e)
        except Exception as e:  # noqa: BLE001 - quarantine, never crash the run
            err, msg = UNEXPECTED, f"{type(e).__name__}: {e}"
        for k, v in zip(HEADER_SCHEMA.names, (item, series, pos, inst, frames, err, msg)):
            out[k].append(v)
    return pa.table(dict(out), schema=HEADER_SCHEMA)


def _decode_item(it: dict, mod_cfg: dict, ehr_cfg: dict) -> list[dict]:
    """One work item -> record rows (dicts of RECORDS columns)."""
    from raypipe.ingest import dicom, ehr, geotiff, image2d, nifti, report, tabular

    fmt, kind = it["format"], mod_cfg["kind"]
    size, window = mod_cfg["size"], mod_cfg["window"]
    sel = mod_cfg["slices"]
    base = {"sample_id": it["sample_id"], "modality": it["modality"], "source_key": it["source_key"]}
    if fmt == "dicom":
        expected = {"ct": {"CT"}, "pet": {"PT"}}.get(it["modality"])
        img, meta = dicom.decode_slice(it["path"], size, window, frame=it["frame"], expected=expected)
        if it.get("z_mm") is not None:
            meta["z_mm"] = it["z_mm"]  # position along the slice normal: the order is checkable
        return [{**base, "position": it["position"], **array_to_payload(img), "meta": meta}]
    if fmt == "nifti":
        return [{**base, "position": pos, **array_to_payload(img), "meta": meta}
                for pos, img, meta in nifti.decode_volume(it["path"], size, window, sel["policy"], sel["n"], sel["k"],
                                                          mod_cfg["frame"])]
    if fmt in ("png", "jpeg", "image"):
        img, meta = image2d.decode_image(it["path"], size, mod_cfg["channels"])
        return [{**base, "position": 0, **array_to_payload(img), "meta": meta}]
    if fmt == "geotiff":
        return [{**base, "position": pos, **array_to_payload(img), "meta": meta}
                for pos, img, meta in geotiff.decode_scene(it["path"], size, mod_cfg["bands"], mod_cfg["percentiles"])]
    if kind == "ehr":
        x, meta = ehr.discretise(it["path"], ehr_cfg["step_hours"], ehr_cfg["window_hours"])
        return [{**base, "position": 0, **array_to_payload(x), "meta": meta}]
    if kind == "text":
        return [{**base, "position": 0, "text": report.read_report(it["path"], mod_cfg["max_words"]), "meta": {}}]
    if kind == "tabular":
        vec, cols = tabular.read_row(it["path"], it["source_id"])
        return [{**base, "position": 0, **array_to_payload(vec), "meta": {"columns": cols}}]
    raise DecodeError("UnsupportedFormat", f"format {fmt!r} for a {kind} modality")


def _decode_batch(batch: pa.Table, modalities: dict, ehr_cfg: dict) -> pa.Table:
    """map_batches UDF: decode each item with its own try/except (a bad file becomes an error row)."""
    out = defaultdict(list)

    def emit(row: dict) -> None:
        for name in ROW_SCHEMA.names:
            out[name].append(row.get(name))

    for it in batch.to_pylist():
        common = {"item": it["item"], "sample_id": it["sample_id"], "modality": it["modality"],
                  "source_path": it["rel_path"], "train": it["train"]}
        try:
            for rec in _decode_item(it, modalities[it["modality"]], ehr_cfg):
                rec["meta"] = json.dumps(rec.get("meta", {}), sort_keys=True)
                emit({**common, **rec, "kind": "record"})
        except DecodeError as e:
            emit({**common, "kind": "error", "error_class": e.error_class, "message": str(e)})
        except Exception as e:  # noqa: BLE001 - quarantine, never crash the run
            emit({**common, "kind": "error", "error_class": UNEXPECTED, "message": f"{type(e).__name__}: {e}"})
    return pa.table(dict(out), schema=ROW_SCHEMA)


def _ehr_sums(batch: pa.Table) -> pa.Table:
    from raypipe.ingest.ehr import CONTINUOUS_COLUMNS
    from raypipe.schema import payload_to_array

    cols = CONTINUOUS_COLUMNS
    s, sq, n = np.zeros(len(cols)), np.zeros(len(cols)), 0.0
    for p, d, sh in zip(batch.column("payload").to_pylist(), batch.column("dtype").to_pylist(),
                        batch.column("shape").to_pylist()):
        x = payload_to_array(p, d, sh)[:, cols].astype(np.float64)
        s += x.sum(0)
        sq += (x ** 2).sum(0)
        n += x.shape[0]
    return pa.table({"s": [s.tolist()], "sq": [sq.tolist()], "n": [n]})


def _standardise_batch(batch: pa.Table, ehr_modalities: list[str], stats: dict) -> pa.Table:
    from raypipe.ingest.ehr import standardise
    from raypipe.schema import payload_to_array

    mods = batch.column("modality").to_pylist()
    if not any(m in ehr_modalities for m in mods):
        return batch
    new = []
    for m, p, d, sh in zip(mods, batch.column("payload").to_pylist(), batch.column("dtype").to_pylist(),
                           batch.column("shape").to_pylist()):
        if m in ehr_modalities and p is not None:
            new.append(array_to_payload(standardise(payload_to_array(p, d, sh), stats))["payload"])
        else:
            new.append(p)
    return batch.set_column(batch.schema.get_field_index("payload"), "payload", pa.array(new, pa.binary()))


# ----------------------------------------------------------------------------- driver
def _samples(cfg: Config, secret: bytes, root: str) -> tuple[pd.DataFrame, dict[str, str]]:
    from raypipe.ingest.manifest import read_labels
    from raypipe.train.splits import holdout_mask

    labels = read_labels(root, cfg.ingest.label_columns, cfg.ingest.group_columns)
    ids = {pid: pseudonym(secret, pid) for pid in labels["patient_id"]}
    df = labels.copy()
    df.insert(0, "sample_id", df["patient_id"].map(ids))
    y = df[cfg.ingest.label_columns[0]].to_numpy()
    test = holdout_mask(df["sample_id"].to_numpy(), y, fraction=cfg.ingest.test_fraction, seed=cfg.run.seed) \
        if cfg.ingest.test_fraction > 0 else np.zeros(len(df), bool)
    df["split"] = np.where(test, "test", "train")
    df = df.drop(columns=["patient_id"]).sort_values("sample_id").reset_index(drop=True)
    return df, ids


def _blocks(n: int) -> int:
    from raypipe.runtime import cluster_resources

    return max(1, min(n, 4 * max(1, int(cluster_resources()["CPU"]))))


def run_ingest(cfg: Config) -> dict:
    """Ingest ``cfg.ingest_input`` into ``cfg.records_dir``; returns the reconciliation summary."""
    import pyarrow.parquet as pq
    import ray.data

    from raypipe.ingest.manifest import read_manifest
    from raypipe.runtime import init_ray

    secret = resolve_secret(cfg)
    root = os.path.abspath(cfg.ingest_input)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"cohort directory {root} does not exist: run `raypipe synth` or set ingest.input")
    init_ray(cfg)
    samples, ids = _samples(cfg, secret, root)
    train_ids = set(samples.loc[samples["split"] == "train", "sample_id"])
    manifest = read_manifest(root)
    mods = {k: v.model_dump(mode="json") for k, v in cfg.ingest.modalities.items()}

    seen: dict[str, int] = defaultdict(int)
    errors: list[dict] = []
    skipped_modalities: dict[str, int] = defaultdict(int)
    items: list[dict] = []
    for row in manifest.itertuples(index=False):
        if row.modality not in mods:
            skipped_modalities[row.modality] += 1
            continue
        seen[row.modality] += 1
        if row.patient_id not in ids:
            errors.append({"source_path": row.path, "stage": "ingest", "modality": row.modality,
                           "error_class": "NoLabel", "message": "patient not in labels.csv"})
            continue
        sid = ids[row.patient_id]
        items.append({"item": len(items), "sample_id": sid, "source_id": str(row.patient_id), "modality": row.modality,
                      "format": str(row.format), "path": os.path.join(root, row.path), "rel_path": row.path,
                      "frame": None, "position": 0, "source_key": pseudonym(secret, row.path), "train": sid in train_ids,
                      "z_mm": None})
    n_files = sum(seen.values())
    log.info("ingest: %d files of %d modalities, %d patients", n_files, len(seen), len(samples))

    # --- DICOM: header pass, then group by series, order anatomically, select slices (metadata only)
    dicom_items = [it for it in items if it["format"] == "dicom"]
    work = [it for it in items if it["format"] != "dicom"]
    not_selected = defaultdict(int)
    if dicom_items:
        hdr = ray.data.from_items([{"item": it["item"], "path": it["path"]} for it in dicom_items],
                                  override_num_blocks=_blocks(len(dicom_items)))
        headers = hdr.map_batches(_header_batch, batch_format="pyarrow", batch_size=64).to_pandas()
        by_item = {it["item"]: it for it in dicom_items}
        series: dict[tuple, list] = defaultdict(list)
        from raypipe.ingest.dicom import SliceHeader, order_series

        for h in headers.itertuples(index=False):
            it = by_item[int(h.item)]
            if h.error_class is not None and isinstance(h.error_class, str):
                errors.append({"source_path": it["rel_path"], "stage": "ingest", "modality": it["modality"],
                               "error_class": h.error_class, "message": h.message})
                continue
            pos = None if pd.isna(h.position) else float(h.position)
            inst = None if pd.isna(h.instance) else int(h.instance)
            series[(it["sample_id"], it["modality"], h.series)].append(
                (SliceHeader(it["path"], h.series, "", pos, inst, int(h.frames), ""), it))
        for (sid, modality, uid), members in sorted(series.items()):
            sel = mods[modality]["slices"]
            key = pseudonym(secret, uid)
            if len(members) == 1 and members[0][0].frames > 1:  # one multi-frame file: select frames
                it = members[0][1]
                for pos, f in enumerate(select_indices(members[0][0].frames, sel["policy"], sel["n"], sel["k"])):
                    work.append({**it, "frame": f, "position": pos, "source_key": key})
                continue
            ordered = order_series([h for h, _ in members])
            pick = set(select_indices(len(ordered), sel["policy"], sel["n"], sel["k"]))
            lookup = {h.path: it for h, it in members}
            for rank, h in enumerate(ordered):
                it = lookup[h.path]
                if rank in pick:
                    work.append({**it, "position": sorted(pick).index(rank), "source_key": key, "z_mm": h.position})
                else:
                    not_selected[modality] += 1
    # --- decode pass
    ingested_files: dict[str, set] = defaultdict(set)
    records_dir = cfg.records_dir
    parent = os.path.dirname(os.path.abspath(records_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ingest-", dir=parent)
    try:
        norm_stats: dict[str, Any] = {}
        n_records = 0
        if work:
            work.sort(key=lambda it: it["item"])
            ds = ray.data.from_items(work, override_num_blocks=_blocks(len(work)))
            rows = ds.map_batches(_decode_batch, fn_kwargs={"modalities": mods, "ehr_cfg": cfg.ingest.ehr.model_dump()},
                                  batch_format="pyarrow", batch_size=16)
            rows = rows.materialize()
            ehr_mods = [m for m, c in mods.items() if c["kind"] == "ehr"]
            if ehr_mods:
                # statistics of the training split only (applied unchanged to test and at inference)
                train_ehr = rows.filter(lambda r: r["kind"] == "record" and r["modality"] in ehr_mods and r["train"])
                sums = train_ehr.map_batches(_ehr_sums, batch_format="pyarrow").take_all()
                if sums:
                    from raypipe.ingest.ehr import fit_normalisation

                    s = np.sum([r["s"] for r in sums], axis=0)
                    sq = np.sum([r["sq"] for r in sums], axis=0)
                    n = float(np.sum([r["n"] for r in sums]))
                    norm_stats = fit_normalisation(np.asarray(s), np.asarray(sq), n)
                    rows = rows.map_batches(_standardise_batch, fn_kwargs={"ehr_modalities": ehr_mods,
                                                                           "stats": norm_stats},
                                            batch_format="pyarrow").materialize()
            bad = rows.filter(lambda r: r["kind"] == "error").to_pandas()
            for r in bad.itertuples(index=False):
                errors.append({"source_path": r.source_path, "stage": "ingest", "modality": r.modality,
                               "error_class": r.error_class, "message": r.message})
            good = rows.filter(lambda r: r["kind"] == "record")
            for r in good.select_columns(["modality", "source_path"]).iter_rows():
                ingested_files[r["modality"]].add(r["source_path"])
            out = (good.select_columns(RECORDS_SCHEMA.names)
                   .sort(["sample_id", "modality", "source_key", "position"]))
            n_records = out.count()
            if n_records:
                out.write_parquet(os.path.join(tmp, "records"), schema=RECORDS_SCHEMA.with_metadata(None))
        if not n_records:
            os.makedirs(os.path.join(tmp, "records"), exist_ok=True)
            pq.write_table(RECORDS_SCHEMA.empty_table(), os.path.join(tmp, "records", "empty.parquet"))
        # --- samples, errors, statistics, summary
        label_cols, group_cols = cfg.ingest.label_columns, cfg.ingest.group_columns
        sschema = samples_schema(label_cols, group_cols + ["split"])
        if norm_stats:
            sschema = with_json_metadata(sschema, NORMALISATION_KEY, {"ehr": norm_stats})
        pq.write_table(pa.Table.from_pandas(samples[sschema.names], schema=sschema, preserve_index=False),
                       os.path.join(tmp, "samples.parquet"))
        err_df = pd.DataFrame(errors, columns=ERRORS_SCHEMA.names).sort_values(
            ["modality", "source_path", "error_class"], kind="stable")
        pq.write_table(pa.Table.from_pandas(err_df, schema=ERRORS_SCHEMA, preserve_index=False),
                       os.path.join(tmp, "errors.parquet"))
        with open(os.path.join(tmp, "ehr_normalisation.json"), "w") as fh:
            json.dump(norm_stats, fh, indent=2)
        summary = _summary(seen, ingested_files, errors, not_selected, skipped_modalities, n_records, len(samples),
                           cfg.ingest.error_budget)
        with open(os.path.join(tmp, "ingest_summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2, sort_keys=True)
        if os.path.exists(records_dir):
            shutil.rmtree(records_dir)
        os.replace(tmp, records_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["records_dir"] = os.path.abspath(records_dir)
    return summary


def _summary(seen, ingested_files, errors, not_selected, skipped_modalities, n_records, n_samples, budget) -> dict:
    quarantined = defaultdict(set)
    missing = defaultdict(set)
    for e in errors:
        (missing if e["error_class"] == "EmptyReport" else quarantined)[e["modality"]].add(e["source_path"])
    per = {}
    ok = True
    for m in sorted(seen):
        ing = ingested_files.get(m, set())
        q = quarantined.get(m, set()) - ing
        em = missing.get(m, set())
        per[m] = {"seen": seen[m], "ingested": len(ing), "quarantined": len(q), "empty_as_missing": len(em),
                  "not_selected": not_selected.get(m, 0)}
        per[m]["reconciled"] = per[m]["seen"] == len(ing) + len(q) + len(em) + per[m]["not_selected"]
        ok &= per[m]["reconciled"]
    total_seen = sum(seen.values())
    total_q = sum(v["quarantined"] for v in per.values())
    rate = total_q / total_seen if total_seen else 0.0
    within = rate <= budget
    return {"ok": bool(ok and within), "reconciled": bool(ok), "files_seen": total_seen,
            "files_ingested": sum(v["ingested"] for v in per.values()), "files_quarantined": total_q,
            "files_empty_as_missing": sum(v["empty_as_missing"] for v in per.values()),
            "files_not_selected": sum(v["not_selected"] for v in per.values()), "records": int(n_records),
            "samples": n_samples, "per_modality": per, "error_rate": round(rate, 4), "error_budget": budget,
            "within_error_budget": bool(within), "skipped_modalities": dict(skipped_modalities)}

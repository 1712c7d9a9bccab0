"""Records schema 2 (issue 17): uint8 images and float16 EHR in fixed-shape tensor columns, zstd,
bounded row groups; readable by pandas / pyarrow / Ray Data without raypipe code; embeddings of
uint8 records match those of float32 records; schema-1 rows still read."""

from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from raypipe.config import load_config
from raypipe.schema import RECORDS_SCHEMA, array_to_payload, record_array, records_schema

pytestmark = pytest.mark.ray

MODALITIES = ("ingest.modalities={ct: {kind: volume, window: [-1000, 400], size: 32, slices: {policy: even, n: 4}}, "
              "pet: {kind: volume, window: [0, 10], size: 32, slices: {policy: even, n: 4}}, ehr: {kind: ehr}}")


def _cfg(out, cohort, dtype, *extra):
    # the demo's image settings (32x32, 4 slices, seeded random ResNet34)
    return load_config(None, [f"run.out_dir={out}", f"ingest.input={cohort}", "ray.progress_bars=false",
                              MODALITIES, f"ingest.payload_dtype={dtype}", "embed.image.weights=random",
                              "embed.image.input_size=32", "run.seed=0", "embed.batch_size=8", "embed.pool_size=1",
                              *extra])


@pytest.fixture(scope="module")
def ingested(ray_session, clinical_cohort, tmp_path_factory):
    from raypipe.ingest.pipeline import run_ingest

    root, _ = clinical_cohort
    out = {}
    for dtype in ("uint8", "float32"):
        cfg = _cfg(str(tmp_path_factory.mktemp(f"records_{dtype}")), root, dtype)
        assert run_ingest(cfg)["ok"]
        out[dtype] = cfg
    # the same uint8 values as raw payload bytes (ingest.tensor_columns: false)
    cfg = _cfg(str(tmp_path_factory.mktemp("records_bytes")), root, "uint8", "ingest.tensor_columns=false")
    assert run_ingest(cfg)["ok"]
    out["uint8_bytes"] = cfg
    return out


def _records(cfg) -> str:
    return os.path.join(cfg.records_dir, "records")


def test_uint8_records_read_as_arrays_without_raypipe(ingested):
    # one modality per read (its tensor column is null on the other modalities' rows)
    ct8, ct32 = (pd.read_parquet(_records(ingested[d]), filters=[("modality", "=", "ct")]) for d in ("uint8", "float32"))
    assert len(ct8) == len(ct32) > 0 and list(ct8.source_key) == list(ct32.source_key)
    for a, b in zip(ct8.tensor_ct, ct32.tensor_ct):  # pandas: one numpy array per row, no bytes
        assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.size == 32 * 32
        assert b.dtype == np.float32
        # round(255 v) / 255 is within half a step of the float32 value
        np.testing.assert_allclose(a.astype(np.float32) / 255, b, atol=0.5 / 255 + 1e-6)
    # pyarrow: the whole column of one modality as one shaped array (zero copy)
    t = pq.read_table(_records(ingested["uint8"]), filters=[("modality", "=", "ct")])
    arr = t.column("tensor_ct").combine_chunks().to_numpy_ndarray()
    assert arr.shape == (len(ct8), 1, 32, 32) and arr.dtype == np.uint8
    ehr = pd.read_parquet(_records(ingested["uint8"]), filters=[("modality", "=", "ehr")])
    assert set(ehr.dtype) == {"float16"} and all(x.dtype == np.float16 and x.size == 24 * 76 for x in ehr.tensor_ehr)


def test_polars_and_duckdb_read_the_same_pixels(ingested):
    """Readers that no raypipe code touches: polars keeps the fixed-shape tensor type; duckdb reads a list per row."""
    pl = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    path = _records(ingested["uint8"])
    ref = pq.read_table(path, filters=[("modality", "=", "ct")]).sort_by([("sample_id", "ascending"),
                                                                           ("position", "ascending")])
    want = ref.column("tensor_ct").combine_chunks().to_numpy_ndarray().reshape(ref.num_rows, -1)
    df = pl.read_parquet(os.path.join(path, "*.parquet")).filter(pl.col("modality") == "ct").sort(
        ["sample_id", "position"])
    assert "fixed_shape_tensor" in str(df.schema["tensor_ct"]) and "[1,32,32]" in str(df.schema["tensor_ct"])
    got = df["tensor_ct"].to_numpy()
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got.reshape(len(df), -1), want)
    rows = duckdb.sql(f"select tensor_ct from read_parquet('{path}/*.parquet') where modality = 'ct' "
                      "order by sample_id, position").fetchnumpy()["tensor_ct"]
    np.testing.assert_array_equal(np.stack([np.asarray(r, np.uint8) for r in rows]), want)


def test_ray_data_reads_the_tensor_column_shaped(ingested):
    import ray.data
    from ray.data.expressions import col

    ds = ray.data.read_parquet(_records(ingested["uint8"])).filter(expr=col("modality") == "pet")
    row = ds.select_columns(["tensor_pet"]).take(1)[0]
    assert np.asarray(row["tensor_pet"]).shape == (1, 32, 32) and np.asarray(row["tensor_pet"]).dtype == np.uint8


def test_uint8_records_are_compact_zstd(ingested):
    def size(cfg):
        return sum(os.path.getsize(f) for f in glob.glob(os.path.join(_records(cfg), "*.parquet")))

    assert size(ingested["uint8"]) < 0.5 * size(ingested["float32"])  # 1 byte per pixel instead of 4
    meta = pq.ParquetFile(sorted(glob.glob(os.path.join(_records(ingested["uint8"]), "*.parquet")))[0]).metadata
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {"ZSTD"}, names


def test_row_groups_are_bounded(tmp_path):
    from raypipe.ingest import pipeline

    n, side = 130, 724  # ~0.5 MB per uint8 record: more than one row group at ROW_GROUP_BYTES <= 64 MB
    rows = pa.table({"sample_id": [f"s{i:03d}" for i in range(n)], "modality": ["ct"] * n,
                     "source_key": ["k"] * n, "position": pa.array(range(n), pa.int32()),
                     "payload": [np.zeros((1, side, side), np.uint8).tobytes()] * n, "dtype": ["uint8"] * n,
                     "shape": [[1, side, side]] * n, "text": pa.nulls(n, pa.string()), "meta": ["{}"] * n})
    table = pipeline.records_table(rows, {"ct": ("uint8", [1, side, side])})
    assert table.column("payload").null_count == n and table.column("tensor_ct").null_count == 0
    path = str(tmp_path / "r.parquet")
    pipeline.write_records(table, path)
    md = pq.ParquetFile(path).metadata
    per_row = table.nbytes / n
    per_group = int(pipeline.ROW_GROUP_BYTES // per_row)
    assert md.num_row_groups == -(-n // per_group) >= 2 and md.row_group(0).num_rows == per_group


def test_uint8_tensor_values_are_byte_stream_split_and_round_trip(tmp_path):
    """Parquet stores uint8 as INT32: the 8-bit tensor column's values are BYTE_STREAM_SPLIT (their three
    zero bytes per pixel become zero streams that zstd removes); other tensors (float16 EHR) are not;
    every value reads back unchanged, through pyarrow and through pandas."""
    from raypipe.ingest import pipeline

    rng = np.random.default_rng(3)
    img = [rng.integers(0, 256, (1, 16, 16)).astype(np.uint8) for _ in range(5)]
    ehr = [rng.standard_normal((4, 3)).astype(np.float16) for _ in range(3)]
    rows = pa.Table.from_pylist(
        [{"sample_id": f"s{i}", "modality": "ct", "source_key": "k", "position": i, **array_to_payload(a),
          "text": None, "meta": "{}"} for i, a in enumerate(img)]
        + [{"sample_id": f"s{i}", "modality": "ehr", "source_key": "e", "position": 0, **array_to_payload(a),
            "text": None, "meta": "{}"} for i, a in enumerate(ehr)], schema=RECORDS_SCHEMA)
    table = pipeline.records_table(rows, {"ct": ("uint8", [1, 16, 16]), "ehr": ("float16", [4, 3])})
    path = str(tmp_path / "r.parquet")
    pipeline.write_records(table, path)
    rg = pq.ParquetFile(path).metadata.row_group(0)
    enc = {rg.column(j).path_in_schema: rg.column(j).encodings for j in range(rg.num_columns)}
    assert "BYTE_STREAM_SPLIT" in enc["tensor_ct.list.element"]
    assert "BYTE_STREAM_SPLIT" not in enc["tensor_ehr.list.element"]
    back = pq.read_table(path)
    assert back.equals(table)
    got = back.slice(0, 5).column("tensor_ct").combine_chunks().to_numpy_ndarray()
    np.testing.assert_array_equal(got, np.stack(img))
    df = pd.read_parquet(path)
    np.testing.assert_array_equal(np.stack([np.asarray(v).reshape(1, 16, 16) for v in df["tensor_ct"][:5]]),
                                  np.stack(img))


@pytest.fixture(scope="module")
def embedded(ingested, tmp_path_factory):
    """Each layout's records embedded once (seeded random ResNet34): the embeddings tables, by sample."""
    from raypipe.embed.pipeline import run_embed

    tables = {}
    for d, cfg in ingested.items():
        cfg = cfg.model_copy(deep=True)
        cfg.embed.out = str(tmp_path_factory.mktemp(f"emb_{d}"))
        run_embed(cfg)
        tables[d] = pq.read_table(cfg.embed.out).sort_by("sample_id")
    return tables


def _embeddings(table: pa.Table, m: str, rows: np.ndarray) -> np.ndarray:
    from raypipe.schema import embedding_column

    return np.stack(table.column(embedding_column(m)).to_numpy(zero_copy_only=False)[rows])


def test_embeddings_of_uint8_records_match_float32(embedded):
    a, b = embedded["uint8"], embedded["float32"]
    assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist()
    for m in ("ct", "pet"):
        present = pc.and_(a.column(f"mask_{m}"), b.column(f"mask_{m}")).to_numpy(zero_copy_only=False)
        assert present.sum() >= 3
        x, y = _embeddings(a, m, present), _embeddings(b, m, present)
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert cos.min() >= 0.999, (m, cos.min())
        # not vacuous: different samples' embeddings differ by more than the quantisation does
        other = (x[0] * y[1:]).sum(1) / np.linalg.norm(x[0]) / np.linalg.norm(y[1:], axis=1)
        assert other.max() < cos.min()


def test_payload_bytes_layout_embeds_exactly_like_tensor_columns(ingested, embedded):
    """ingest.tensor_columns=false stores the same uint8 values as payload bytes: no tensor column in
    the files, and the embeddings equal those of the tensor-column records to the last bit."""
    names = pq.read_schema(next(iter(glob.glob(os.path.join(_records(ingested["uint8_bytes"]), "*.parquet"))))).names
    assert not [n for n in names if n.startswith("tensor_")]
    a, b = embedded["uint8"], embedded["uint8_bytes"]
    assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist()
    for m in ("ct", "pet"):
        assert a.column(f"mask_{m}").to_pylist() == b.column(f"mask_{m}").to_pylist()
        present = a.column(f"mask_{m}").to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(_embeddings(a, m, present), _embeddings(b, m, present))


def test_schema_1_rows_still_read():
    a = np.random.default_rng(0).random((1, 4, 4), dtype=np.float32)
    row = {"modality": "ct", **array_to_payload(a)}  # raw float32 bytes + dtype/shape, no tensor column
    np.testing.assert_array_equal(record_array(row), a)
    q = np.array([[[0, 128, 255]]], np.uint8)
    row2 = {"modality": "ct", "payload": None, "dtype": "uint8", "shape": [1, 1, 3], "tensor_ct": q.reshape(-1)}
    np.testing.assert_allclose(record_array(row2), [[[0.0, 128 / 255, 1.0]]], rtol=1e-6)
    assert records_schema().names == RECORDS_SCHEMA.names

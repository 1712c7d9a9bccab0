"""The public embeddings-table writer and `raypipe import` (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.tables import TableError, import_table, write_embeddings
from raypipe.train.tables import read_embeddings


def _arrays(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return {"ct": rng.standard_normal((n, 4)), "text": rng.standard_normal((n, 3, 2))}, rng


def test_arrays_round_trip_with_masks_groups_split_and_spec(tmp_path):
    emb, _ = _arrays()
    emb["ct"][2] = np.nan  # absent: the whole embedding NaN, no mask given
    ids = ["p5", "p1", "p3", "p0", "p4", "p2"]
    out = write_embeddings(str(tmp_path / "e"), emb, ids, np.array([1, 0, 1, 0, 1, 0]),
                           masks={"text": np.array([1, 1, 1, 1, 0, 1])}, groups={"site": ["a", "b", None] * 2},
                           split=["train"] * 5 + ["test"], spec={"modalities": {"ct": {"model": "my-fm"}}})
    t = read_embeddings(out)
    assert list(t.sample_id) == ["p0", "p1", "p2", "p3", "p4", "p5"]  # sorted by id, as embed writes
    assert t.shapes == {"ct": (4,), "text": (3, 2)}
    order = [ids.index(s) for s in t.sample_id]
    np.testing.assert_array_equal(t.mask[:, 0], [i != 2 for i in order])
    np.testing.assert_array_equal(t.mask[:, 1], [i != 4 for i in order])
    np.testing.assert_allclose(t.x["text"][1], emb["text"][1].astype(np.float32))
    assert t.y.dtype == np.float64 and list(t.y) == [0, 0, 0, 1, 1, 1]
    assert list(t.groups["site"]) == [["a", "b", "unknown"][i % 3] for i in order]
    assert list(t.split) == [["train"] * 5 + ["test"]][0][0:0] + [("test" if i == 5 else "train") for i in order]
    # absent embeddings are null in the file (never a zero vector that looks like data)
    raw = pq.read_table(tmp_path / "e" / "part-00000.parquet")
    assert raw.column("emb_ct").null_count == 1 and raw.column("emb_text").null_count == 1
    spec = json.loads(raw.schema.metadata[b"raypipe.embedding_spec"])
    assert spec["modalities"]["ct"] == {"model": "my-fm", "shape": [4]}


def test_pandas_frame_with_list_and_wide_columns(tmp_path):
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(5)], "label": [0, 1, 2, 1, 0], "site": list("abcab")})
    df["emb_img"] = [rng.standard_normal(3).tolist() if i != 1 else None for i in range(5)]
    for j in range(2):
        df[f"emb_ehr_{j}"] = [np.nan if i == 3 else rng.standard_normal() for i in range(5)]
    t = read_embeddings(write_embeddings(str(tmp_path / "e"), df, task="multiclass"))
    assert t.modalities == ["img", "ehr"] and t.shapes == {"img": (3,), "ehr": (2,)}
    assert t.mask.tolist() == [[True, True], [False, True], [True, True], [True, False], [True, True]]
    assert list(t.groups) == ["site"] and list(t.y) == [0, 1, 2, 1, 0]


def test_polars_frame_gives_the_same_table_as_pandas(tmp_path):
    pl = pytest.importorskip("polars")
    rng = np.random.default_rng(2)
    rows = {"sample_id": [f"s{i}" for i in range(5)], "label": [0, 1, 1, 0, 1],
            "emb_img": [rng.standard_normal(3).tolist() if i != 2 else None for i in range(5)],
            "emb_ehr": [rng.standard_normal(2).tolist() if i != 4 else None for i in range(5)]}
    a = read_embeddings(write_embeddings(str(tmp_path / "pd"), pd.DataFrame(rows)))
    b = read_embeddings(write_embeddings(str(tmp_path / "pl"), pl.DataFrame(rows)))
    assert b.modalities == ["img", "ehr"] and b.mask.tolist() == a.mask.tolist()
    assert b.mask[:, 0].tolist() == [True, True, False, True, True]
    for m in ("img", "ehr"):
        np.testing.assert_array_equal(b.x[m], a.x[m])
    np.testing.assert_array_equal(b.y, [0, 1, 1, 0, 1])


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(ids=["a", "a", "b", "c", "d", "e"]), "more than once"),
    (lambda a: a["emb"].pop("text"), "at least 2 modalities"),
    (lambda a: a["emb"].update(ct=np.ones((5, 4))), r"shape \(N, d\)"),
    (lambda a: a.update(y=np.array([0, 1, np.nan, 0, 1, 0])), "have no label"),
    (lambda a: a.update(y=np.array(["x", "y", "x", "y", "x", "y"])), "numeric"),
    (lambda a: a.update(y=np.array([0, 1, 2, 0, 1, 0]), task="binary"), "0/1"),
    (lambda a: a.update(masks={"ct": np.zeros(6, bool), "text": np.zeros(6, bool)}), "no sample has it"),
    (lambda a: a.update(masks={"ct": np.array([1, 0, 0, 0, 0, 0]), "text": np.array([0, 1, 1, 1, 1, 0])}),
     "no modality at all"),
    (lambda a: a["emb"]["ct"].__setitem__((0, 1), np.inf), "NaN/inf"),
    (lambda a: a.update(masks={"pet": np.ones(6, bool)}), "no embeddings"),
    (lambda a: a.update(split=["train", "val", "train", "train", "train", "test"]), "split"),
])
def test_bad_input_fails_with_a_clear_error_and_writes_nothing(tmp_path, change, message):
    emb, _ = _arrays()
    args = {"emb": emb, "ids": [f"p{i}" for i in range(6)], "y": np.array([0, 1, 0, 1, 0, 1.0]), "masks": None,
            "task": None, "split": None}
    change(args)
    with pytest.raises(TableError, match=message):
        write_embeddings(str(tmp_path / "e"), args["emb"], args["ids"], args["y"], masks=args["masks"],
                         task=args["task"], split=args["split"])
    assert not (tmp_path / "e").exists()


def test_existing_table_is_kept_unless_overwrite(tmp_path):
    emb, _ = _arrays()
    out = str(tmp_path / "e")
    write_embeddings(out, emb, [f"p{i}" for i in range(6)], np.zeros(6))
    with pytest.raises(TableError, match="overwrite"):
        write_embeddings(out, emb, [f"q{i}" for i in range(6)], np.zeros(6))
    assert read_embeddings(out).sample_id[0] == "p0"
    write_embeddings(out, emb, [f"q{i}" for i in range(6)], np.zeros(6), overwrite=True)
    assert read_embeddings(out).sample_id[0] == "q0"


def test_unlabelled_table_for_inference(tmp_path):
    emb, _ = _arrays()
    t = read_embeddings(write_embeddings(str(tmp_path / "e"), emb, [f"p{i}" for i in range(6)]))
    assert t.label_columns == [] and np.isnan(t.y).all()


def test_import_csv_parquet_and_npz_give_the_same_table(tmp_path):
    rng = np.random.default_rng(2)
    n = 8
    a, b = rng.standard_normal((n, 3)), rng.standard_normal((n, 2))
    b[4] = np.nan
    ids = np.array([f"id{i:02d}" for i in range(n)])
    y = rng.integers(0, 2, n).astype(float)
    wide = pd.DataFrame({"sample_id": ids, "label": y, "sex": ["F", "M"] * 4})
    for j in range(3):
        wide[f"emb_a_{j}"] = a[:, j]
    for j in range(2):
        wide[f"emb_b_{j}"] = b[:, j]
    wide.to_csv(tmp_path / "in.csv", index=False)
    lists = pd.DataFrame({"sample_id": ids, "label": y, "sex": ["F", "M"] * 4, "emb_a": list(a),
                          "emb_b": [None if np.isnan(r).all() else r for r in b]})
    lists.to_parquet(tmp_path / "in.parquet")
    np.savez(tmp_path / "in.npz", sample_id=ids, label=y, sex=np.array(["F", "M"] * 4), emb_a=a, emb_b=b)
    tables = []
    for name in ("in.csv", "in.parquet", "in.npz"):
        s = import_table(str(tmp_path / name), str(tmp_path / f"out_{name}"), task="binary")
        assert s["samples"] == n and s["present"] == {"a": 8, "b": 7}
        tables.append(read_embeddings(s["table"]))
    for t in tables[1:]:
        assert list(t.sample_id) == list(tables[0].sample_id)
        np.testing.assert_allclose(t.x["a"], tables[0].x["a"])
        np.testing.assert_array_equal(t.mask, tables[0].mask)
        assert list(t.groups["sex"]) == list(tables[0].groups["sex"])


def test_import_rejects_partial_wide_rows_and_unknown_types(tmp_path):
    df = pd.DataFrame({"sample_id": ["a", "b"], "label": [0, 1], "emb_x_0": [1.0, np.nan], "emb_x_1": [2.0, 3.0],
                       "emb_y_0": [1.0, 2.0]})
    df.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(TableError, match="some but not all"):
        import_table(str(tmp_path / "bad.csv"), str(tmp_path / "o"))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(TableError, match="unsupported"):
        import_table(str(tmp_path / "x.json"), str(tmp_path / "o"))


def test_cli_import(tmp_path, capsys):
    from raypipe.cli import main

    emb, _ = _arrays()
    np.savez(tmp_path / "in.npz", sample_id=np.array([f"p{i}" for i in range(6)]), label=np.arange(6) % 2,
             emb_ct=emb["ct"], emb_text=emb["text"])
    rc = main(["import", "--input", str(tmp_path / "in.npz"), "--out-dir", str(tmp_path / "run")])
    assert rc == 0
    t = read_embeddings(str(tmp_path / "run" / "embeddings"))  # where train reads by default
    assert t.shapes == {"ct": (4,), "text": (3, 2)}
    rc = main(["import", "--input", str(tmp_path / "in.npz"), "--out-dir", str(tmp_path / "run")])
    assert rc == 1 and "overwrite" in capsys.readouterr().err


def test_a_large_table_is_written_in_row_groups_of_about_64_mb(tmp_path):
    """17,000 rows of two 512-d float32 embeddings (~4.1 KB a row, ~70 MB): two row groups, each at most
    64 MiB of embedding values, read back complete and in id order."""
    n, dim = 17000, 512
    rng = np.random.default_rng(1)
    emb = {m: rng.standard_normal((n, dim), dtype=np.float32) for m in ("ct", "text")}
    ids = [f"s{i:05d}" for i in range(n)][::-1]
    out = write_embeddings(str(tmp_path / "e"), emb, ids, np.zeros(n))
    md = pq.ParquetFile(tmp_path / "e" / "part-00000.parquet").metadata
    sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
    assert len(sizes) == 2 and sum(sizes) == n
    assert sizes[0] * 2 * dim * 4 <= 64 * 1024**2 < (sizes[0] + 1) * (2 * dim * 4 + 64)  # full groups: ~64 MiB
    t = read_embeddings(out)
    assert list(t.sample_id) == sorted(ids)
    for m in emb:
        np.testing.assert_array_equal(t.x[m], emb[m][::-1])


def test_default_label_setting_finds_the_labels_of_a_multilabel_table(tmp_path):
    """(N, L) labels are written as label_0 .. label_{L-1}; ingest.label_columns left at its default ['label']
    (what compare/tune/train/auto pass) reads them instead of failing."""
    rng = np.random.default_rng(3)
    emb = {"a": rng.normal(size=(8, 4)), "b": rng.normal(size=(8, 3))}
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1], [1, 1], [0, 0]], float)
    out = write_embeddings(str(tmp_path / "e"), emb, [f"p{i}" for i in range(8)], y, task="multilabel",
                           groups={"hospital_site": ["x"] * 8})
    t = read_embeddings(out, ["label"])
    assert t.label_columns == ["label_0", "label_1"]
    np.testing.assert_array_equal(t.y, y)
    # a table written elsewhere with a label-like group column: only the numbered label_<n> are taken
    other = tmp_path / "other"
    other.mkdir()
    t2 = pq.read_table(out)
    pq.write_table(t2.append_column("label_site", pa.array(["x"] * t2.num_rows)), other / "part-00000.parquet")
    assert read_embeddings(str(other), ["label"]).label_columns == ["label_0", "label_1"]
    # a label name that is not there still fails, naming only the label-like columns (not the user's others)
    with pytest.raises(ValueError, match=r"\['outcome'\].*label_0") as err:
        read_embeddings(out, ["outcome"])
    assert "hospital_site" not in str(err.value)

"""Embeddings table -> arrays: masks from the table, nulls never become data, tasks inferred."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.schema import embeddings_schema
from raypipe.train.tables import fixed_list_to_numpy, infer_task, read_embeddings


def _write(tmp_path, n=6):
    rng = np.random.default_rng(0)
    schema = embeddings_schema({"ct": (4,), "ehr": (3, 2)}, ["label"], ["site"], spec={"note": "t"})
    ct = [rng.standard_normal(4).astype(np.float32).tolist() if i % 3 else None for i in range(n)]
    ehr = [rng.standard_normal(6).astype(np.float32).tolist() for i in range(n)]
    ids = [f"s{n - i:02d}" for i in range(n)]  # written in reverse id order
    table = pa.table({
        "sample_id": ids, "label": [float(i % 2) for i in range(n)], "site": ["a", "b"] * (n // 2),
        "emb_ct": ct, "mask_ct": [c is not None for c in ct], "emb_ehr": ehr, "mask_ehr": [True] * n,
    }, schema=schema)
    pq.write_table(table, tmp_path / "part-0.parquet")
    return ids, ct, ehr


def test_read_embeddings_sorted_masks_and_shapes(tmp_path):
    ids, ct, ehr = _write(tmp_path)
    t = read_embeddings(str(tmp_path))
    assert list(t.sample_id) == sorted(ids)
    assert t.modalities == ["ct", "ehr"] and t.shapes == {"ct": (4,), "ehr": (3, 2)}
    assert t.x["ehr"].shape == (6, 3, 2)
    order = np.argsort(ids)
    expected_mask = np.array([c is not None for c in ct])[order]
    assert (t.mask[:, 0] == expected_mask).all() and t.mask[:, 1].all()
    assert (t.x["ct"][~expected_mask] == 0).all()
    first_present = order[expected_mask][0]
    np.testing.assert_allclose(t.x["ct"][expected_mask][0], ct[first_present])
    assert set(t.groups) == {"site"} and t.label_columns == ["label"]
    assert t.take(np.array([0, 1])).x["ct"].shape == (2, 4)


def test_fixed_list_nulls_in_sliced_arrays():
    arr = pa.array([[1.0, 2.0], None, [5.0, 6.0], [7.0, 8.0]], type=pa.list_(pa.float32(), 2)).slice(1)
    vals, valid = fixed_list_to_numpy(arr, 2)
    assert valid.tolist() == [False, True, True]
    np.testing.assert_array_equal(vals, [[0, 0], [5, 6], [7, 8]])


@pytest.mark.parametrize("y,task,k", [
    (np.array([0.0, 1, 1, 0]), "binary", 2),
    (np.array([0.0, 2, 1, 3]), "multiclass", 4),
    (np.array([0.3, 2.5, -1.0, 7.1]), "regression", 1),
    (np.array([[0.0, 1], [1, 1]]), "multilabel", 2),
])
def test_infer_task(y, task, k):
    assert infer_task(y) == (task, k)


def test_missing_table_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="raypipe embed"):
        read_embeddings(str(tmp_path / "nope"))


def test_an_unlabelled_table_is_refused_with_a_clear_message():
    from raypipe.train.tables import infer_task

    with pytest.raises(ValueError, match="no labels.*raypipe infer"):
        infer_task(np.full(5, np.nan))


def test_train_run_name_changes_with_the_config_not_with_a_rerun():
    from raypipe.config import load_config
    from raypipe.train.trainer import train_run_name

    meta = {"method": "omnifuse", "train_config": {"hidden_dim": 16}, "seed": 0, "var_y": 1.0}
    ids = {"train": {"b", "a"}, "val": {"c"}}
    cfg = load_config(None, ["run.out_dir=/tmp/x"])
    a = train_run_name(cfg, meta, ids)
    assert a == train_run_name(cfg, dict(meta), {"train": {"a", "b"}, "val": {"c"}})  # same command resumes
    assert a.startswith(f"{cfg.run.name}-omnifuse-")
    assert a != train_run_name(cfg, {**meta, "train_config": {"hidden_dim": 32}}, ids)  # new config: new run
    assert a != train_run_name(cfg, meta, {"train": {"a"}, "val": {"b", "c"}})  # new split: new run


def test_regression_label_variance_comes_from_the_fit_rows_only(tmp_path):
    """model_meta's var_y (regression confidence scale) must not see test labels: hand-worked,
    labels (1, 3) on the fit rows have population variance 1; with the far test labels it is ~4,000."""
    from raypipe.config import load_config
    from raypipe.train.trainer import model_meta

    _write(tmp_path, n=4)
    t = read_embeddings(str(tmp_path))
    t.y[:] = np.array([[1.0], [3.0], [100.0], [200.0]]).reshape(t.y.shape)
    fit = np.array([True, True, False, False])
    cfg = load_config(None)
    assert model_meta(cfg, t, "regression", 1, fit_rows=fit)["var_y"] == pytest.approx(1.0)
    assert model_meta(cfg, t, "regression", 1)["var_y"] > 1000  # without fit_rows: every row

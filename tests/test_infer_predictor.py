"""The predictor actor's code without Ray: large Arrow batches in, model-sized chunks, same predictions."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


@pytest.fixture(scope="module")
def run_and_table(tmp_path_factory):
    import torch

    from raypipe.config import TrainConfig
    from raypipe.synth.embeddings import write_truth_embeddings
    from raypipe.synth.latent import generate_truth
    from raypipe.train.tables import read_embeddings
    from raypipe.train.trainer import META_FILE, MODEL_FILE, build_from_meta

    root = tmp_path_factory.mktemp("infer")
    emb = write_truth_embeddings(generate_truth(n=300, seed=3), str(root / "emb"), dim=8)
    table = read_embeddings(emb)
    meta = {"method": "omnifuse", "modalities": table.modalities,
            "shapes": {m: list(s) for m, s in table.shapes.items()}, "task": "binary", "n_outputs": 2,
            "label_columns": ["label"], "embedding_spec": table.spec,
            "train_config": TrainConfig(hidden_dim=8, omnifuse={"depth": 2}).model_dump(mode="json"), "seed": 0}
    torch.manual_seed(0)
    method = build_from_meta(meta)  # seeded random weights: predictions need no training to be comparable
    run = root / "run"
    run.mkdir()
    torch.save(method.state_dict(), run / MODEL_FILE)
    (run / META_FILE).write_text(json.dumps(meta))
    files = sorted(f for f in os.listdir(emb) if f.endswith(".parquet"))
    arrow = pa.concat_tables([pq.read_table(os.path.join(emb, f)) for f in files])
    return str(run), arrow, table


def test_large_batches_in_model_sized_chunks_predict_as_one_model_call(run_and_table):
    from raypipe.infer.pipeline import Predictor

    run, arrow, _ = run_and_table
    whole = Predictor(run, batch_size=10_000)(arrow)  # one model call over all rows
    chunked = Predictor(run, batch_size=7)(arrow)  # 43 model calls, the last one of 6 rows
    assert chunked.num_rows == arrow.num_rows
    assert chunked.column("sample_id").to_pylist() == arrow.column("sample_id").to_pylist()
    np.testing.assert_allclose(np.stack(chunked.column("probabilities").to_numpy(zero_copy_only=False)),
                               np.stack(whole.column("probabilities").to_numpy(zero_copy_only=False)), atol=1e-5)
    assert chunked.column("prediction").to_pylist() == whole.column("prediction").to_pylist()


def test_arrow_batches_give_the_numpy_loops_predictions(run_and_table):
    """Absent modalities (null embeddings) reach the model as zeros with the mask off, as in training."""
    from raypipe.infer.pipeline import Predictor
    from raypipe.train import loop
    from raypipe.train.trainer import load_trained

    run, arrow, table = run_and_table
    assert not table.mask.all()  # the synthetic cohort has absent modalities
    order = np.argsort(arrow.column("sample_id").to_numpy(zero_copy_only=False))
    got = Predictor(run, batch_size=64)(arrow.take(pa.array(order[::-1])).slice(5, 200))  # sliced: an offset
    method, meta = load_trained(run)
    # the model's inputs built row by row from Python lists: an absent embedding is zeros, mask off
    sub = arrow.take(pa.array(order[::-1])).slice(5, 200)
    x, mask = {}, []
    for m in table.modalities:
        vals = sub.column(f"emb_{m}").to_pylist()
        present = [v is not None and bool(f) for v, f in zip(vals, sub.column(f"mask_{m}").to_pylist())]
        x[m] = np.array([v if p else [0.0] * 8 for v, p in zip(vals, present)], np.float32)
        mask.append(present)
    want = loop.make_predict_fn(method, "binary")(x, np.array(mask).T)
    np.testing.assert_allclose(np.stack(got.column("probabilities").to_numpy(zero_copy_only=False)),
                               want["probabilities"], atol=1e-5)


def test_values_in_place_drops_only_the_values_nulls_that_lie_in_null_embeddings(tmp_path):
    """Read back from Parquet, an absent embedding's values are nulls too; without that bitmap the rows are
    the same lists (the bytes under a null list are never read as data). A null element inside a present
    embedding keeps the column as it was (train.tables then turns it into NaN, as before)."""
    from raypipe.infer.pipeline import values_in_place

    lists = [[1.0, 2.0, 3.0], None, [4.0, 5.0, 6.0], None, [7.0, 8.0, 9.0]]
    t = pa.table({"emb_a": pa.array(lists, pa.list_(pa.float32(), 3)), "n": pa.array(range(5))})
    pq.write_table(t, tmp_path / "t.parquet")
    col = pq.read_table(tmp_path / "t.parquet").column("emb_a")
    assert col.chunk(0).values.null_count == 6  # what the reader makes of the two absent embeddings
    for c in (col, col.slice(1), col.chunk(0).slice(1, 3)):  # chunked, sliced: offsets into the values
        got = values_in_place(c)
        assert got.to_pylist() == c.to_pylist() and got.type == c.type
        chunks = got.chunks if isinstance(got, pa.ChunkedArray) else [got]
        assert all(ch.values.null_count == 0 for ch in chunks)
    # review: another tool's table may name its value field otherwise or declare it non-nullable; the column
    # must keep that exact type (a chunked column of mixed types, or set_column on the table, fails otherwise)
    strict = pa.list_(pa.field("element", pa.float32(), nullable=False), 3)
    pq.write_table(pa.table({"emb_a": pa.array(lists, strict)}), tmp_path / "s.parquet")
    scol = pq.read_table(tmp_path / "s.parquet").column("emb_a")
    got = values_in_place(scol)
    assert got.to_pylist() == lists and got.type.value_field.equals(scol.type.value_field)
    assert not got.type.value_field.nullable and got.type.value_field.name == "element"
    pa.table({"emb_a": scol}).set_column(0, "emb_a", got)  # raised "Field type did not match data type"
    inner = pa.array([[1.0, None, 3.0], None], pa.list_(pa.float32(), 3))  # a null inside a present embedding
    assert values_in_place(inner) is inner
    ints = pa.array([1, None, 3])
    assert values_in_place(ints) is ints


def test_embeddings_datasource_reads_every_row_group_in_order_with_only_the_needed_columns(run_and_table, tmp_path):
    """Two files of several row groups plus an `_errors.parquet` side file: the read tasks (run here
    without a cluster) give the rows of the files in name order, in blocks of at most `rows` rows."""
    from raypipe.infer.pipeline import embeddings_datasource, input_columns

    _, arrow, table = run_and_table
    src = tmp_path / "emb"
    src.mkdir()
    pq.write_table(arrow.slice(0, 180), src / "part-00000.parquet", row_group_size=50)  # groups 50 50 50 30
    pq.write_table(arrow.slice(180), src / "part-00001.parquet", row_group_size=64)  # 64 56
    pq.write_table(pa.table({"source_path": ["x"], "message": ["bad"]}), src / "_errors.parquet")
    cols = input_columns(table.modalities, arrow.schema)
    assert cols == ["sample_id"] + [c for m in table.modalities for c in (f"emb_{m}", f"mask_{m}")]
    tasks = embeddings_datasource(str(src), cols, rows=20).get_read_tasks(1)
    assert [t.metadata.num_rows for t in tasks] == [50, 50, 50, 30, 64, 56]
    blocks = [b for t in tasks for b in t()]
    assert [b.num_rows for b in blocks] == [20, 20, 10] * 3 + [20, 10] + [20, 20, 20, 4] + [20, 20, 16]
    got = pa.concat_tables(blocks)
    assert got.column_names == cols and got.equals(arrow.select(cols))


def test_row_group_predictor_reads_its_units_and_predicts_as_the_predictor_on_the_table(run_and_table, tmp_path):
    """The actor that reads its own input: units of two files' row groups, in the order given, each read
    in batches of `rows` rows; the predictions are the plain Predictor's on the same rows."""
    import pyarrow.fs as pafs

    from raypipe.infer.pipeline import Predictor, RowGroupPredictor, input_columns, row_group_units

    run, arrow, table = run_and_table
    src = tmp_path / "emb"
    src.mkdir()
    pq.write_table(arrow.slice(0, 180), src / "part-00000.parquet", row_group_size=50)  # groups 50 50 50 30
    pq.write_table(arrow.slice(180), src / "part-00001.parquet", row_group_size=64)  # 64 56
    cols = input_columns(table.modalities, arrow.schema)
    units, _, fs = row_group_units(str(src), cols)
    assert [(os.path.basename(p), g, n) for p, g, n, _ in units] == [
        ("part-00000.parquet", 0, 50), ("part-00000.parquet", 1, 50), ("part-00000.parquet", 2, 50),
        ("part-00000.parquet", 3, 30), ("part-00001.parquet", 0, 64), ("part-00001.parquet", 1, 56)]
    pred = RowGroupPredictor(run, filesystem=pafs.LocalFileSystem(), columns=cols, rows=20, batch_size=7)
    order = [4, 0, 3]  # the units a call gets: any of them, in the order given
    outs = list(pred({"path": np.array([units[i][0] for i in order], object),
                      "row_group": np.array([units[i][1] for i in order])}))
    assert [t.num_rows for t in outs] == [20, 20, 20, 4] + [20, 20, 10] + [20, 10]
    starts = [180, 0, 150]
    want = Predictor(run, batch_size=7)(pa.concat_tables([arrow.slice(a, units[i][2]) for a, i in zip(starts, order)]))
    got = pa.concat_tables(outs)
    assert got.column("sample_id").to_pylist() == want.column("sample_id").to_pylist()
    np.testing.assert_allclose(np.stack(got.column("probabilities").to_numpy(zero_copy_only=False)),
                               np.stack(want.column("probabilities").to_numpy(zero_copy_only=False)), atol=1e-6)


def test_actors_read_their_row_groups_on_a_cpu_pool_when_each_group_fits_a_block():
    from raypipe.infer.pipeline import reads_in_actors

    units = [("a", 0, 100, 60 << 20), ("a", 1, 40, 20 << 20)]
    assert reads_in_actors(units, 0, 128 << 20)
    assert reads_in_actors(units, 0, None)  # Ray Data makes one block per read task: the same split
    assert not reads_in_actors(units, 0, 32 << 20)  # a group larger than a block: read tasks, several blocks
    assert not reads_in_actors(units, 1, 128 << 20)  # GPU actors are fed by read tasks on the CPUs
    assert reads_in_actors([("a", 0, 0, 0)], 0, 128 << 20)


def test_run_infer_reads_a_table_of_many_row_groups_in_full_with_the_one_group_predictions(
        ray_session, run_and_table, tmp_path):
    """The same rows as one row group and as two files of 37-row groups (9 units), each read by the
    predictor actors, and the one group again through read tasks (Ray Data's block target set below
    the group's size, as for a large group or a GPU pool): every row predicted once, in id order, as
    the trained model predicts the rows of `pq.read_table` in this process (inputs built from Python
    lists, not raypipe's Arrow conversion)."""
    import ray.data

    from raypipe.config import load_config
    from raypipe.infer.pipeline import run_infer
    from raypipe.train import loop
    from raypipe.train.trainer import load_trained

    run, arrow, table = run_and_table
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir(), many.mkdir()
    pq.write_table(arrow, one / "part-00000.parquet")
    pq.write_table(arrow.slice(0, 170), many / "part-00000.parquet", row_group_size=37)  # 37 x 4 + 22
    pq.write_table(arrow.slice(170), many / "part-00001.parquet", row_group_size=37)  # 37 x 3 + 19
    assert [pq.ParquetFile(one / "part-00000.parquet").metadata.num_row_groups,
            pq.ParquetFile(many / "part-00000.parquet").metadata.num_row_groups,
            pq.ParquetFile(many / "part-00001.parquet").metadata.num_row_groups] == [1, 5, 4]

    # expected: the model in this process on the rows as pyarrow reads them
    rows = pq.read_table(one).sort_by("sample_id")
    x, mask = {}, []
    for m in table.modalities:
        vals = rows.column(f"emb_{m}").to_pylist()
        present = [v is not None and bool(f) for v, f in zip(vals, rows.column(f"mask_{m}").to_pylist())]
        x[m] = np.array([v if p else [0.0] * 8 for v, p in zip(vals, present)], np.float32)
        mask.append(present)
    method, _ = load_trained(run)
    want = loop.make_predict_fn(method, "binary")(x, np.array(mask).T)["probabilities"]

    from raypipe.infer.pipeline import input_columns, reads_in_actors, row_group_units

    units = row_group_units(str(one), input_columns(table.modalities, arrow.schema))[0]
    assert not reads_in_actors(units, 0, 4096)  # "tasks" below: the read-task path
    got = {}
    ctx = ray.data.DataContext.get_current()
    block_bytes = ctx.target_max_block_size
    for name, src, target in (("one", one, block_bytes), ("many", many, block_bytes), ("tasks", one, 4096)):
        cfg = load_config(None, [f"run.out_dir={tmp_path / name}_run", f"infer.checkpoint={run}", f"infer.input={src}",
                                 f"infer.out={tmp_path / name}_pred", "ray.progress_bars=false", "infer.pool_size=2",
                                 "infer.batch_size=16", "infer.rows_per_actor_batch=40"])
        ctx.target_max_block_size = target
        try:
            res = run_infer(cfg)
        finally:
            ctx.target_max_block_size = block_bytes
        pred = pq.read_table(tmp_path / f"{name}_pred")
        assert res["rows"] == pred.num_rows == arrow.num_rows
        assert pred.column("sample_id").to_pylist() == rows.column("sample_id").to_pylist()  # each once, in order
        got[name] = np.stack(pred.column("probabilities").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got[name], want, atol=1e-5)
        assert pred.column("prediction").to_pylist() == list(want.argmax(1).astype(float))
    np.testing.assert_allclose(got["many"], got["one"], atol=1e-6)
    np.testing.assert_allclose(got["tasks"], got["one"], atol=1e-6)


def test_an_empty_input_table_is_a_clear_error(ray_session, run_and_table, tmp_path):
    from raypipe.config import load_config
    from raypipe.infer.pipeline import run_infer

    run, arrow, _ = run_and_table
    (tmp_path / "empty").mkdir()
    pq.write_table(arrow.slice(0, 0), tmp_path / "empty" / "part-00000.parquet")
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'r'}", f"infer.checkpoint={run}",
                             f"infer.input={tmp_path / 'empty'}", f"infer.out={tmp_path / 'pred'}",
                             "ray.progress_bars=false"])
    with pytest.raises(ValueError, match="no rows: nothing to predict"):
        run_infer(cfg)
    assert not (tmp_path / "pred").exists()

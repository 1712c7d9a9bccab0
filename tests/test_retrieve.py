"""Cross-modal retrieval: the InfoNCE loss and the metrics by hand, then fit + query on Ray."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from raypipe.retrieve.align import (CrossModalAligner, chance_metrics, exact_search, parse_pairs, ranks_from_hits,
                                    retrieval_metrics, symmetric_info_nce, true_ranks)


# ----------------------------------------------------------------------------- InfoNCE by hand
def test_symmetric_info_nce_hand_worked_2x2():
    # a = (e1, e2), b = (e1, (0.6, 0.8)); logits a.b^T = [[1, 0.6], [0, 0.8]]
    # a->b rows:    -log softmax([1, 0.6])[0]   = log(1 + e^-0.4)
    #               -log softmax([0, 0.8])[1]   = log(1 + e^-0.8)
    # b->a (columns): -log softmax([1, 0])[0]   = log(1 + e^-1)
    #               -log softmax([0.6, 0.8])[1] = log(1 + e^-0.2)
    # loss = 1/2 (mean of the a->b pair + mean of the b->a pair) = their sum / 4
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    by_hand = (math.log1p(math.exp(-0.4)) + math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-1.0))
               + math.log1p(math.exp(-0.2))) / 4
    assert float(symmetric_info_nce(a, b, 1.0)) == pytest.approx(by_hand, abs=1e-6)
    # logit scale 2 (temperature 0.5) doubles every logit difference
    by_hand2 = (math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-1.6)) + math.log1p(math.exp(-2.0))
                + math.log1p(math.exp(-0.4))) / 4
    assert float(symmetric_info_nce(a, b, torch.tensor(2.0))) == pytest.approx(by_hand2, abs=1e-6)
    # the logits are not symmetric, the loss is: swapping the roles of a and b gives the same value
    assert float(symmetric_info_nce(b, a, 1.0)) == pytest.approx(by_hand, abs=1e-6)


def test_aligner_loss_uses_only_rows_with_both_modalities_and_learns_its_temperature():
    torch.manual_seed(0)
    model = CrossModalAligner({"report": 4, "ct": 3}, [("report", "ct")], dim=2, hidden=5, temperature=0.5)
    assert float(model.logit_scale().detach()) == pytest.approx(2.0, rel=1e-6)
    x = {"report": torch.randn(3, 4), "ct": torch.randn(3, 3)}
    present = {"report": torch.tensor([True, True, True]), "ct": torch.tensor([True, False, True])}
    loss, _ = model.loss(x, present)
    keep = torch.tensor([0, 2])
    manual = symmetric_info_nce(model.project("report", x["report"][keep]), model.project("ct", x["ct"][keep]),
                                model.logit_scale())
    assert float(loss.detach()) == pytest.approx(float(manual.detach()), abs=1e-6)
    loss.backward()
    assert model.log_scale.grad is not None and float(model.log_scale.grad) != 0.0
    # a batch with a single complete row has no negatives: the loss is zero (and still backpropagates)
    one = {"report": torch.tensor([True, True, True]), "ct": torch.tensor([False, False, True])}
    lz, stats = model.loss(x, one)
    assert float(lz.detach()) == 0.0 and stats == {}
    lz.backward()


def test_parse_pairs():
    assert parse_pairs(["report:ct", "ct:report", ("pet", "ct")]) == [("report", "ct"), ("pet", "ct")]
    for bad in (["report"], ["ct:ct"], ["a:b:c"], []):
        with pytest.raises(ValueError):
            parse_pairs(bad)


# ----------------------------------------------------------------------------- metrics by hand
def test_retrieval_metrics_hand_worked_ranking():
    ranks = np.array([1, 3, 12, 2, 7])
    m = retrieval_metrics(ranks)
    assert m["recall@1"] == pytest.approx(1 / 5)
    assert m["recall@5"] == pytest.approx(3 / 5)  # ranks 1, 3, 2
    assert m["recall@10"] == pytest.approx(4 / 5)  # and 7
    assert m["median_rank"] == 3
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12 + 1 / 2 + 1 / 7) / 5)
    # a query whose partner was not retrieved (0): a miss everywhere, 0 in the MRR, no median
    m0 = retrieval_metrics(np.array([1, 0]))
    assert m0["recall@10"] == 0.5 and m0["mrr"] == 0.5 and math.isnan(m0["median_rank"])
    # chance for a gallery of 4: R@1 = 1/4, median rank 2.5, MRR = (1 + 1/2 + 1/3 + 1/4) / 4
    c = chance_metrics(4)
    assert c["recall@1"] == 0.25 and c["recall@5"] == 1.0 and c["median_rank"] == 2.5
    assert c["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)


def test_ranks_and_exact_search_hand_worked():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], np.float32)
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    # scores q0: [1, 0, .6, -1]; q1: [0, 1, .8, 0]; q2: [.6, .8, 1, -.6]
    # partners 2, 0, 2: q0's partner (.6) ranks 2; q1's (0) ties with gallery 3 at 0 -> rank 4 (ties count
    # against the query); q2's (1) is first
    assert true_ranks(queries, gallery, np.array([2, 0, 2])).tolist() == [2, 4, 1]
    idx, sc = exact_search(queries, gallery, 2)
    assert idx.tolist() == [[0, 2], [1, 2], [2, 1]]
    np.testing.assert_allclose(sc, [[1, 0.6], [1, 0.8], [1, 0.8]], atol=1e-6)
    assert ranks_from_hits(idx, np.array([2, 0, 2])).tolist() == [2, 0, 1]


def test_exact_search_blocked_over_the_gallery_hand_worked_and_against_a_full_sort():
    # gallery blocks of 2 rows: {0, 1}, {2, 3}, {4, 5}; rows 1 and 4 are equal (a tie across blocks)
    gallery = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [-1.0, 0.0], [1.0, 0.0], [0.8, 0.6]], np.float32)
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    # q0 scores [0, 1, .6, -1, 1, .8] -> rows 1, 4 (tie: lower row first), 5; q1 [1, 0, .8, 0, 0, .6] -> 0, 2, 5
    idx, sc = exact_search(queries, gallery, 3, chunk=1, gallery_chunk=2)
    assert idx.tolist() == [[1, 4, 5], [0, 2, 5]]
    np.testing.assert_allclose(sc, [[1, 1, 0.8], [1, 0.8, 0.6]], atol=1e-6)
    assert exact_search(queries, gallery, 1, gallery_chunk=2)[0].tolist() == [[1], [0]]
    # random data: blocks of 37 rows (the last one short) give a full stable sort's top 10
    rng = np.random.default_rng(0)
    g = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((23, 16)).astype(np.float32)
    full = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :10]
    assert exact_search(q, g, 10, chunk=5, gallery_chunk=37)[0].tolist() == full.tolist()
    assert exact_search(q, g, 10)[0].tolist() == full.tolist()


def test_build_hnsw_in_slices_adds_every_row_with_its_row_number():
    from raypipe.retrieve.pipeline import build_hnsw, hnsw_search

    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    seen = []
    index = build_hnsw(x, 8, 50, 0, threads=1, batch=7, progress=seen.append)
    assert seen == [7, 14, 21, 28, 30]
    assert sorted(index.get_ids_list()) == list(range(30))
    idx, sc = hnsw_search(index, x, 1, 50, threads=1)
    assert idx[:, 0].tolist() == list(range(30))  # a unit vector's best inner product is with itself
    np.testing.assert_allclose(sc[:, 0], 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- fit + query on Ray
@pytest.fixture(scope="module")
def latent2_embeddings(tmp_path_factory):
    """v2 cohort (the report reads the CT), 600 patients, 32-d embeddings, 20% held out."""
    from raypipe.synth.embeddings import write_truth_embeddings
    from raypipe.synth.latent2 import generate_truth

    out = str(tmp_path_factory.mktemp("retrieve") / "embeddings")
    return write_truth_embeddings(generate_truth(n=600, seed=3), out, dim=32, seed=7)


def test_retrieve_fit_and_query_report_to_ct(ray_session, latent2_embeddings, tmp_path, one_torch_thread):
    import pyarrow.parquet as pq

    from raypipe.config import load_config
    from raypipe.retrieve.pipeline import run_retrieve

    cfg = load_config(None, [f"run.out_dir={tmp_path}", f"retrieve.input={latent2_embeddings}",
                             "retrieve.epochs=12", "retrieve.batch_size=128", "retrieve.pool_size=1",
                             "ray.quiet=false"])
    fit = run_retrieve(cfg, "fit")
    assert fit["ok"] and fit["n_train"] > 300
    model_dir = fit["model_dir"]
    assert {"aligner.pt", "aligner_meta.json", "split.parquet", "history.json"} <= set(os.listdir(model_dir))

    res = run_retrieve(cfg, "query")
    doc = json.load(open(os.path.join(res["out"], "metrics.json")))
    chance = doc["chance"]["recall@10"]
    exact, index = doc["exact"], doc["index_metrics"]
    # report -> CT is far above chance (the report describes the CT's own findings)
    assert exact["recall@10"] >= 5 * chance, doc
    assert exact["mrr"] >= 5 * doc["chance"]["mrr"], doc
    assert exact["median_rank"] < doc["chance"]["median_rank"] / 3, doc
    # the HNSW index finds what exact search finds
    assert abs(index["recall@10"] - exact["recall@10"]) <= 0.01, doc
    # only held-out queries: none of them was a training or validation row of the fit
    split = pq.read_table(os.path.join(model_dir, "split.parquet")).to_pandas().set_index("sample_id")["split"]
    hits = pq.read_table(os.path.join(res["out"], "hits.parquet"))
    assert hits.column_names == ["query_id", "rank", "hit_id", "score"]
    queries = set(hits.column("query_id").to_pylist())
    assert len(queries) == doc["n_queries"] and set(split[list(queries)]) == {"test"}
    assert hits.num_rows == doc["n_queries"] * doc["k"]
    # scores descend within a query
    df = hits.to_pandas()
    assert (df.groupby("query_id")["score"].apply(lambda s: bool(np.all(np.diff(s.to_numpy()) <= 1e-6)))).all()
    page = open(os.path.join(res["out"], "report.html")).read()
    assert "recall@10" in page and "<script" not in page and "http" not in page.replace(
        "http://www.w3.org/2000/svg", "")
    assert not [f for f in os.listdir(res["out"]) if ".tmp" in f]

"""The survey's hybrid, graph-based and generative (MVAE) fusion families: their distinctive parts,
training through the shared loop with missing modalities, and DDP under Ray Train."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from raypipe.config import TrainConfig
from raypipe.fusion.base import ModalitySpec
from raypipe.fusion.graph import GraphFusion, masked_softmax
from raypipe.fusion.hybrid import HybridFusion
from raypipe.fusion.mvae import MVAE, product_of_experts
from raypipe.fusion.registry import REGISTRY, build_method, list_methods
from raypipe.train import loop
from raypipe.train.metrics import compute_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW = ("mvae", "hybrid", "graph")
SPECS = [ModalitySpec("a", (6,)), ModalitySpec("b", (6,)), ModalitySpec("c", (4, 3))]


def _x(n, seed=0, specs=SPECS):
    g = torch.Generator().manual_seed(seed)
    return {s.name: torch.randn((n, *s.shape), generator=g) for s in specs}


# ----------------------------------------------------------------------------- registry
def test_the_three_families_are_registered_with_their_metadata():
    assert set(NEW) <= set(REGISTRY)
    assert {i.name: i.fusion_type for i in list_methods() if i.name in NEW} == {
        "mvae": "generative", "hybrid": "hybrid", "graph": "graph"}
    assert {i.name for i in list_methods(fusion_type="graph")} == {"graph"}
    assert MVAE.info.hooks == ("on_epoch_start",)  # the KL annealing; hybrid and graph need none
    # their own knobs come through train.method_args, unknown ones are refused
    assert build_method("mvae", SPECS, "binary", 2, TrainConfig(hidden_dim=8, method_args={"latent_dim": 5})).latent_dim == 5
    assert build_method("hybrid", SPECS, "binary", 2, TrainConfig(hidden_dim=8, method_args={"gate": "constant"})).gate_kind == "constant"
    with pytest.raises(ValueError, match="not accepted"):
        build_method("graph", SPECS, "binary", 2, TrainConfig(method_args={"latent_dim": 5}))


# ----------------------------------------------------------------------------- MVAE
def test_product_of_two_gaussians_matches_the_closed_form():
    # N(1, 1) x N(3, 0.5): precisions 1 and 2 -> precision 3, mean (1*1 + 2*3)/3 = 7/3, variance 1/3
    mu = torch.tensor([[[1.0], [3.0]]])
    logvar = torch.log(torch.tensor([[[1.0], [0.5]]]))
    m, lv = product_of_experts(mu, logvar, torch.tensor([[True, True]]))
    assert m.item() == pytest.approx(7 / 3, abs=1e-6)
    assert lv.exp().item() == pytest.approx(1 / 3, abs=1e-6)
    # with the prior expert N(0, 1) as a third factor: precision 4, mean 7/4, variance 1/4
    mu3 = torch.tensor([[[0.0], [1.0], [3.0]]])
    lv3 = torch.log(torch.tensor([[[1.0], [1.0], [0.5]]]))
    m, lv = product_of_experts(mu3, lv3, torch.tensor([[True, True, True]]))
    assert (m.item(), lv.exp().item()) == (pytest.approx(1.75, abs=1e-6), pytest.approx(0.25, abs=1e-6))
    # an absent expert contributes nothing whatever its values, NaN included
    mu3[0, 2] = float("nan")
    lv3[0, 2] = float("nan")
    m, lv = product_of_experts(mu3, lv3, torch.tensor([[True, True, False]]))
    assert (m.item(), lv.exp().item()) == (pytest.approx(0.5, abs=1e-6), pytest.approx(0.5, abs=1e-6))


def test_dropping_a_modality_removes_exactly_its_experts_factor():
    torch.manual_seed(0)
    model = MVAE(SPECS, "binary", 2, hidden_dim=8, latent_dim=4).eval()
    x = _x(5)
    full = torch.ones(5, 3, dtype=torch.bool)
    mu_e, lv_e = model.expert_parameters(model.encode(x, full))  # (B, 1 + M, Z), prior first
    var_e = lv_e.exp()
    mu_all, lv_all = model.posterior(x, full)
    no_b = full.clone()
    no_b[:, 1] = False
    mu_nb, lv_nb = model.posterior(x, no_b)
    # Gaussian products: precisions add, precision-weighted means add; dropping b subtracts its terms
    prec_all, prec_nb = (-lv_all).exp(), (-lv_nb).exp()
    torch.testing.assert_close(prec_all - prec_nb, 1 / var_e[:, 2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mu_all * prec_all - mu_nb * prec_nb, mu_e[:, 2] / var_e[:, 2], rtol=1e-4, atol=1e-4)
    # one modality left: the prior N(0, 1) times N(mu_a, v_a) = N(mu_a / (1 + v_a), v_a / (1 + v_a))
    only_a = torch.zeros_like(full)
    only_a[:, 0] = True
    mu_a, lv_a = model.posterior(x, only_a)
    torch.testing.assert_close(mu_a, mu_e[:, 1] / (1 + var_e[:, 1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lv_a.exp(), var_e[:, 1] / (1 + var_e[:, 1]), rtol=1e-5, atol=1e-6)
    # no modality at all: the prior itself
    mu_0, lv_0 = model.posterior(x, torch.zeros_like(full))
    assert torch.all(mu_0 == 0) and torch.all(lv_0 == 0)


def test_mvae_decoders_impute_an_absent_modality_from_the_present_one():
    """b is a fixed linear map of a: after training, b decoded from a alone is far closer to b's
    standardised truth than the prior's guess (the training mean, zero); c (noise) is not predictable."""
    torch.manual_seed(0)
    specs = [ModalitySpec("a", (4,)), ModalitySpec("b", (4,)), ModalitySpec("c", (4,))]
    g = torch.Generator().manual_seed(1)
    n = 256
    a = torch.randn(n, 4, generator=g)
    mix = torch.randn(4, 4, generator=g)
    x = {"a": a, "b": a @ mix, "c": torch.randn(n, 4, generator=g)}
    y = (a[:, 0] > 0).float()
    model = MVAE(specs, "binary", 2, hidden_dim=16, latent_dim=8, kl_anneal_epochs=0)
    opt = torch.optim.Adam(model.parameters(), 5e-3)
    full = torch.ones(n, 3, dtype=torch.bool)
    for _ in range(200):
        opt.zero_grad()
        model({"x": x, "mask": full, "y": y}, full_mask=full)["loss"].backward()
        opt.step()
    model.eval()
    only_a = torch.tensor([[True, False, False]]).expand(n, -1)
    imputed = model.impute(x, only_a)
    truth_b = model.encoders["b"].norm.transform(x["b"])
    err = ((imputed["b"] - truth_b) ** 2).mean().item()
    assert err < 0.3 * (truth_b ** 2).mean().item()
    truth_c = model.encoders["c"].norm.transform(x["c"])
    assert ((imputed["c"] - truth_c) ** 2).mean().item() > 0.8 * (truth_c ** 2).mean().item()
    trace = model.predict_with_trace(x, only_a)
    assert torch.equal(trace["imputed_b"], ~only_a[:, 1]) and not trace["imputed_a"].any()
    assert torch.all(trace["weight_b"] == 0) and torch.all(trace["weight_a"] > 0)


def test_mvae_kl_annealing_follows_the_epoch_hook():
    model = MVAE(SPECS, "binary", 2, hidden_dim=8, kl_anneal_epochs=4)
    seen = []
    for epoch in range(6):
        model.on_epoch_start(loop.HookContext(epoch=epoch))
        seen.append(model.kl_weight)
    assert seen == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- hybrid
def _set_head(head, logits):
    """A head (mlp) that outputs the constant ``logits`` whatever its input."""
    with torch.no_grad():
        head[-1].weight.zero_()
        head[-1].bias.copy_(torch.tensor(logits))


def test_hybrid_mixes_the_present_decisions_with_the_gates_weights():
    torch.manual_seed(0)
    model = HybridFusion(SPECS, "binary", 2, hidden_dim=8).eval()
    # gate logits (joint, a, b, c) = log(4, 1, 2, 8) whatever the mask; heads with known p(y=1)
    _set_head(model.gate, [math.log(4), 0.0, math.log(2), math.log(8)])
    _set_head(model.joint, [math.log(3), 0.0])  # p = 0.25
    _set_head(model.heads["a"], [0.0, math.log(3)])  # p = 0.75
    _set_head(model.heads["b"], [0.0, 0.0])  # p = 0.5
    _set_head(model.heads["c"], [0.0, math.log(9)])  # p = 0.9
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = model.predict_with_trace(_x(2), mask)
    # c absent: weights 4/7, 1/7, 2/7 -> 4/7 * 0.25 + 1/7 * 0.75 + 2/7 * 0.5 = 2.75/7
    # all present: 4/15, 1/15, 2/15, 8/15 -> (1 + 0.75 + 1 + 7.2) / 15 = 9.95/15
    torch.testing.assert_close(out["probabilities"][:, 1], torch.tensor([2.75 / 7, 9.95 / 15]))
    torch.testing.assert_close(out["weight_c"], torch.tensor([0.0, 8 / 15]))
    torch.testing.assert_close(out["prob_a"][:, 1], torch.tensor([0.75, 0.75]))


def test_hybrid_weights_depend_on_the_availability_pattern_not_only_by_renormalising():
    """The distinctive part: the gate sees the mask. Dropping c changes the joint : a weight ratio;
    with the mask-blind ablation (gate='constant', one logit per source) the ratio cannot change."""
    patterns = torch.tensor([[True, True, True], [True, True, False], [True, False, True]])
    torch.manual_seed(0)
    seeing = HybridFusion(SPECS, "binary", 2, hidden_dim=8, gate="mask")
    blind = HybridFusion(SPECS, "binary", 2, hidden_dim=8, gate="constant")
    with torch.no_grad():
        blind.gate_logits.copy_(torch.tensor([0.3, -0.5, 1.0, 0.2]))
    for model, varies in ((seeing, True), (blind, False)):
        w = model.combination_weights(patterns)
        assert torch.all(w[1:, :][~torch.cat([torch.ones(2, 1, dtype=torch.bool), patterns[1:]], 1)] == 0)
        ratio = w[:, 0] / w[:, 1]  # joint : a, both present in every pattern
        spread = float((ratio.max() / ratio.min()).detach()) - 1
        assert (spread > 1e-3) if varies else (spread < 1e-6)


# ----------------------------------------------------------------------------- graph
def test_masked_softmax_is_zero_off_the_allowed_entries_and_never_nan():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    allowed = torch.tensor([[True, False, True], [False, False, False]])
    p = masked_softmax(s, allowed, dim=1)
    e1, e3 = math.exp(1), math.exp(3)
    torch.testing.assert_close(p[0], torch.tensor([e1 / (e1 + e3), 0.0, e3 / (e1 + e3)]))
    assert torch.all(p[1] == 0)


def test_graph_attention_is_normalised_over_the_present_nodes_only():
    torch.manual_seed(0)
    model = GraphFusion(SPECS, "binary", 2, hidden_dim=8, layers=2, heads=2).eval()
    mask = torch.tensor([[True, True, True], [True, False, True], [False, True, False]])
    _, w, attention = model.propagate(_x(3), mask)
    for alpha in attention:  # (B, heads, receiver, sender)
        edges = (mask.unsqueeze(2) & mask.unsqueeze(1)).unsqueeze(1).expand_as(alpha)
        assert torch.all(alpha[~edges] == 0)  # no edge reaches or leaves an absent node
        rows = alpha.sum(-1)  # receivers: 1 where present, 0 where absent
        torch.testing.assert_close(rows, mask.unsqueeze(1).expand_as(rows).float())
        assert torch.all(alpha[edges] > 0)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    assert torch.all(w[~mask] == 0)
    assert torch.allclose(w[2], torch.tensor([0.0, 1.0, 0.0]))  # a one-node graph reads out that node


def test_graph_output_ignores_an_absent_modalitys_node_entirely():
    """Re-drawing c's encoder (so e_c(0), the vector an absent c would be filled with, changes) leaves
    the prediction unchanged where c is absent and changes it where c is present."""
    torch.manual_seed(0)
    model = GraphFusion(SPECS, "binary", 2, hidden_dim=8).eval()
    x = _x(4)
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True], [False, True, True]])
    before = model.predict_with_trace(x, mask)["probabilities"]
    with torch.no_grad():
        for p in model.encoders["c"].parameters():
            p.add_(torch.randn_like(p))
    after = model.predict_with_trace(x, mask)["probabilities"]
    torch.testing.assert_close(after[:2], before[:2], rtol=0, atol=0)
    assert (after[2:] - before[2:]).abs().max() > 1e-4


@pytest.mark.parametrize("name", NEW)
def test_a_prediction_does_not_depend_on_the_rest_of_the_batch(name):
    """Inductive, per-sample fusion (no population graph, no batch statistics at inference)."""
    torch.manual_seed(0)
    model = build_method(name, SPECS, "binary", 2, TrainConfig(hidden_dim=8)).eval()
    x = _x(6)
    mask = torch.rand(6, 3, generator=torch.Generator().manual_seed(2)) > 0.4
    mask[:, 0] = True
    together = model.predict_with_trace(x, mask)["probabilities"]
    alone = torch.cat([model.predict_with_trace({m: v[i:i + 1] for m, v in x.items()}, mask[i:i + 1])["probabilities"]
                       for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the shared loop
def _easy_data(n, seed):
    """Two informative modalities (a, c sequence) and a noise one, natural missingness ~30 %."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    s = 2 * y - 1
    x = {"a": (rng.normal(size=(n, 6)) + 1.5 * s[:, None] * np.array([1, 1, 0, 0, 0, 0])).astype(np.float32),
         "b": rng.normal(size=(n, 6)).astype(np.float32),
         "c": (rng.normal(size=(n, 4, 3)) + 0.4 * s[:, None, None]).astype(np.float32)}
    mask = rng.random((n, 3)) > 0.3
    mask[~mask.any(1), 0] = True
    return x, mask, y


@pytest.mark.parametrize("name", NEW)
def test_trains_through_the_shared_loop_and_predicts_with_missing_modalities(name):
    x, mask, y = _easy_data(240, 0)
    xv, mv, yv = _easy_data(120, 1)
    torch.manual_seed(0)
    method = build_method(name, SPECS, "binary", 2, TrainConfig(hidden_dim=16))
    res = loop.fit(method, (x, mask, y), (xv, mv, yv), "binary", epochs=6, batch_size=32, p_drop=0.5, patience=10)
    assert len(res["history"]) == 6 and all(math.isfinite(h["train_loss"]) for h in res["history"])
    predict = loop.make_predict_fn(method, "binary")
    xt, mt, yt = _easy_data(200, 2)
    mt[:100] = [True, False, False]  # only a
    mt[100:] = [False, True, True]  # b (noise) and the sequence c
    out = predict(xt, mt)
    p = out["probabilities"]
    assert p.shape == (200, 2) and np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    assert compute_metrics("binary", yt[:100], p[:100])["auroc"] > 0.75  # learned from a
    assert compute_metrics("binary", yt[100:], p[100:])["auroc"] > 0.75  # and from c when a is missing
    for i, m in enumerate(["a", "b", "c"]):  # reliability weights: zero exactly where a modality is absent
        assert np.all(out[f"weight_{m}"][~mt[:, i]] == 0)


# ----------------------------------------------------------------------------- Ray Train (DDP)
@pytest.mark.ray
@pytest.mark.parametrize("name", [
    "mvae",  # the one with a hook (KL annealing) and per-worker random ELBO subsets: always run
    pytest.param("hybrid", marks=pytest.mark.slow),  # plain forward methods: the shell is method-agnostic
    pytest.param("graph", marks=pytest.mark.slow),
])
def test_trains_under_two_ddp_workers_and_the_run_predicts(ray_session, tmp_path, name):
    """Ray Train V2 with two DDP workers (the same shell as every method), then the saved
    checkpoint predicts with a modality missing."""
    from raypipe.config import load_config
    from raypipe.synth.embeddings import write_truth_embeddings
    from raypipe.synth.latent import generate_truth
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.train.trainer import assign_splits, fit_torch_trainer, load_trained, model_meta

    emb = write_truth_embeddings(generate_truth(n=120, seed=3), str(tmp_path / "emb"), dim=8)
    table = read_embeddings(emb)
    cfg = load_config(None, [f"run.out_dir={tmp_path}", f"train.input={emb}", "train.epochs=2", "train.patience=100",
                             "train.hidden_dim=8", "train.batch_size=16", "train.num_workers=2",
                             f"train.method={name}", "ray.progress_bars=false"])
    task, k = infer_task(table.y)
    split = assign_splits(table, cfg)
    meta = model_meta(cfg, table, task, k)
    meta["method"] = name
    ids = {s: set(table.sample_id[split == s]) for s in ("train", "val")}
    result = fit_torch_trainer(cfg, meta, ids["train"], ids["val"], f"ddp-{name}", str(tmp_path / "results"))
    with result.checkpoint.as_directory() as d:
        hist = json.load(open(os.path.join(d, "history.json")))
        assert [h["epoch"] for h in hist] == [1, 2]
        assert all(h["workers_agree"] and math.isfinite(h["train_loss"]) for h in hist)
        method, _ = load_trained(d)
    mask = np.ones((4, len(table.modalities)), bool)
    mask[:, 0] = False
    out = loop.make_predict_fn(method, task)({m: table.x[m][:4] for m in table.modalities}, mask)
    assert np.isfinite(out["probabilities"]).all()

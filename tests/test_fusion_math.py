"""OmniFuse math against METHOD.md: down-weighting, cascade, IMP losses, TLA mining and lazy loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raypipe.config import TrainConfig
import torch.nn.functional as F

from raypipe.fusion.base import ModalitySpec, down_weighting, nonempty_subsets, true_value_probability
from raypipe.fusion.omnifuse import OmniFuse
from raypipe.fusion.registry import build_method
from raypipe.train.data import simulate_missing
from raypipe.train.loop import HookContext

SPECS = [ModalitySpec("a", (6,)), ModalitySpec("b", (5,)), ModalitySpec("c", (4,))]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


def _batch(n=12, seed=0, specs=SPECS):
    g = torch.Generator().manual_seed(seed)
    x = {s.name: torch.randn((n, *s.shape), generator=g) for s in specs}
    y = torch.randint(0, 2, (n,), generator=g).float()
    return x, y


def _model(**kw):
    torch.manual_seed(0)
    return OmniFuse(SPECS, "binary", 2, hidden_dim=8, depth=3, **kw)


# ------------------------------------------------------------------ DWFuse factor
def test_down_weighting_closed_form_m2():
    q = torch.tensor([[0.9, 0.2]])
    w = down_weighting(q, beta=0.5)
    # M=2: w_1 = (1 - q_2)^(beta/1), w_2 = (1 - q_1)^(beta/1)
    assert w[0, 0].item() == pytest.approx(0.8 ** 0.5)
    assert w[0, 1].item() == pytest.approx(0.1 ** 0.5)


def test_down_weighting_closed_form_m4():
    q = torch.tensor([[0.9, 0.6, 0.3, 0.5]])
    beta = 0.7
    w = down_weighting(q, beta)
    for m in range(4):
        prod = math.prod(1 - q[0, n].item() for n in range(4) if n != m)
        assert w[0, m].item() == pytest.approx(prod ** (beta / 3), rel=1e-5)


def test_down_weighting_vanishes_when_others_certain_and_right():
    q = torch.tensor([[0.3, 1.0, 1.0], [0.3, 0.999999, 0.5]])
    w = down_weighting(q, beta=0.5)
    assert w[0, 0].item() == pytest.approx(0.0, abs=1e-9)
    # (1e-6 * 0.5) ** (0.5 / 2) -> goes to 0 as the other modality's q -> 1
    assert w[1, 0].item() == pytest.approx((1e-6 * 0.5) ** 0.25, rel=0.02)  # float32 1 - q
    qs = torch.tensor([[0.3, q, 0.5] for q in (0.5, 0.9, 0.99, 0.9999)])
    assert torch.all(torch.diff(down_weighting(qs, 0.5)[:, 0]) < 0)
    assert w[0, 1].item() == pytest.approx(0.0, abs=1e-9)  # another modality is certain and right


def test_dwfuse_weights_are_detached_and_used(monkeypatch):
    model = _model(use_imp_forward=False, use_imp_backward=False, use_tla=False)
    x, y = _batch()
    mask = torch.ones(12, 3, dtype=torch.bool)
    out = model({"x": x, "mask": mask, "y": y}, full_mask=mask)
    assert not out["weights"].requires_grad and out["weights"].shape == (12, 3)


def test_true_value_probability_per_task():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    p = logits.softmax(-1)
    q = true_value_probability(logits, torch.tensor([0, 2]), "multiclass")
    torch.testing.assert_close(q, torch.stack([p[0, 0], p[1, 2]]))
    ml = torch.tensor([[0.0, 2.0]])  # sigmoid: 0.5 and 0.8808; labels (1, 0)
    q = true_value_probability(ml, torch.tensor([[1.0, 0.0]]), "multilabel")
    assert q.item() == pytest.approx((0.5 + (1 - 1 / (1 + math.exp(-2)))) / 2)
    q = true_value_probability(torch.tensor([[1.5]]), torch.tensor([0.5]), "regression", var_y=2.0)
    assert q.item() == pytest.approx(math.exp(-1.0 / 2.0))


@pytest.mark.parametrize("loss_scale", ["sum", "mean"])
def test_dwfuse_loss_is_the_closed_form(loss_scale):
    """L_DWFuse = sum_m w_m CE_m + alpha CE_joint (paper Eq. 12-14; "mean": (1/M) sum_m) with w_m from
    the heads' own probabilities, and the total is lambda2 * L_DWFuse when IMP and TLA are off."""
    model = _model(use_imp_forward=False, use_imp_backward=False, use_tla=False, alpha=0.3, beta=0.8, lambda2=7.0,
                   loss_scale=loss_scale)
    model.eval()
    x, y = _batch(9)
    mask = torch.ones(9, 3, dtype=torch.bool)
    out = model({"x": x, "mask": mask, "y": y}, full_mask=mask)
    with torch.no_grad():
        v = torch.cat(model.encode(x, mask), 1)
        d = model.hidden_dim
        probs = [model.unimodal_heads[m](v[:, i * d:(i + 1) * d]).softmax(-1) for i, m in enumerate("abc")]
        q = [p[torch.arange(9), y.long()] for p in probs]
        manual_uni = torch.zeros(9)
        for m in range(3):
            w = ((1 - q[(m + 1) % 3]) * (1 - q[(m + 2) % 3])) ** (0.8 / 2)
            manual_uni += w * -probs[m][torch.arange(9), y.long()].log() / (3 if loss_scale == "mean" else 1)
        joint = F.cross_entropy(model.joint_head(v), y.long())
        manual = manual_uni.mean() + 0.3 * joint
    assert out["loss_dwfuse"].item() == pytest.approx(manual.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(7.0 * manual.item(), rel=1e-5)


# ------------------------------------------------------------------ cascade
def test_cascade_inputs_are_v_plus_earlier_deltas():
    model = _model()
    cra = model.cra_forward
    seen_inputs, deltas = [], []
    def record(module, inputs, output):  # returns None: the output is left untouched
        seen_inputs.append(inputs[0].detach())
        deltas.append(output[0].detach())

    hooks = [b.register_forward_hook(record) for b in cra.blocks]
    v = torch.randn(5, 3 * 8)
    v_out, latents = cra(v)
    for h in hooks:
        h.remove()
    assert len(latents) == 3 and latents[0].shape == (5, 64)
    running = torch.zeros_like(v)
    for k in range(3):
        torch.testing.assert_close(seen_inputs[k], v + running)
        running = running + deltas[k]
    torch.testing.assert_close(v_out, v + running)


def test_backward_cascade_has_its_own_parameters():
    model = _model()
    fwd = {id(p) for p in model.cra_forward.parameters()}
    bwd = {id(p) for p in model.cra_backward.parameters()}
    assert fwd and bwd and not (fwd & bwd)


def test_forward_loss_only_on_dropped_positions():
    model = _model(use_tla=False, loss_scale="mean", imp_forward_on="dropped")  # the normalised variant
    model.eval()  # no dropout: deterministic comparison
    x, y = _batch()
    full = torch.ones(12, 3, dtype=torch.bool)
    # nothing dropped: no known-truth position, zero forward loss
    out = model({"x": x, "mask": full, "y": y}, full_mask=full)
    assert out["loss_imp_forward"].item() == 0.0
    seen = full.clone()
    seen[:4, 1] = False  # modality b dropped by simulation for 4 samples
    out = model({"x": x, "mask": seen, "y": y}, full_mask=full)
    with torch.no_grad():
        v = torch.cat(model.encode(x, seen), 1)
        v_imp, _ = model.impute(v)
        v_full = torch.cat(model.encode(x, full), 1)
        d = model.hidden_dim
        manual = ((v_imp[:4, d:2 * d] - v_full[:4, d:2 * d]) ** 2).mean()
    assert out["loss_imp_forward"].item() == pytest.approx(manual.item(), rel=1e-5)
    # truly missing (not simulated) positions carry no truth: no forward loss there
    out = model({"x": x, "mask": seen, "y": y}, full_mask=seen)
    assert out["loss_imp_forward"].item() == 0.0


def test_backward_loss_only_on_seen_positions():
    model = _model(use_tla=False, loss_scale="mean")  # per-position mean; the summed default: see below
    model.eval()
    x, y = _batch()
    seen = torch.ones(12, 3, dtype=torch.bool)
    seen[:, 2] = False
    out = model({"x": x, "mask": seen, "y": y}, full_mask=seen)
    with torch.no_grad():
        v = torch.cat(model.encode(x, seen), 1)
        v_imp, _ = model.impute(v)
        v_back, _ = model.cra_backward(v_imp)
        d = model.hidden_dim
        manual = ((v_back[:, :2 * d] - v[:, :2 * d]) ** 2).mean()
    assert out["loss_imp_backward"].item() == pytest.approx(manual.item(), rel=1e-5)


# ------------------------------------------------------------------ TLA
def test_subsets_enumerated():
    for m in (2, 3, 4, 5):
        subs = nonempty_subsets(m)
        assert len(subs) == 2 ** m - 1 == len(set(subs))


def test_tla_mining_picks_argmax_of_all_subsets():
    model = _model()
    x, y = _batch(40)
    mask = torch.ones(40, 3, dtype=torch.bool)
    ctx = HookContext(train_batches=lambda: [{"x": x, "mask": mask, "y": y}])
    trace = model.on_epoch_end(ctx)["tla"]
    assert len(trace["d"]) == 7
    best = max(trace["d"], key=trace["d"].get)
    assert trace["lazy"] == best
    assert model.lazy_subset == tuple(model.modalities.index(m) for m in best.split("+"))


def test_tla_mining_all_reduces_statistics():
    model = _model()
    x, y = _batch(20)
    mask = torch.ones(20, 3, dtype=torch.bool)
    calls = []

    def fake_all_reduce(t):
        calls.append(t.clone())
        return t * 2  # two identical workers: sums and counts double, means unchanged

    local = model.subset_losses([{"x": x, "mask": mask, "y": y}])
    reduced = model.subset_losses([{"x": x, "mask": mask, "y": y}], all_reduce=fake_all_reduce)
    assert len(calls) == 1
    for s in local:
        assert reduced[s] == pytest.approx(local[s])


def test_subset_loss_is_mean_ce_over_samples_that_have_the_subset():
    model = _model()
    x, y = _batch(16)
    mask = torch.ones(16, 3, dtype=torch.bool)
    mask[:5, 0] = False  # 5 samples lack a: they cannot show {a} nor any subset with a
    d = model.subset_losses([{"x": x, "mask": mask, "y": y}])
    model.eval()
    with torch.no_grad():
        only_a = torch.tensor([[True, False, False]]).expand(11, -1)
        lg = model.joint_logits({m: t[5:] for m, t in x.items()}, only_a)
        manual_a = F.cross_entropy(lg, y[5:].long()).item()
        only_bc = torch.tensor([[False, True, True]]).expand(16, -1)
        manual_bc = F.cross_entropy(model.joint_logits(x, only_bc), y.long()).item()
    assert d[(0,)] == pytest.approx(manual_a, rel=1e-5)
    assert d[(1, 2)] == pytest.approx(manual_bc, rel=1e-5)


@pytest.mark.parametrize("absent_fill", ["mean", "zero_input"])
def test_tla_mining_with_four_modalities_enumerates_fifteen_subsets(absent_fill):
    """The batched mining pass equals masking and running the joint head subset by subset
    (updated when mining was batched: it no longer calls joint_logits once per subset)."""
    specs = SPECS + [ModalitySpec("d", (3,))]
    torch.manual_seed(0)
    model = OmniFuse(specs, "binary", 2, hidden_dim=4, depth=2, absent_fill=absent_fill)
    x, y = _batch(12, specs=specs)
    mask = torch.ones(12, 4, dtype=torch.bool)
    mask[:4, 3] = False
    trace = model.on_epoch_end(HookContext(train_batches=lambda: [{"x": x, "mask": mask, "y": y}]))["tla"]
    assert len(trace["d"]) == 15
    model.eval()
    with torch.no_grad():
        for s in nonempty_subsets(4):
            rows = mask[:, list(s)].all(1)
            want = torch.zeros(1, 4, dtype=torch.bool)
            want[0, list(s)] = True
            lg = model.joint_logits({m: t[rows] for m, t in x.items()}, want.expand(int(rows.sum()), -1))
            name = "+".join(model.modalities[i] for i in s)
            assert trace["d"][name] == pytest.approx(F.cross_entropy(lg, y[rows].long()).item(), rel=1e-5)


def test_tla_picks_the_argmax_subset(monkeypatch):
    model = _model()
    fake = {s: 0.1 * len(s) for s in nonempty_subsets(3)}
    fake[(0, 2)] = 5.0
    monkeypatch.setattr(model, "subset_losses", lambda batches, all_reduce=None: fake)
    trace = model.on_epoch_end(HookContext(train_batches=lambda: []))["tla"]
    assert model.lazy_subset == (0, 2) and trace["lazy"] == "a+c"
    assert trace["d"]["a+c"] == 5.0 and len(trace["d"]) == 7
    fake = {s: 1.0 for s in nonempty_subsets(3)}  # ties: the smaller subset
    monkeypatch.setattr(model, "subset_losses", lambda batches, all_reduce=None: fake)
    model.on_epoch_end(HookContext(train_batches=lambda: []))
    assert model.lazy_subset == (0,)


def test_lazy_loss_covers_only_samples_with_the_whole_lazy_subset():
    model = _model(use_imp_forward=False, use_imp_backward=False)
    model.lazy_subset = (1, 2)  # b + c
    x, y = _batch(10)
    full = torch.ones(10, 3, dtype=torch.bool)
    full[:3, 2] = False  # 3 samples lack c: they cannot show the lazy view
    rows_seen = []
    orig = model.joint_logits

    def spy(xx, mm):
        rows_seen.append((len(mm), mm[0].tolist()))
        return orig(xx, mm)

    model.joint_logits = spy
    out = model({"x": x, "mask": full, "y": y}, full_mask=full)
    assert rows_seen == [(7, [False, True, True])]
    model.joint_logits = orig
    model.eval()
    out = model({"x": x, "mask": full, "y": y}, full_mask=full)
    with torch.no_grad():
        lazy_mask = torch.tensor([[False, True, True]]).expand(7, -1)
        manual = F.cross_entropy(model.joint_logits({m: t[3:] for m, t in x.items()}, lazy_mask), y[3:].long())
    assert out["loss_tla"].item() == pytest.approx(manual.item(), rel=1e-5)
    # the lazy view also counts for samples whose *simulated* pattern hides part of the subset
    seen = full.clone()
    seen[3:6, 1] = False
    rows_seen.clear()
    model.joint_logits = spy
    model({"x": x, "mask": seen, "y": y}, full_mask=full)
    assert rows_seen == [(7, [False, True, True])]


# ------------------------------------------------------------------ switches and registry
@pytest.mark.parametrize("switches", [
    dict(use_imp_forward=False, use_imp_backward=False, use_tla=False),  # b: DWFuse
    dict(use_imp_forward=False, use_imp_backward=False),  # c: + TLA
    dict(use_imp_backward=False),  # d: + IMP forward
    dict(),  # e: full
    dict(use_dwfuse=False),  # f
])
def test_ablation_rows_build_and_train(switches):
    cfg = TrainConfig(hidden_dim=8, omnifuse={"depth": 2, **switches})
    model = build_method("omnifuse", SPECS, "binary", 2, cfg)
    x, y = _batch()
    mask = torch.ones(12, 3, dtype=torch.bool)
    out = model({"x": x, "mask": mask, "y": y}, full_mask=mask)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert hasattr(model, "cra_forward") == switches.get("use_imp_forward", True)


def test_trace_outputs_reliability_and_imputed_flags():
    model = _model()
    x, _ = _batch()
    mask = torch.ones(12, 3, dtype=torch.bool)
    mask[:5, 0] = False
    out = model.predict_with_trace(x, mask)
    assert out["probabilities"].shape == (12, 2)
    torch.testing.assert_close(out["probabilities"].sum(1), torch.ones(12))
    assert out["imputed_a"][:5].all() and not out["imputed_a"][5:].any()
    for m in "abc":
        assert out[f"prob_{m}"].shape == (12, 2)
        assert ((out[f"weight_{m}"] >= 0) & (out[f"weight_{m}"] <= 1)).all()
    # label-free reliability: w_m with the joint prediction in place of y
    pred = out["probabilities"].argmax(1)
    q = torch.stack([out[f"prob_{m}"][torch.arange(12), pred] for m in "abc"], 1)
    torch.testing.assert_close(torch.stack([out[f"weight_{m}"] for m in "abc"], 1), down_weighting(q, model.beta))


# ------------------------------------------------------------------ missing-pattern simulation
def test_simulation_never_drops_everything_and_matches_rate():
    rng = np.random.default_rng(0)
    mask = rng.random((20000, 4)) < 0.8
    mask[~mask.any(1), 0] = True
    out = simulate_missing(mask, 0.5, np.random.default_rng(1))
    assert out.any(axis=1).all()
    assert not (out & ~mask).any()  # only drops, never adds
    eligible = mask.sum(1) >= 2
    changed = (out != mask).any(axis=1)
    assert abs(changed[eligible].mean() - 0.5) < 0.02
    assert not changed[~eligible].any()


def test_simulation_drops_uniform_proper_subsets():
    mask = np.ones((30000, 3), bool)
    out = simulate_missing(mask, 1.0, np.random.default_rng(2))
    patterns, counts = np.unique(out, axis=0, return_counts=True)
    # 6 non-empty proper subsets can be dropped -> 6 resulting patterns, equally likely
    assert len(patterns) == 6
    assert counts.min() / counts.max() > 0.9


# ------------------------------------------------------------------ objective composition and loss scaling
def _full_out(model, lambdas=None):
    """A deterministic training step (eval mode: no dropout) with every term present."""
    if lambdas is not None:
        model.lambda1, model.lambda2, model.lambda3 = lambdas
    model.eval()
    model.lazy_subset = (0, 2)
    x, y = _batch(10, seed=3)
    full = torch.ones(10, 3, dtype=torch.bool)
    seen = full.clone()
    seen[:4, 1] = False
    return model({"x": x, "mask": seen, "y": y}, full_mask=full)


def test_total_loss_is_the_paper_objective_term_by_term():
    """L = L_fwd + lambda1 L_bwd + lambda2 L_DWFuse + lambda3 L_TLA (Eq. 18): each lambda_k scales
    exactly its own term; the terms themselves do not depend on the lambdas."""
    model = _model()
    base = _full_out(model, (1.0, 10.0, 0.5))
    terms = {k: base[f"loss_{k}"].item() for k in ("imp_forward", "imp_backward", "dwfuse", "tla")}
    assert all(v > 0 for v in terms.values())
    # the paper's defaults, written out by hand
    assert base["loss"].item() == pytest.approx(terms["imp_forward"] + 1.0 * terms["imp_backward"]
                                                + 10.0 * terms["dwfuse"] + 0.5 * terms["tla"], rel=1e-5)
    for k, (lam, term) in enumerate([(2.0, "imp_backward"), (3.0, "dwfuse"), (4.0, "tla")]):
        lambdas = [1.0, 10.0, 0.5]
        old = lambdas[k]
        lambdas[k] = lam
        out = _full_out(model, tuple(lambdas))
        for t in terms:  # no term changes with a weight
            assert out[f"loss_{t}"].item() == pytest.approx(terms[t], rel=1e-5)
        # the total moves by (new - old) times this term, nothing else
        assert out["loss"].item() - base["loss"].item() == pytest.approx((lam - old) * terms[term], rel=1e-4)


def test_summed_and_normalised_squared_error_hand_worked():
    """diff rows (1, 2) and (3, 4), counted positions {(0,0), (1,0), (1,1)}, batch of 2:
    sum: (1 + 9 + 16) / 2 = 13 (per-sample squared norm, batch mean); mean: 26 / 3 positions."""
    diff = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    pm = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert _model(loss_scale="sum")._squared_error(diff, pm, 2).item() == pytest.approx(13.0)
    assert _model(loss_scale="mean")._squared_error(diff, pm, 2).item() == pytest.approx(26.0 / 3.0)


@pytest.mark.parametrize("imp_forward_on", ["known", "dropped"])
def test_forward_loss_sum_vs_mean_counts(imp_forward_on):
    """With the cascade's output zeroed (v' = v) the forward loss is the squared distance between the
    fill and the truth on the dropped slots (observed slots match exactly in eval mode). Summed: divided
    by the batch (4 samples); mean: by the counted positions: all 4 x 3 slots x 8 ('known') or the
    2 dropped slots x 8 ('dropped')."""
    x, y = _batch(4, seed=5)
    full = torch.ones(4, 3, dtype=torch.bool)
    seen = full.clone()
    seen[:2, 0] = False
    values = {}
    for scale in ("sum", "mean"):
        model = _model(loss_scale=scale, imp_forward_on=imp_forward_on, use_imp_backward=False, use_tla=False)
        for block in model.cra_forward.blocks:  # every delta_k = 0
            nn_last = block.decoder[-1]
            torch.nn.init.zeros_(nn_last.weight)
            torch.nn.init.zeros_(nn_last.bias)
        model.eval()
        values[scale] = model({"x": x, "mask": seen, "y": y}, full_mask=full)["loss_imp_forward"].item()
        with torch.no_grad():
            fill = model.encode(x, seen)[0][:2]
            truth = model.encode(x, full)[0][:2]
            sq = ((fill - truth) ** 2).sum().item()
    counted = 4 * 3 * 8 if imp_forward_on == "known" else 2 * 8
    assert values["sum"] == pytest.approx(sq / 4, rel=1e-5)
    assert values["mean"] == pytest.approx(sq / counted, rel=1e-5)


def _identity_vector_model(absent_fill):
    """Modality a: 2 features, D = 2, encoder net = ReLU(identity) so h_a = ReLU(standardised x)."""
    specs = [ModalitySpec("a", (2,)), ModalitySpec("b", (2,))]
    torch.manual_seed(0)
    model = OmniFuse(specs, "binary", 2, hidden_dim=2, depth=1, absent_fill=absent_fill)
    enc = model.encoders["a"]
    with torch.no_grad():
        for lin in (enc.net[0], enc.net[3]):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        enc.norm.mean.copy_(torch.tensor([-2.0, 50.0]))
        enc.norm.var.copy_(torch.tensor([4.0, 1.0]))
        enc.norm.seen.fill_(True)
    model.eval()
    return model


def test_absent_fill_zero_input_is_the_encoder_of_raw_zeros():
    """Running mean (-2, 50), variance (4, 1): raw zeros standardise to (2 / 2, -50 clipped to -10) =
    (1, -10); ReLU(identity) gives h = (1, 0). The standardised-mean fill gives ReLU(0) = (0, 0).
    A present row is unaffected by the option: x = (0, 51) -> (1, 1)."""
    x = {"a": torch.tensor([[0.0, 51.0], [0.0, 51.0]]), "b": torch.zeros(2, 2)}
    mask = torch.tensor([[True, True], [False, True]])
    h_zero = _identity_vector_model("zero_input").encode(x, mask)[0]
    h_mean = _identity_vector_model("mean").encode(x, mask)[0]
    torch.testing.assert_close(h_zero[1], torch.tensor([1.0, 0.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(h_mean[1], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(h_zero[0], torch.tensor([1.0, 1.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(h_mean[0], h_zero[0])


def test_absent_fill_zero_input_keeps_running_statistics_from_present_rows():
    model = OmniFuse([ModalitySpec("a", (2,)), ModalitySpec("b", (2,))], "binary", 2, hidden_dim=2, depth=1,
                     absent_fill="zero_input")
    model.train()
    x = {"a": torch.tensor([[1.0, 3.0], [3.0, 5.0], [100.0, 100.0]]), "b": torch.zeros(3, 2)}
    mask = torch.tensor([[True, True], [True, True], [False, True]])
    model.encode(x, mask)
    torch.testing.assert_close(model.encoders["a"].norm.mean, torch.tensor([2.0, 4.0]))  # the absent row ignored


def test_options_are_validated_and_reach_the_model_from_the_config():
    cfg = TrainConfig(hidden_dim=4, omnifuse={"depth": 1, "loss_scale": "mean", "absent_fill": "zero_input",
                                              "imp_forward_on": "dropped", "mine_every": 3})
    model = build_method("omnifuse", SPECS, "binary", 2, cfg)
    assert (model.loss_scale, model.absent_fill, model.imp_forward_on, model.mine_every) == \
        ("mean", "zero_input", "dropped", 3)
    defaults = build_method("omnifuse", SPECS, "binary", 2, TrainConfig(hidden_dim=4))
    assert (defaults.loss_scale, defaults.imp_forward_on, defaults.mine_every) == ("sum", "known", 1)
    assert (defaults.lambda1, defaults.lambda2, defaults.lambda3, defaults.alpha, defaults.beta) == (1, 10, 0.5, 0.1, 0.5)
    assert len(defaults.cra_forward.blocks) == 5 == TrainConfig().omnifuse.depth
    for bad in ({"loss_scale": "max"}, {"absent_fill": "nan"}, {"mine_every": 0}):
        with pytest.raises(Exception):
            TrainConfig(omnifuse=bad)
    with pytest.raises(ValueError):
        OmniFuse(SPECS, "binary", 2, hidden_dim=4, depth=1, loss_scale="max")


def test_mine_every_k_epochs(monkeypatch):
    model = _model(mine_every=3)
    calls = []
    fake = {s: float(len(s)) for s in nonempty_subsets(3)}
    monkeypatch.setattr(model, "subset_losses", lambda b, all_reduce=None: (calls.append(1), fake)[1])
    epochs_mined = []
    for epoch in range(7):
        n = len(calls)
        out = model.on_epoch_end(HookContext(train_batches=lambda: [], epoch=epoch))
        if len(calls) > n:
            epochs_mined.append(epoch)
        assert out["tla"]["lazy"] == "a+b+c"  # the trace of the last mining is carried
    assert epochs_mined == [0, 3, 6]

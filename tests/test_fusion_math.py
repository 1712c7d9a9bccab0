"""OmniFuse math against METHOD.md: down-weighting, cascade, IMP losses, TLA mining and lazy loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raypipe.config import TrainConfig
from raypipe.fusion.base import ModalitySpec, down_weighting, nonempty_subsets
from raypipe.fusion.omnifuse import OmniFuse
from raypipe.fusion.registry import build_method
from raypipe.train.data import simulate_missing
from raypipe.train.loop import HookContext

SPECS = [ModalitySpec("a", (6,)), ModalitySpec("b", (5,)), ModalitySpec("c", (4,))]


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
    model = _model(use_tla=False)
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
    model = _model(use_tla=False)
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
    assert out["loss_tla"].item() > 0


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

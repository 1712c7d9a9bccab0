"""OmniFuse's imputation options (docs/fusion.md, "Making the imputation earn its place"): the skip
around the cascade, reliability-gated DWFuse trust of imputed slots, and the stop-gradient that keeps
the classification losses out of the cascades. Each test is a property that fails without the feature."""

from __future__ import annotations

import pytest
import torch

from raypipe.config import TrainConfig
from raypipe.fusion.base import ModalitySpec, down_weighting, true_value_probability
from raypipe.fusion.omnifuse import OmniFuse
from raypipe.fusion.registry import build_method

SPECS = [ModalitySpec("a", (6,)), ModalitySpec("b", (5,)), ModalitySpec("c", (4,))]
D = 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


def _batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {s.name: torch.randn((n, *s.shape), generator=g) for s in SPECS}
    return x, torch.randint(0, 2, (n,), generator=g).float()


def _model(**kw):
    torch.manual_seed(0)
    return OmniFuse(SPECS, "binary", 2, hidden_dim=D, depth=2, **kw)


def _garble(cascade, scale=50.0):
    """A cascade that imputes garbage: every weight replaced by large random values."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in cascade.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_joint_skip_lets_a_garbage_cascade_reproduce_row_b():
    """With the skip, the joint head can read v (row b's input) untouched by the cascade: a row-e model
    whose cascade imputes garbage, given row b's encoders and joint head on its v columns (zero on the
    latent columns), predicts exactly row b's logits. Without the skip its head has no such input."""
    row_b = _model(use_imp_forward=False, use_imp_backward=False, use_tla=False).eval()
    row_e = _model(joint_skip=True).eval()
    row_e.encoders.load_state_dict(row_b.encoders.state_dict())
    _garble(row_e.cra_forward)
    lat = row_e.cra_forward.blocks[0].encoder[-1].out_features * len(row_e.cra_forward.blocks)
    first_e, first_b = row_e.joint_head[0], row_b.joint_head[0]
    assert first_e.in_features == lat + len(SPECS) * D
    with torch.no_grad():
        first_e.weight.zero_()
        first_e.weight[:, lat:] = first_b.weight
        first_e.bias.copy_(first_b.bias)
        for pe, pb in zip(list(row_e.joint_head.parameters())[2:], list(row_b.joint_head.parameters())[2:]):
            pe.copy_(pb)
    x, _ = _batch()
    mask = torch.ones(12, 3, dtype=torch.bool)
    mask[:6, 1] = False
    mask[3:9, 2] = False
    with torch.no_grad():
        torch.testing.assert_close(row_e.joint_logits(x, mask), row_b.joint_logits(x, mask))
        # the garbage is really there: the latents-only head of the paper sees it
        no_skip = _model().eval()
        no_skip.encoders.load_state_dict(row_b.encoders.state_dict())
        _garble(no_skip.cra_forward)
        assert no_skip.joint_head[0].in_features == lat
    # and the skip carries v exactly: the last M*D columns of the joint input are concat(h)
    with torch.no_grad():
        v = torch.cat(row_e.encode(x, mask), 1)
        torch.testing.assert_close(row_e.impute(v)[1][:, lat:], v)


@pytest.mark.parametrize("grad", ["all", "imputation"])
def test_cascade_grad_imputation_keeps_classification_out_of_the_cascades(grad):
    """cascade_grad=imputation: the cascades' gradients from the full objective equal those from the
    imputation terms alone (lambda2 = lambda3 = 0); with the paper's 'all' they differ. The encoders
    still learn from the classification losses either way."""
    def grads(lam2, lam3):
        model = _model(cascade_grad=grad, lambda2=lam2, lambda3=lam3).eval()  # eval: no dropout noise
        model.lazy_subset = (0, 2)
        x, y = _batch(10, seed=3)
        full = torch.ones(10, 3, dtype=torch.bool)
        seen = full.clone()
        seen[:4, 1] = False
        model({"x": x, "mask": seen, "y": y}, full_mask=full)["loss"].backward()
        casc = torch.cat([p.grad.flatten() for p in list(model.cra_forward.parameters())
                          + list(model.cra_backward.parameters()) if p.grad is not None])
        enc = torch.cat([p.grad.flatten() for p in model.encoders.parameters() if p.grad is not None])
        return casc, enc

    casc_full, enc_full = grads(10.0, 0.5)
    casc_imp, enc_imp = grads(0.0, 0.0)
    assert casc_full.abs().sum() > 0
    if grad == "imputation":
        torch.testing.assert_close(casc_full, casc_imp)
    else:
        assert not torch.allclose(casc_full, casc_imp)
    assert not torch.allclose(enc_full, enc_imp)  # classification still trains the encoders


@pytest.mark.parametrize("grad", ["imputation", "separate"])
def test_cascade_grad_separate_keeps_imputation_out_of_the_encoders(grad, monkeypatch):
    """cascade_grad=separate: the encoders' gradients do not change when the imputation losses are
    removed from the objective (the cascade reads v through a stop-gradient); under 'imputation' the
    imputation losses still reach the encoders through the cascade's input."""
    def enc_grads(drop_imputation):
        model = _model(cascade_grad=grad, joint_skip=True).eval()
        model.lazy_subset = (0, 2)
        if drop_imputation:
            monkeypatch.setattr(model, "_squared_error", lambda diff, pm, batch: (diff * 0).sum())
        x, y = _batch(10, seed=3)
        full = torch.ones(10, 3, dtype=torch.bool)
        seen = full.clone()
        seen[:4, 1] = False
        out = model({"x": x, "mask": seen, "y": y}, full_mask=full)
        assert (out["loss_imp_forward"] == 0) == drop_imputation
        out["loss"].backward()
        return torch.cat([p.grad.flatten() for p in model.encoders.parameters() if p.grad is not None])

    with_imp, without = enc_grads(False), enc_grads(True)
    if grad == "separate":
        torch.testing.assert_close(with_imp, without)
    else:
        assert not torch.allclose(with_imp, without)


def test_reliability_scales_only_imputed_weights_hand_worked():
    """imputed_trust=reliability: w_m of an imputed slot times max(0, 1 - NMSE_m); observed slots and
    the 'same' (paper) option keep DWFuse's weight. NMSE (0.25, 1.5, 0.0) -> factors (0.75, 0, 1)."""
    x, _ = _batch()
    mask = torch.ones(12, 3, dtype=torch.bool)
    mask[:6, 0] = False
    mask[6:, 1] = False
    mask[::2, 2] = False
    rel = _model(imputed_trust="reliability").eval()
    same = _model(imputed_trust="same").eval()
    rel.imp_nmse.copy_(torch.tensor([0.25, 1.5, 0.0]))
    t_rel, t_same = rel.predict_with_trace(x, mask), same.predict_with_trace(x, mask)
    factor = torch.tensor([0.75, 0.0, 1.0])
    for i, m in enumerate("abc"):
        expect = torch.where(mask[:, i], t_same[f"weight_{m}"], t_same[f"weight_{m}"] * factor[i])
        torch.testing.assert_close(t_rel[f"weight_{m}"], expect)
    # and the DWFuse loss in training uses the same factor: recompute L_uni by hand
    rel.train(False)
    y = torch.randint(0, 2, (12,)).float()
    out = rel({"x": x, "mask": mask, "y": y})
    v_imp, joint_in = rel.impute(torch.cat(rel.encode(x, mask), 1))
    uni = [rel.unimodal_heads[m](v_imp[:, i * D:(i + 1) * D]) for i, m in enumerate("abc")]
    q = torch.stack([true_value_probability(lg, y, "binary", 1.0) for lg in uni], 1)
    w = down_weighting(q, 0.5) * torch.where(mask, torch.ones(3), factor)
    ce = torch.stack([torch.nn.functional.cross_entropy(lg, y.long(), reduction="none") for lg in uni], 1)
    joint = torch.nn.functional.cross_entropy(rel.joint_head(joint_in), y.long())
    torch.testing.assert_close(out["loss_dwfuse"], (w * ce).sum(1).mean() + 0.1 * joint, rtol=1e-5, atol=1e-6)


def test_reliability_tracker_hand_worked():
    """The running NMSE moves by momentum 0.1 towards the batch's E||v'_m - h_m||^2 / E||h_m - mean||^2:
    a perfect imputation -> 0.9 * 1 + 0.1 * 0; the per-row mean of the known truths -> NMSE 1 stays 1;
    a modality never hidden keeps its value; a new model starts at 1 (imputed slots untrusted)."""
    model = _model(imputed_trust="reliability")
    torch.testing.assert_close(model.imp_nmse, torch.ones(3))
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(10, 3 * D, generator=g)
    full = torch.ones(10, 3, dtype=torch.bool)
    dropped = torch.zeros(10, 3, dtype=torch.bool)
    dropped[:5, 0] = True
    dropped[5:, 1] = True
    imp = truth.clone()
    imp[:, D:2 * D] = truth[:, D:2 * D].mean(0)  # modality b imputed by the mean of its known rows
    model._track_reliability(imp, truth, dropped, full)
    ref_b = truth[:, D:2 * D]
    var_b = ((ref_b - ref_b.mean(0)) ** 2).sum(1).mean()
    nmse_b = ((ref_b.mean(0) - ref_b[5:]) ** 2).sum(1).mean() / var_b
    torch.testing.assert_close(model.imp_nmse, torch.stack([torch.tensor(0.9), 0.9 + 0.1 * nmse_b,
                                                            torch.tensor(1.0)]))


def test_new_options_reach_the_model_from_the_config_and_are_validated():
    cfg = TrainConfig(hidden_dim=4, omnifuse={"depth": 1, "joint_skip": True, "imputed_trust": "reliability",
                                              "cascade_grad": "imputation"})
    model = build_method("omnifuse", SPECS, "binary", 2, cfg)
    assert (model.joint_skip, model.imputed_trust, model.cascade_grad) == (True, "reliability", "imputation")
    assert build_method("omnifuse", SPECS, "binary", 2, TrainConfig(
        hidden_dim=4, omnifuse={"depth": 1, "cascade_grad": "separate"})).cascade_grad == "separate"
    for bad in ({"imputed_trust": "always"}, {"cascade_grad": "none"}):
        with pytest.raises(Exception):
            TrainConfig(omnifuse=bad)
    with pytest.raises(ValueError):
        OmniFuse(SPECS, "binary", 2, hidden_dim=4, depth=1, cascade_grad="none")


# ----------------------------------------------------------------------------- root-cause options (H1-H4)
def test_forward_target_is_detached_encoders_learn_only_through_the_cascade_input():
    """H1: the forward-imputation target v_full (encoders on the true input) carries no gradient
    (METHOD 1.2: 'target: encoders on the true input, detached'): the encoders' gradient of L_fwd is
    the same when v_full is replaced by a constant copy; a target that did carry gradient would
    change it (the test has teeth)."""
    x, y = _batch(10, seed=5)
    full = torch.ones(10, 3, dtype=torch.bool)
    seen = full.clone()
    seen[:5, 0] = False

    def enc_grad(target_mode):
        model = _model(use_imp_backward=False, lambda2=0.0, lambda3=0.0).eval()
        if target_mode == "constant":
            const = [h.detach().clone() for h in model.encode_reference(x, full)]
            model.encode_reference = lambda xx, mm: const
        elif target_mode == "with_grad":
            model.encode_reference = lambda xx, mm: model.encode(xx, mm)
        model({"x": x, "mask": seen, "y": y}, full_mask=full)["loss"].backward()
        return torch.cat([p.grad.flatten() for p in model.encoders.parameters() if p.grad is not None])

    as_is, constant, with_grad = enc_grad("as_is"), enc_grad("constant"), enc_grad("with_grad")
    assert as_is.abs().sum() > 0  # the cascade's input path still reaches the encoders
    torch.testing.assert_close(as_is, constant)
    assert not torch.allclose(as_is, with_grad)


def test_cascade_init_zero_makes_the_untrained_cascade_the_identity():
    """H2: cascade_init=zero zeroes each autoencoder's last decoder layer: every delta_k is 0, so both
    untrained cascades return v exactly (v' = v: an imputed slot starts as the fill); the default
    initialisation does not."""
    v = torch.randn(7, 3 * D, generator=torch.Generator().manual_seed(2))
    zero, default = _model(cascade_init="zero"), _model()
    with torch.no_grad():
        for cascade in (zero.cra_forward, zero.cra_backward):
            out, latents = cascade(v)
            assert torch.equal(out, v)
            assert len(latents) == 2 and latents[0].abs().sum() > 0  # the encoders are not zeroed
        assert not torch.allclose(default.cra_forward(v)[0], v)
    with pytest.raises(ValueError):
        _model(cascade_init="ones")


def test_imp_warmup_trains_only_the_cascades_on_the_imputation_losses():
    """H3: during the first imp_warmup epochs the objective is L_fwd + lambda1 L_bwd alone and the
    encoders stay fixed: encoders and heads get no gradient, the cascades do; from epoch imp_warmup on
    the full objective (lambda2 L_DWFuse + lambda3 L_TLA added) trains everything."""
    from raypipe.train.loop import HookContext

    x, y = _batch(10, seed=4)
    full = torch.ones(10, 3, dtype=torch.bool)
    seen = full.clone()
    seen[:5, 1] = False

    def step(epoch):
        model = _model(imp_warmup=2, lambda1=0.7)
        model.train()
        model.lazy_subset = (0, 1)
        model.on_epoch_start(HookContext(epoch=epoch))
        out = model({"x": x, "mask": seen, "y": y}, full_mask=full)
        out["loss"].backward()
        grad = lambda mod: sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None)  # noqa: E731
        return out, grad(model.encoders), grad(model.unimodal_heads) + grad(model.joint_head), grad(model.cra_forward)

    out, g_enc, g_heads, g_casc = step(1)
    torch.testing.assert_close(out["loss"], out["loss_imp_forward"] + 0.7 * out["loss_imp_backward"])
    assert out["loss_dwfuse"] > 0 and out["loss_tla"] > 0  # computed and logged, weighing 0
    assert g_enc == 0 and g_heads == 0 and g_casc > 0
    out, g_enc, g_heads, g_casc = step(2)
    torch.testing.assert_close(out["loss"], out["loss_imp_forward"] + 0.7 * out["loss_imp_backward"]
                               + 10.0 * out["loss_dwfuse"] + 0.5 * out["loss_tla"])
    assert g_enc > 0 and g_heads > 0 and g_casc > 0


def test_hide_one_hides_exactly_one_seen_modality_uniformly():
    """imp_hide_one's extra mask: each row with >= 2 seen modalities loses exactly one of them (never
    an unseen one), a row with one keeps it; over many rows each seen modality is the hidden one about
    equally often."""
    torch.manual_seed(0)
    mask = torch.rand(3000, 3) < 0.7
    mask[mask.sum(1) == 0, 0] = True
    out = OmniFuse._hide_one(mask)
    lost = mask & ~out
    assert not (out & ~mask).any()
    many = mask.sum(1) >= 2
    assert torch.equal(lost.sum(1), many.long())
    full_rows = mask.all(1)
    share = lost[full_rows].float().mean(0)
    torch.testing.assert_close(share, torch.full((3,), 1 / 3), atol=0.04, rtol=0)


def test_imp_hide_one_adds_a_second_forward_pass_hand_worked(monkeypatch):
    """imp_hide_one: L_fwd is the mean of the simulation's pass and a pass with one more modality hidden
    (here, deterministically, modality 0 where a row saw >= 2), each the paper's per-sample squared
    norm over the known slots, recomputed from the public pieces; without the option a batch the
    simulation left whole has no forward loss."""
    monkeypatch.setattr(OmniFuse, "_hide_one", staticmethod(
        lambda m: m & ~(torch.tensor([True, False, False]) & (m.sum(1, keepdim=True) >= 2))))
    x, y = _batch(8, seed=6)
    full = torch.ones(8, 3, dtype=torch.bool)
    full[:2, 1] = False

    def loss(model, seen):
        model.train()
        model.encoders.eval()  # deterministic encoders (no dropout, no running-statistics update)
        return model({"x": x, "mask": seen, "y": y}, full_mask=full)["loss_imp_forward"]

    def by_hand(model, seen):
        with torch.no_grad():
            target = torch.cat(model.encode_reference(x, full), 1)
            v_imp = model.cra_forward(torch.cat(model.encode(x, seen), 1))[0]
            return (((v_imp - target) ** 2) * model._position_mask(full)).sum() / 8

    assert loss(_model(), full) == 0
    hide1 = _model(imp_hide_one=True)
    seen2 = full.clone()
    seen2[full.sum(1) >= 2, 0] = False
    torch.testing.assert_close(loss(hide1, full), by_hand(hide1, seen2))
    seen = full.clone()
    seen[4:, 2] = False
    seen2 = seen.clone()
    seen2[seen.sum(1) >= 2, 0] = False
    torch.testing.assert_close(loss(hide1, seen), (by_hand(hide1, seen) + by_hand(hide1, seen2)) / 2)


def _redundant_data(n=128, seed=0):
    """Modality b is a fixed linear map of a plus a little noise; c is independent: b is imputable from a."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 6, generator=g)
    b = a[:, :5] @ torch.randn(5, 5, generator=g) + 0.05 * torch.randn(n, 5, generator=g)
    c = torch.randn(n, 4, generator=g)
    return {"a": a, "b": b, "c": c}, torch.randint(0, 2, (n,), generator=g).float()


def test_cascade_passes_train_only_the_cascades_and_learn_the_redundancy():
    """cascade_passes: on_epoch_end runs k passes of the cascades alone on the imputation losses. The
    encoders, heads and every buffer stay exactly as they were; the cascades change; and on data whose
    modality b is a linear function of a, 150 passes bring the forward cascade's imputation of a hidden b
    well below the mean predictor (NMSE < 0.7), where the untrained cascade is not (NMSE > 0.9)."""
    from raypipe.train.data import tensor_batches
    from raypipe.train.loop import HookContext

    x, y = _redundant_data()
    full = torch.ones(len(y), 3, dtype=torch.bool)
    model = _model(cascade_passes=150, use_tla=False)
    model.train()
    with torch.no_grad():  # one training-mode encode so the input standardisation has statistics
        model.encode(x, full)
    model.eval()
    arrays = ({k: v.numpy() for k, v in x.items()}, full.numpy(), y.numpy())

    def nmse_b():
        with torch.no_grad():
            target = torch.cat(model.encode(x, full), 1)[:, D:2 * D]
            hidden = full.clone()
            hidden[:, 1] = False  # b imputed from a and c
            imp = model.impute(torch.cat(model.encode(x, hidden), 1))[0][:, D:2 * D]
            return float(((imp - target) ** 2).sum(1).mean() / ((target - target.mean(0)) ** 2).sum(1).mean())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert nmse_b() > 0.9
    model.train()
    model.on_epoch_end(HookContext(p_drop=0.5, seed=0, epoch=0,
                                   train_batches=lambda: tensor_batches(*arrays, "binary", 512)))
    model.eval()
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("cra_"):
            continue
        assert torch.equal(v, after[k]), k
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith("cra_forward"))
    assert nmse_b() < 0.7
    with pytest.raises(ValueError):
        _model(cascade_passes=-1)


# ------------------------------------------------------------------ imp_patience (issue 14 item 4)
def test_validation_imputation_nmse_hand_worked():
    """With a zero-initialised cascade (the identity) a hidden slot is imputed by the encoder's absent
    fill, so the NMSE is sum ||fill - h||^2 / sum ||h - mean_known h||^2 over the hidden slots, computed
    here directly (two passes, per-modality means) from the same seeded masks."""
    import numpy as np

    from raypipe.train.data import simulate_missing

    model = _model(cascade_init="zero")
    x, y = _batch(30)
    full = torch.ones(30, 3, dtype=torch.bool)
    full[:6, 2] = False
    got = model.validation_imputation_nmse([{"x": x, "mask": full, "y": y}], p_drop=0.6, seed=4)
    seen = simulate_missing(full, 0.6, np.random.default_rng([4, 13]))
    model.eval()
    with torch.no_grad():
        h = torch.stack(model.encode(x, full), 1).double()
        fill = torch.stack(model.encode(x, seen), 1).double()
    num = den = 0.0
    for m in range(3):
        hid = (full[:, m] & ~seen[:, m])
        mu = h[full[:, m], m].mean(0)
        num += float(((fill[hid, m] - h[hid, m]) ** 2).sum())
        den += float(((h[hid, m] - mu) ** 2).sum())
    assert int((full & ~seen).sum()) > 0
    assert got == pytest.approx(num / den, rel=1e-6)
    # no hidden slot at all: NaN, not a number that could count as an improvement
    assert model.validation_imputation_nmse([{"x": x, "mask": full, "y": y}], p_drop=0.0, seed=4) != \
        model.validation_imputation_nmse([{"x": x, "mask": full, "y": y}], p_drop=0.0, seed=4)


def test_imp_patience_holds_early_stopping_while_the_cascade_improves(monkeypatch):
    from raypipe.train.loop import HookContext

    model = _model(imp_patience=2, use_tla=False)
    assert _model().early_stop_hold() is False  # off by default: the paper's single early stopping
    values = iter([1.0, 0.9, 0.95, 0.8999, 0.9, float("nan")])  # improve, improve, -, < 0.1 %, -, NaN
    monkeypatch.setattr(model, "validation_imputation_nmse", lambda *a, **k: next(values))
    ctx = HookContext(val_batches=lambda: [], train_batches=lambda: [])
    holds = [model.on_epoch_end(ctx)["imp_hold"] for _ in range(6)]
    assert holds == [True, True, True, False, False, False]
    with pytest.raises(ValueError):
        _model(imp_patience=-1)


def test_the_loop_runs_past_patience_while_the_method_holds():
    import numpy as np

    from raypipe.train.loop import fit

    rng = np.random.default_rng(0)
    x = {s.name: rng.normal(size=(40, *s.shape)).astype(np.float32) for s in SPECS}
    y = rng.integers(0, 2, 40).astype(float)
    mask = np.ones((40, 3), bool)
    runs = []
    for hold_epochs in (0, 6):
        model = _model(use_tla=False)
        model.early_stop_hold = lambda m=model, k=hold_epochs: len(runs_epochs) < k
        runs_epochs = []
        orig = model.on_epoch_end
        model.on_epoch_end = lambda ctx, f=orig: (runs_epochs.append(ctx.epoch), f(ctx))[1]
        res = fit(model, (x, mask, y), (x, mask, y), "binary", epochs=8, patience=1, lr=0.0)  # lr 0: never improves
        runs.append(len(res["history"]))
    assert runs == [2, 6]


def test_the_holds_counters_survive_a_checkpoint(monkeypatch):
    """A resumed run must hold as the uninterrupted one would: the counters travel in extra_state."""
    from raypipe.train.loop import HookContext

    values = iter([1.0, 0.9, 0.95, 0.96])  # improve, improve, -, -: with imp_patience 2 the 4th releases
    ctx = HookContext(val_batches=lambda: [], train_batches=lambda: [])
    model = _model(imp_patience=2, use_tla=False)
    monkeypatch.setattr(model, "validation_imputation_nmse", lambda *a, **k: next(values))
    assert [model.on_epoch_end(ctx)["imp_hold"] for _ in range(3)] == [True, True, True]
    resumed = _model(imp_patience=2, use_tla=False)
    resumed.load_extra_state(model.extra_state())
    monkeypatch.setattr(resumed, "validation_imputation_nmse", lambda *a, **k: next(values))
    assert resumed.on_epoch_end(ctx)["imp_hold"] is False  # a fresh counter would still hold here
    assert "imp_since" not in _model().extra_state()  # off: the checkpoint is unchanged

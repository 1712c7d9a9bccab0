"""Every registered method: shapes for every task, the training hooks, and learning on easy data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raypipe.config import TrainConfig
from raypipe.fusion.base import ModalitySpec
from raypipe.fusion.baselines import PMR, GBlend, MetaFusion, OGMGE
from raypipe.fusion.registry import REGISTRY, build_method, list_methods
from raypipe.train import loop
from raypipe.train.loop import HookContext

SPECS = [ModalitySpec("img", (6,)), ModalitySpec("ehr", (4, 3)), ModalitySpec("txt", (5,))]
TASKS = {"binary": 2, "multiclass": 3, "multilabel": 2, "regression": 1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


def _labels(task, n, g):
    if task == "binary":
        return torch.randint(0, 2, (n,), generator=g).float()
    if task == "multiclass":
        return torch.randint(0, 3, (n,), generator=g)
    if task == "multilabel":
        return torch.randint(0, 2, (n, 2), generator=g).float()
    return torch.randn(n, generator=g)


def test_registry_has_omnifuse_and_thirteen_baselines():
    from raypipe.fusion.baselines import BASELINES

    assert len(BASELINES) == 13 and set(BASELINES) | {"omnifuse"} <= set(REGISTRY)
    regression = {i.name for i in list_methods(task="regression")}
    assert (set(BASELINES) | {"omnifuse"}) - regression == {"pmr"}
    with pytest.raises(ValueError, match="unknown fusion method"):
        build_method("nope", SPECS, "binary", 2)
    with pytest.raises(ValueError, match="not accepted"):
        build_method("concat", SPECS, "binary", 2, TrainConfig(method_args={"rho": 1}))


def test_declared_hooks_are_the_overridden_ones():
    from raypipe.fusion.base import FusionMethod

    for name, cls in REGISTRY.items():
        overridden = {h for h in ("on_epoch_start", "on_after_backward", "on_epoch_end")
                      if getattr(cls, h) is not getattr(FusionMethod, h)}
        assert set(cls.info.hooks) == overridden, name
        assert cls.info.name == name


def test_tensor_fusion_stays_small_for_many_modalities():
    specs = [ModalitySpec(f"m{i}", (3,)) for i in range(7)]
    model = build_method("tensor", specs, "binary", 2, TrainConfig(hidden_dim=4))
    assert model.head[0].in_features <= 100_000
    x = {s.name: torch.randn(3, 3) for s in specs}
    out = model({"x": x, "mask": torch.ones(3, 7, dtype=torch.bool), "y": torch.tensor([0.0, 1.0, 1.0])})
    assert out["logits"].shape == (3, 2)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_shapes_and_one_training_step(name, task):
    if task not in REGISTRY[name].info.tasks:
        with pytest.raises(ValueError, match="does not support"):
            build_method(name, SPECS, task, TASKS[task], TrainConfig(hidden_dim=8))
        return
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = build_method(name, SPECS, task, TASKS[task], TrainConfig(hidden_dim=8, omnifuse={"depth": 2}))
    n = 10
    x = {s.name: torch.randn((n, *s.shape), generator=g) for s in SPECS}
    mask = torch.rand(n, 3, generator=g) > 0.3
    mask[:, 0] = True
    y = _labels(task, n, g)
    batch = {"x": x, "mask": mask, "y": y}
    ctx = HookContext(train_batches=lambda: [batch], val_batches=lambda: [batch])
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(2):  # second epoch exercises state set by the first epoch's hooks
        stats = loop.train_epoch(model, [batch], opt, ctx, epoch)
        assert math.isfinite(stats["loss"])
    out = model.predict_with_trace(x, mask)
    assert out["probabilities"].shape == (n, TASKS[task])
    if task in ("binary", "multiclass"):
        torch.testing.assert_close(out["probabilities"].sum(1), torch.ones(n), atol=1e-4, rtol=0)


def test_ogm_ge_scales_only_the_dominant_modality():
    s = torch.tensor([30.0, 10.0])  # modality 0 dominates
    coef = OGMGE.modulation(s, alpha=0.5)
    rho = 30.0 / 10.0
    assert coef[0] == pytest.approx(1 - math.tanh(0.5 * (rho - 1)))
    assert coef[1] == 1.0
    # gradients: the weaker encoder's are untouched, the dominant's scaled by the coefficient
    torch.manual_seed(0)
    model = OGMGE([ModalitySpec("a", (4,)), ModalitySpec("b", (4,))], "binary", 2, hidden_dim=8, noise=False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.scores = s.double()
    model.on_after_backward(HookContext())
    k = 1 - math.tanh(0.5 * (rho - 1))
    assert all(torch.allclose(p.grad, torch.full_like(p, k)) for p in model.encoders["a"].parameters())
    assert all(torch.all(p.grad == 1.0) for p in model.encoders["b"].parameters())
    assert all(torch.all(p.grad == 1.0) for p in model.W.parameters())  # only encoders are modulated


def test_ogm_ge_scores_come_from_the_batch():
    torch.manual_seed(0)
    model = OGMGE([ModalitySpec("a", (4,)), ModalitySpec("b", (4,))], "binary", 2, hidden_dim=8)
    g = torch.Generator().manual_seed(0)
    x = {"a": torch.randn(6, 4, generator=g), "b": torch.randn(6, 4, generator=g)}
    y = torch.tensor([0, 1, 1, 0, 1, 0]).float()
    model.eval()
    model({"x": x, "mask": torch.ones(6, 2, dtype=torch.bool), "y": y})
    hs = model.encode(x, torch.ones(6, 2, dtype=torch.bool))
    for i, m in enumerate("ab"):
        p = (model.W[m](hs[i]) + model.bias / 2).softmax(-1)
        assert model.scores[i].item() == pytest.approx(p[torch.arange(6), y.long()].sum().item(), rel=1e-5)


def test_ogm_ge_replicas_stay_identical_under_ddp():
    """Two workers with different local scores but (DDP-averaged) identical gradients must apply the
    same coefficient and the same noise: the scores are all-reduced, the noise seed is shared."""
    specs = [ModalitySpec("a", (4,)), ModalitySpec("b", (4,))]
    local = [torch.tensor([9.0, 3.0], dtype=torch.float64), torch.tensor([4.0, 6.0], dtype=torch.float64)]
    total = local[0] + local[1]
    grads = []
    for worker in range(2):
        torch.manual_seed(0)
        model = OGMGE(specs, "binary", 2, hidden_dim=8, noise=True)
        for p in model.parameters():
            p.grad = torch.linspace(-1, 1, p.numel()).view_as(p).clone()
        model.scores = local[worker]
        ctx = HookContext(all_reduce=lambda t: total.clone(), seed=3, epoch=1)
        model.on_after_backward(ctx)
        assert model.coefficients == OGMGE.modulation(total, 0.5)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert OGMGE.modulation(total, 0.5)[0] < 1.0  # modality a dominates globally: it was modulated
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)


def test_ogm_ge_noise_has_the_gradient_std():
    torch.manual_seed(0)
    model = OGMGE([ModalitySpec("a", (64,)), ModalitySpec("b", (4,))], "binary", 2, hidden_dim=64, noise=True)
    w = model.encoders["a"].net[0].weight
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 3.0
    before = w.grad.clone()
    model.scores = torch.tensor([2.0, 1.0], dtype=torch.float64)
    k = 1 - math.tanh(0.5 * (2.0 - 1))
    model.on_after_backward(HookContext())
    noise = w.grad - before * k
    assert noise.std().item() == pytest.approx((before * k).std().item(), rel=0.1)


def test_gblend_weights_sum_to_one_and_follow_the_rule():
    prev_tr, prev_va = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.2, 1.2, 1.2])
    tr, va = torch.tensor([0.8, 0.85, 0.5]), torch.tensor([1.0, 1.1, 1.15])
    w = GBlend.blend_weights(prev_tr, prev_va, tr, va)
    assert w.sum().item() == pytest.approx(1.0)
    d_g = prev_va - va
    d_o = ((va - tr) - (prev_va - prev_tr)).abs()
    expected = d_g / d_o**2
    torch.testing.assert_close(w, (expected / expected.sum()).to(w.dtype))
    # no generalisation gain anywhere: uniform weights
    w = GBlend.blend_weights(prev_tr, prev_va, tr, prev_va + 1)
    torch.testing.assert_close(w, torch.full((3,), 1 / 3))


@pytest.mark.parametrize("name", ["omnifuse", "concat"])
def test_fit_learns_an_easy_signal(name):
    rng = np.random.default_rng(0)
    n = 300
    z = rng.standard_normal(n)
    y = (z > 0).astype(float)
    x = {"img": (z[:, None] * np.ones(6) + 0.3 * rng.standard_normal((n, 6))).astype(np.float32),
         "ehr": rng.standard_normal((n, 4, 3)).astype(np.float32),
         "txt": (z[:, None] + 0.5 * rng.standard_normal((n, 5))).astype(np.float32)}
    mask = rng.random((n, 3)) > 0.2
    mask[:, 0] |= ~mask.any(1)
    tr, va = slice(0, 220), slice(220, n)
    split = lambda s: ({k: v[s] for k, v in x.items()}, mask[s], y[s])  # noqa: E731
    torch.manual_seed(0)
    model = build_method(name, SPECS, "binary", 2, TrainConfig(hidden_dim=16, omnifuse={"depth": 2}))
    res = loop.fit(model, split(tr), split(va), "binary", epochs=6, batch_size=32, lr=3e-3)
    assert res["best_val"] > 0.85
    if name == "omnifuse":
        assert all(len(h["train_tla"]["d"]) == 7 for h in res["history"])  # the trace: every d_S, every epoch


def _easy_batches(n=64, seed=0, specs=SPECS):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g)
    x = {s.name: torch.randn((n, *s.shape), generator=g) + z.view(-1, *([1] * len(s.shape))) for s in specs}
    mask = torch.ones(n, len(specs), dtype=torch.bool)
    return [{"x": x, "mask": mask, "y": (z > 0).float()}]


def test_gblend_weights_re_estimated_in_training_sum_to_one():
    torch.manual_seed(0)
    model = GBlend(SPECS, "binary", 2, hidden_dim=8, gb_epoch=1)
    train, val = _easy_batches(64, 0), _easy_batches(32, 1)
    ctx = HookContext(train_batches=lambda: train, val_batches=lambda: val)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    uniform = torch.full((4,), 0.25)
    traces = [loop.train_epoch(model, train, opt, ctx, e).get("gblend_weights") for e in range(4)]
    assert traces[0] is not None and model.blend.shape == (4,)  # 3 unimodal heads + the fused head
    assert model.blend.sum().item() == pytest.approx(1.0) and (model.blend >= 0).all()
    assert not torch.allclose(model.blend, uniform)  # re-estimated from the measured losses


def test_pmr_prototypes_are_class_means_then_momentum():
    torch.manual_seed(0)
    model = PMR(SPECS, "binary", 2, hidden_dim=8, momentum=0.2)
    batches = _easy_batches(40, 0)
    ctx = HookContext(train_batches=lambda: batches)
    model.on_epoch_start(ctx)
    model.eval()
    b = batches[0]
    hs = model.encode(b["x"], b["mask"])
    for i in range(3):
        for k in range(2):
            torch.testing.assert_close(model.prototypes[i, k], hs[i][b["y"] == k].mean(0), atol=1e-5, rtol=1e-4)
    old = model.prototypes.clone()
    with torch.no_grad():  # move the encoders: new class means
        for p in model.encoders.parameters():
            p.add_(0.05)
    model.on_epoch_start(ctx)
    hs = model.encode(b["x"], b["mask"])
    new_mean = torch.stack([torch.stack([h[b["y"] == k].mean(0) for k in range(2)]) for h in hs])
    torch.testing.assert_close(model.prototypes, 0.2 * old + 0.8 * new_mean, atol=1e-5, rtol=1e-4)


def test_metafusion_has_one_student_per_subset_and_a_normalised_ensemble():
    torch.manual_seed(0)
    model = MetaFusion(SPECS, "binary", 2, hidden_dim=8)
    assert len(model.students) == 7
    batches = _easy_batches(40, 0)
    trace = model.on_epoch_end(HookContext(val_batches=lambda: batches))
    assert len(trace["metafusion_val_losses"]) == 7
    assert model.ensemble.sum().item() == pytest.approx(1.0)
    losses = torch.tensor(trace["metafusion_val_losses"])
    assert int(model.ensemble.argmax()) == int(losses.argmin())


# ----------------------------------------------------------------------------- behavioural tests, one+ per baseline
# Each expected value below is worked out by hand (numbers in the comments), a closed form, or a
# property that breaks when the method's distinctive part is removed. Where the fusion rule is what is
# tested, the encoders are bypassed: ``model.encode`` is replaced by fixed h_m and layers are set by hand.
from raypipe.fusion.baselines import (CLUB, Attention, Concat, DisentangledDenseFusion, Late, MedFuse, SEGate,  # noqa: E402
                                      Sum, TensorFusion, TransformerFusion)

SPECS2 = [ModalitySpec("a", (2,)), ModalitySpec("b", (2,))]


def _set_linear(layer, weight, bias=None):
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        if layer.bias is not None:
            layer.bias.copy_(torch.zeros_like(layer.bias) if bias is None else torch.as_tensor(bias, dtype=torch.float32))


def _fixed(model, *hs):
    """Bypass the encoders: the fusion rule sees exactly these h_m."""
    model.encode = lambda x, mask: [torch.as_tensor(h, dtype=torch.float32) for h in hs]
    model.eval()
    return model


def _dummy_x(specs, n):
    return {s.name: torch.zeros((n, *s.shape)) for s in specs}


def _xor_data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
    y = ((a[:, 0] > 0) ^ (b[:, 0] > 0)).float()  # each modality alone carries no information about y
    return {"x": {"a": a, "b": b}, "mask": torch.ones(n, 2, dtype=torch.bool), "y": y}


def _train_accuracy(model, batch, steps=250, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        p = model.predict_with_trace(batch["x"], batch["mask"])["probabilities"][:, 1]
    return float(((p > 0.5).float() == batch["y"]).float().mean())


def test_concat_learns_a_cross_modal_interaction_that_late_fusion_cannot():
    """y = XOR of one sign per modality: a joint head over the concatenation fits it; decision-level
    averaging of unimodal probabilities cannot (each modality alone is at chance: its best p is 0.5)."""
    batch = _xor_data()
    torch.manual_seed(0)
    assert _train_accuracy(Concat(SPECS2, "binary", 2, hidden_dim=16), batch) > 0.9
    torch.manual_seed(0)
    assert _train_accuracy(Late(SPECS2, "binary", 2, hidden_dim=16), batch) < 0.7


def test_late_averages_the_available_modalities_probabilities():
    specs = SPECS2 + [ModalitySpec("c", (2,))]
    model = Late(specs, "binary", 2, hidden_dim=2).eval()
    # unimodal logits: a -> p = (.25, .75); b -> (.5, .5); c -> (.75, .25)
    uni = [torch.tensor([[0.0, math.log(3)]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])]
    model._uni = lambda x, mask: uni
    x = _dummy_x(specs, 1)
    two = model.predict_with_trace(x, torch.tensor([[True, True, False]]))["probabilities"]
    torch.testing.assert_close(two, torch.tensor([[0.375, 0.625]]))  # (.25 + .5) / 2, c absent: not averaged in
    three = model.predict_with_trace(x, torch.tensor([[True, True, True]]))["probabilities"]
    torch.testing.assert_close(three, torch.tensor([[0.5, 0.5]]))  # (.25 + .5 + .75) / 3
    # training loss: mean over the available modalities of their own CE; y = 1: (-ln .75 + ln 2) / 2
    out = model({"x": x, "mask": torch.tensor([[True, True, False]]), "y": torch.tensor([1.0])})
    assert out["loss"].item() == pytest.approx(0.4904146, abs=1e-5)


def test_sum_depends_only_on_the_projected_sum():
    model = Sum(SPECS2, "binary", 2, hidden_dim=2)
    _set_linear(model.proj["a"], [[1, 0], [0, 1]])
    _set_linear(model.proj["b"], [[2, 0], [0, 2]])
    _set_linear(model.head[0], [[1, 0], [0, 1]])
    _set_linear(model.head[3], [[1, 0], [0, 1]])
    x, mask = _dummy_x(SPECS2, 1), torch.ones(1, 2, dtype=torch.bool)
    # z = h_a + 2 h_b = (1, -3) + (1, 2) = (2, -1); relu -> (2, 0)
    torch.testing.assert_close(_fixed(model, [[1.0, -3.0]], [[0.5, 1.0]]).predict_logits(x, mask), torch.tensor([[2.0, 0.0]]))
    # another pair with the same projected sum gives the same output: (3, -1) + 2 (-0.5, 0) = (2, -1)
    torch.testing.assert_close(_fixed(model, [[3.0, -1.0]], [[-0.5, 0.0]]).predict_logits(x, mask), torch.tensor([[2.0, 0.0]]))


def test_se_gate_closed_gate_removes_a_modality_and_half_gate_halves_it():
    model = SEGate(SPECS2, "binary", 2, hidden_dim=4)
    x, mask = _dummy_x(SPECS2, 1), torch.ones(1, 2, dtype=torch.bool)
    h_b = [[1.0, -1.0, 0.5, 2.0]]
    _set_linear(model.excite["a"], torch.zeros(4, model.excite["a"].in_features), [-60.0] * 4)  # sigmoid -> 0
    _set_linear(model.excite["b"], torch.zeros(4, model.excite["b"].in_features), [60.0] * 4)  # sigmoid -> 1
    one = _fixed(model, [[1.0, 2.0, 3.0, 4.0]], h_b).predict_logits(x, mask)
    other = _fixed(model, [[-7.0, 5.0, 0.0, 9.0]], h_b).predict_logits(x, mask)
    torch.testing.assert_close(one, other)  # a's gate is closed: h_a cannot reach the head
    # gate = sigmoid(0) = 1/2; a head that reads h_a' (0.5 h_a) through identity rows: logits = relu(0.5 h_a[:2])
    _set_linear(model.excite["a"], torch.zeros(4, model.excite["a"].in_features), [0.0] * 4)
    _set_linear(model.head[0], torch.cat([torch.eye(4), torch.zeros(4, 4)], 1))
    _set_linear(model.head[3], [[1, 0, 0, 0], [0, 1, 0, 0]])
    torch.testing.assert_close(_fixed(model, [[2.0, 4.0, 6.0, 8.0]], h_b).predict_logits(x, mask),
                               torch.tensor([[1.0, 2.0]]))


def test_attention_weights_are_a_softmax_over_the_available_modalities():
    specs = SPECS2 + [ModalitySpec("c", (2,))]
    model = Attention(specs, "binary", 2, hidden_dim=2)
    _set_linear(model.W, [[1, 0], [0, 1]])
    _set_linear(model.u, [[math.log(3), 0.0]])
    _set_linear(model.head[0], [[1, 0], [0, 1]])
    _set_linear(model.head[3], [[1, 0], [0, 1]])
    _fixed(model, [[0.0, 5.0]], [[20.0, 0.0]], [[20.0, 0.0]])
    # scores: a: ln3 * tanh(0) = 0, b: ln3 * tanh(20) = ln3; c absent -> weights (1/4, 3/4, 0)
    out = model({"x": _dummy_x(specs, 1), "mask": torch.tensor([[True, True, False]]), "y": None})
    torch.testing.assert_close(out["attention"], torch.tensor([[0.25, 0.75, 0.0]]))
    # fused z = 1/4 (0, 5) + 3/4 (20, 0) = (15, 1.25); identity head with relu
    torch.testing.assert_close(out["logits"], torch.tensor([[15.0, 1.25]]))


def test_transformer_ignores_masked_tokens_and_its_modality_embeddings_break_permutation_symmetry():
    specs = SPECS2 + [ModalitySpec("c", (2,))]
    torch.manual_seed(0)
    model = TransformerFusion(specs, "binary", 2, hidden_dim=8, heads=2)
    x = _dummy_x(specs, 2)
    g = torch.Generator().manual_seed(0)
    ha, hb, hc, hc2 = (torch.randn(2, 8, generator=g) for _ in range(4))
    partial = torch.tensor([[True, True, False]] * 2)
    out1 = _fixed(model, ha, hb, hc).predict_logits(x, partial)
    out2 = _fixed(model, ha, hb, hc2).predict_logits(x, partial)
    torch.testing.assert_close(out1, out2)  # c is masked out of attention and out of the pooled mean
    full = torch.ones(2, 3, dtype=torch.bool)
    assert not torch.allclose(_fixed(model, ha, hb, hc).predict_logits(x, full),
                              _fixed(model, ha, hb, hc2).predict_logits(x, full))
    # without modality embeddings, a Transformer with mean pooling is symmetric in its tokens: swapping
    # two modalities' encodings changes nothing; with the (learned) embeddings it does
    swapped = lambda: _fixed(model, hb, ha, hc).predict_logits(x, full)  # noqa: E731
    straight = lambda: _fixed(model, ha, hb, hc).predict_logits(x, full)  # noqa: E731
    assert not torch.allclose(straight(), swapped(), atol=1e-5)
    with torch.no_grad():
        model.modality_embedding.zero_()
    torch.testing.assert_close(straight(), swapped(), atol=1e-5, rtol=1e-5)


def test_tensor_fusion_represents_the_product_of_two_modalities_and_keeps_the_unimodal_skip():
    model = TensorFusion(SPECS2, "binary", 2, hidden_dim=2)
    r = model.reduce["a"].out_features  # 16: z_m = [1; r_m] has 17 entries, flatten(outer) index = i * 17 + j
    pick_first = torch.zeros(r, 2)
    pick_first[0, 0] = 1.0
    _set_linear(model.reduce["a"], pick_first)
    _set_linear(model.reduce["b"], pick_first)
    w1 = torch.zeros(model.head[0].out_features, (r + 1) ** 2)
    w1[0, 1 * (r + 1) + 1] = 1.0  # the entry a_0 * b_0 of the outer product
    _set_linear(model.head[0], w1)
    w2 = torch.zeros(2, model.head[0].out_features)
    w2[1, 0] = 1.0
    _set_linear(model.head[3], w2)
    _set_linear(model.uni["a"], torch.zeros(2, 2))
    _set_linear(model.uni["b"], torch.zeros(2, 2))
    x, mask = _dummy_x(SPECS2, 3), torch.ones(3, 2, dtype=torch.bool)
    a = [[2.0, 0.0], [-2.0, 0.0], [-2.0, 0.0]]
    b = [[3.0, 0.0], [-3.0, 0.0], [3.0, 0.0]]
    # logit_1 = relu(a0 * b0): 6, 6, 0 (a sum of per-modality terms cannot give 6, 6 and 0 here)
    torch.testing.assert_close(_fixed(model, a, b).predict_logits(x, mask)[:, 1], torch.tensor([6.0, 6.0, 0.0]))
    _set_linear(model.uni["a"], [[0, 0], [0, 1]])  # skip connection: + a_1 on logit 1
    a[2][1] = 5.0
    torch.testing.assert_close(_fixed(model, a, b).predict_logits(x, mask)[:, 1], torch.tensor([6.0, 6.0, 5.0]))


def test_club_bound_hand_worked():
    """q(s|u) = N(u, 1) (mu = identity through ReLU on positive u, logvar = tanh(0) = 0) and s = u = (1, 2, 3):
    positive terms are 0; negative_i = -mean_j (u_j - u_i)^2 / 2 = -5/6, -1/3, -5/6; bound = mean = 2/3."""
    club = CLUB(1)
    _set_linear(club.mu[0], [[1.0]])
    _set_linear(club.mu[2], [[1.0]])
    _set_linear(club.logvar[2], [[0.0]])
    u = torch.tensor([[1.0], [2.0], [3.0]])
    assert club.upper_bound(u, u.clone()).item() == pytest.approx(2 / 3, abs=1e-6)
    # s independent of u and q blind to u (mu = constant 0): positive and negative terms agree -> 0
    _set_linear(club.mu[2], [[0.0]])
    s = torch.tensor([[0.5], [-1.0], [2.0]])
    assert club.upper_bound(u, s).item() == pytest.approx(0.0, abs=1e-6)


def _ddf_grads(lambda_mi):
    torch.manual_seed(0)
    model = DisentangledDenseFusion(SPECS2, "binary", 2, hidden_dim=8, lambda_mi=lambda_mi)
    model.eval()  # no dropout: the two runs differ only by lambda_mi
    g = torch.Generator().manual_seed(1)
    batch = {"x": {"a": torch.randn(16, 2, generator=g), "b": torch.randn(16, 2, generator=g)},
             "mask": torch.ones(16, 2, dtype=torch.bool), "y": torch.randint(0, 2, (16,), generator=g).float()}
    model(batch)["loss"].backward()
    return ({n: p.grad.clone() for n, p in model.club.named_parameters()},
            {n: p.grad.clone() for n, p in model.specific.named_parameters()})


def test_ddf_club_network_is_fitted_by_its_likelihood_only_and_encoders_by_the_bound():
    q0, spec0 = _ddf_grads(0.0)
    q1, spec1 = _ddf_grads(1.0)
    # the bound's weight must not change q's gradient: q sees only its own log-likelihood
    for n in q0:
        torch.testing.assert_close(q0[n], q1[n], rtol=0, atol=0, msg=n)
    assert any(q0[n].abs().sum() > 0 for n in q0)  # q is being fitted
    # ... while the specific encoders do feel the bound
    assert any(not torch.allclose(spec0[n], spec1[n]) for n in spec0)


def test_gblend_weights_hand_worked():
    # k=0: dG = 1.2 - 1.0 = 0.2, gap 0.2 -> 0.4, dO = 0.2: 0.2 / 0.04 = 5
    # k=1: dG = 0.2, gap 0.2 -> 0.1, dO = 0.1: 0.2 / 0.01 = 20     -> normalised (0.2, 0.8)
    w = GBlend.blend_weights(torch.tensor([1.0, 1.0]), torch.tensor([1.2, 1.2]),
                             torch.tensor([0.6, 0.9]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(w, torch.tensor([0.2, 0.8]))


def test_gblend_zero_weight_heads_get_no_gradient():
    torch.manual_seed(0)
    model = GBlend(SPECS2, "binary", 2, hidden_dim=4)
    model.blend.copy_(torch.tensor([0.0, 0.0, 1.0]))  # all weight on the fused head
    model(_easy_batches(16, 0, SPECS2)[0])["loss"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.uni.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.fused.parameters())


def test_ogm_ge_modulation_hand_worked_three_modalities():
    # s = (6, 2, 2): rho_0 = 6 / 2 = 3 -> 1 - tanh(0.5 * 2) = 1 - tanh(1) = 0.2384058;
    # rho_1 = rho_2 = 2 / 4 = 0.5 < 1 -> unmodulated
    coef = OGMGE.modulation(torch.tensor([6.0, 2.0, 2.0]), alpha=0.5)
    assert coef[0] == pytest.approx(0.2384058, abs=1e-6)
    assert coef[1] == 1.0 and coef[2] == 1.0


def _pmr_loss(alpha, mu, epoch):
    """Two modalities, 1-d features, prototypes c_0 = 0, c_1 = 1 in each; two samples of class 0 with
    h_a = 0 (p_a = softmax(0, -1) = (.7311, .2689): dominant) and h_b = 1 (p_b = (.2689, .7311): weaker)."""
    torch.manual_seed(0)
    specs = [ModalitySpec("a", (1,)), ModalitySpec("b", (1,))]
    model = PMR(specs, "binary", 2, hidden_dim=1, alpha=alpha, entropy_weight=mu, entropy_epochs=3)
    with torch.no_grad():
        model.prototypes.copy_(torch.tensor([[[0.0], [1.0]], [[0.0], [1.0]]]))
        model.initialised.fill_(True)
    model.epoch = epoch
    _fixed(model, [[0.0], [0.0]], [[1.0], [1.0]])
    out = model({"x": _dummy_x(specs, 2), "mask": torch.ones(2, 2, dtype=torch.bool), "y": torch.tensor([0.0, 0.0])})
    return out["loss"].item()


def test_pmr_prototype_ce_on_the_weaker_and_entropy_regulariser_on_the_dominant_modality():
    base = _pmr_loss(alpha=0.0, mu=0.0, epoch=0)
    # PCE on b only: -ln(0.2689414) = 1.3132617
    assert _pmr_loss(alpha=1.0, mu=0.0, epoch=0) - base == pytest.approx(1.3132617, abs=1e-5)
    # PER on a only, subtracted: H(.7311, .2689) = 0.5822031; mu = 0.1 -> -0.0582203
    assert _pmr_loss(alpha=0.0, mu=0.1, epoch=0) - base == pytest.approx(-0.05822031, abs=1e-6)
    # PER is an early-training term: off from epoch entropy_epochs (3) on
    assert _pmr_loss(alpha=0.0, mu=0.1, epoch=3) - base == pytest.approx(0.0, abs=1e-7)


def test_pmr_entropy_regulariser_pushes_the_dominant_features_towards_uncertainty():
    """dH/dh_a at h_a = 0 (between prototypes 0 and 1, nearer 0): moving towards 0.5 raises the entropy,
    so with PER the loss gradient on h_a is negative (gradient descent moves h_a up towards 0.5)."""
    specs = [ModalitySpec("a", (1,)), ModalitySpec("b", (1,))]
    model = PMR(specs, "binary", 2, hidden_dim=1, alpha=0.0, entropy_weight=1.0)
    with torch.no_grad():
        model.prototypes.copy_(torch.tensor([[[0.0], [1.0]], [[0.0], [1.0]]]))
        model.initialised.fill_(True)
    h_a = torch.tensor([[0.1]], requires_grad=True)
    model.encode = lambda x, mask: [h_a, torch.tensor([[1.0]])]
    model.head.requires_grad_(False)
    with torch.no_grad():
        for p in model.head.parameters():
            p.zero_()  # the task loss no longer depends on h_a: only PER does
    model.eval()
    model({"x": _dummy_x(specs, 1), "mask": torch.ones(1, 2, dtype=torch.bool), "y": torch.tensor([0.0])})["loss"].backward()
    assert h_a.grad.item() < 0


def test_medfuse_reads_only_the_available_modalities():
    specs = SPECS2 + [ModalitySpec("c", (2,))]
    torch.manual_seed(0)
    model = MedFuse(specs, "binary", 2, hidden_dim=4, lstm_hidden=8)
    x = _dummy_x(specs, 2)
    g = torch.Generator().manual_seed(0)
    ha, hb, hb2, hc = (torch.randn(2, 4, generator=g) for _ in range(4))
    gap = torch.tensor([[True, False, True]] * 2)
    torch.testing.assert_close(_fixed(model, ha, hb, hc).predict_logits(x, gap),
                               _fixed(model, ha, hb2, hc).predict_logits(x, gap))
    full = torch.ones(2, 3, dtype=torch.bool)
    assert not torch.allclose(_fixed(model, ha, hb, hc).predict_logits(x, full),
                              _fixed(model, ha, hb2, hc).predict_logits(x, full))
    # the sequence is [a, c] (c moved next to a), so its last step is c: changing c changes the output
    assert not torch.allclose(_fixed(model, ha, hb, hc).predict_logits(x, gap),
                              _fixed(model, ha, hb, hb2).predict_logits(x, gap))


def test_metafusion_mutual_learning_term_hand_worked():
    """Three students with p = (.5, .5), (.25, .75), (.5, .5). Student i's term is the mean over the others of
    KL(p_j || p_i): KL((.25,.75)||(.5,.5)) = 0.1308120, KL((.5,.5)||(.25,.75)) = 0.1438410.
    Sum = 0.1308120/2 + 0.1438410 + 0.1308120/2 = 0.2746531; rho = 0.5 adds 0.1373265."""
    def loss(rho):
        model = MetaFusion(SPECS2, "binary", 2, hidden_dim=2, rho=rho)
        lg = [torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3)]]), torch.tensor([[0.0, 0.0]])]
        model._student_logits = lambda x, mask: lg
        return model({"x": _dummy_x(SPECS2, 1), "mask": torch.ones(1, 2, dtype=torch.bool),
                      "y": torch.tensor([1.0])})["loss"].item()

    assert loss(0.5) - loss(0.0) == pytest.approx(0.1373265, abs=1e-6)


def test_metafusion_prediction_is_the_weighted_ensemble():
    model = MetaFusion(SPECS2, "binary", 2, hidden_dim=2)
    lg = [torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3)]]), torch.tensor([[math.log(3), 0.0]])]
    model._student_logits = lambda x, mask: lg
    model.ensemble.copy_(torch.tensor([0.0, 0.5, 0.5]))  # (.25, .75) and (.75, .25) in equal parts
    p = model.predict_with_trace(_dummy_x(SPECS2, 1), torch.ones(1, 2, dtype=torch.bool))["probabilities"]
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.5]]))

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
    assert len(REGISTRY) == 14 and "omnifuse" in REGISTRY
    assert {i.name for i in list_methods(task="regression")} == set(REGISTRY) - {"pmr"}
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

"""Every registered method: shapes for every task, the training hooks, and learning on easy data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raypipe.config import TrainConfig
from raypipe.fusion.base import ModalitySpec
from raypipe.fusion.baselines import GBlend, OGMGE
from raypipe.fusion.registry import REGISTRY, build_method, list_methods
from raypipe.train import loop
from raypipe.train.loop import HookContext

SPECS = [ModalitySpec("img", (6,)), ModalitySpec("ehr", (4, 3)), ModalitySpec("txt", (5,))]
TASKS = {"binary": 2, "multiclass": 3, "multilabel": 2, "regression": 1}


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
    model.coefficients = {0: 0.25, 1: 1.0}
    model.on_after_backward(HookContext())
    assert all(torch.all(p.grad == 0.25) for p in model.encoders["a"].parameters())
    assert all(torch.all(p.grad == 1.0) for p in model.encoders["b"].parameters())


def test_ogm_ge_noise_has_the_gradient_std():
    torch.manual_seed(0)
    model = OGMGE([ModalitySpec("a", (64,)), ModalitySpec("b", (4,))], "binary", 2, hidden_dim=64, noise=True)
    w = model.encoders["a"].net[0].weight
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 3.0
    before = w.grad.clone()
    model.coefficients = {0: 0.5, 1: 1.0}
    model.on_after_backward(HookContext())
    noise = w.grad - before * 0.5
    assert noise.std().item() == pytest.approx((before * 0.5).std().item(), rel=0.1)


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
    n = 400
    z = rng.standard_normal(n)
    y = (z > 0).astype(float)
    x = {"img": (z[:, None] * np.ones(6) + 0.3 * rng.standard_normal((n, 6))).astype(np.float32),
         "ehr": rng.standard_normal((n, 4, 3)).astype(np.float32),
         "txt": (z[:, None] + 0.5 * rng.standard_normal((n, 5))).astype(np.float32)}
    mask = rng.random((n, 3)) > 0.2
    mask[:, 0] |= ~mask.any(1)
    tr, va = slice(0, 300), slice(300, n)
    split = lambda s: ({k: v[s] for k, v in x.items()}, mask[s], y[s])  # noqa: E731
    torch.manual_seed(0)
    model = build_method(name, SPECS, "binary", 2, TrainConfig(hidden_dim=16, omnifuse={"depth": 2}))
    res = loop.fit(model, split(tr), split(va), "binary", epochs=8, batch_size=32, lr=3e-3)
    assert res["best_val"] > 0.85
    if name == "omnifuse":
        assert all("tla" in str(h.keys()) or "train_tla" in h for h in res["history"])

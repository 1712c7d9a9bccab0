"""The framework-free loop: hook order, DDP unwrapping, simulation, early stopping, best weights, seeds."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from raypipe.config import TrainConfig
from raypipe.fusion.base import FusionMethod, MethodInfo, ModalitySpec
from raypipe.fusion.registry import build_method
from raypipe.train import loop
from raypipe.train.data import tensor_batches
from raypipe.train.loop import HookContext

SPECS = [ModalitySpec("a", (4,)), ModalitySpec("b", (3,))]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


class Recorder(FusionMethod):
    """A concat head that records what the loop hands it."""

    info = MethodInfo("recorder", "early", hooks=("on_epoch_start", "on_after_backward", "on_epoch_end"))

    def __init__(self, specs, task="binary", n_outputs=2, hidden_dim=4):
        super().__init__(specs, task, n_outputs, hidden_dim)
        self.head = nn.Linear(len(specs) * hidden_dim, n_outputs)
        self.calls: list[str] = []
        self.masks: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, batch, full_mask=None):
        self.calls.append("forward")
        self.masks.append((batch["mask"].clone(), full_mask.clone()))
        logits = self.head(torch.cat(self.encode(batch["x"], batch["mask"]), 1))
        return {"logits": logits, "loss": self.task_loss(logits, batch["y"])}

    def on_epoch_start(self, ctx):
        self.calls.append("start")

    def on_after_backward(self, ctx):
        # gradients exist, the optimizer has not stepped yet
        assert any(p.grad is not None for p in self.parameters())
        self.calls.append("after_backward")

    def on_epoch_end(self, ctx):
        self.calls.append("end")
        return {"reduced": float(ctx.all_reduce(torch.tensor([2.0], dtype=torch.float64)))}


class FakeDDP(nn.Module):
    """What DistributedDataParallel looks like to the loop: forward delegates, ``.module`` holds the method."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.forward_calls = 0

    def forward(self, *args, **kwargs):
        self.forward_calls += 1
        return self.module(*args, **kwargs)


def _arrays(n=80, seed=0, signal=True):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(n)
    y = (z > 0).astype(float)
    x = {"a": (z[:, None] * signal + 0.5 * rng.standard_normal((n, 4))).astype(np.float32),
         "b": rng.standard_normal((n, 3)).astype(np.float32)}
    return x, np.ones((n, 2), bool), y


def test_identity_all_reduce_by_default():
    t = torch.arange(3.0)
    assert HookContext().all_reduce(t) is t


def test_hooks_run_in_order_and_reach_the_module_under_ddp():
    torch.manual_seed(0)
    method = Recorder(SPECS)
    wrapped = FakeDDP(method)
    x, m, y = _arrays(40)
    batches = list(tensor_batches(x, m, y, "binary", 16))
    ctx = HookContext(all_reduce=lambda t: t * 3, p_drop=0.0)
    opt = torch.optim.SGD(method.parameters(), 0.1)
    stats = loop.train_epoch(wrapped, batches, opt, ctx, epoch=0)
    assert wrapped.forward_calls == 3  # the training step goes through the wrapper (DDP's gradient sync)
    assert method.calls == ["start"] + ["forward", "after_backward"] * 3 + ["end"]
    assert stats["reduced"] == 6.0 and stats["samples"] == 40


def test_simulation_only_hides_and_passes_the_truth():
    torch.manual_seed(0)
    method = Recorder(SPECS)
    x, m, y = _arrays(400)
    ctx = HookContext(p_drop=0.5, seed=1)
    loop.train_epoch(method, tensor_batches(x, m, y, "binary", 100), torch.optim.SGD(method.parameters(), 0.1), ctx, 0)
    seen = torch.cat([s for s, _ in method.masks])
    full = torch.cat([f for _, f in method.masks])
    assert full.all() and seen.any(1).all()
    assert abs((~seen).any(1).float().mean().item() - 0.5) < 0.08  # p_drop of samples lose something
    # no simulation at p_drop = 0
    method.masks.clear()
    loop.train_epoch(method, tensor_batches(x, m, y, "binary", 100), torch.optim.SGD(method.parameters(), 0.1),
                     HookContext(p_drop=0.0), 0)
    assert all(torch.equal(s, f) for s, f in method.masks)


def test_early_stopping_and_best_weights(monkeypatch):
    torch.manual_seed(0)
    method = build_method("concat", SPECS, "binary", 2, TrainConfig(hidden_dim=4))
    scripted = iter([0.60, 0.75, 0.70, 0.74, 0.75, 0.99])  # best at epoch 2 (0.75 again is no improvement)
    snapshots = []

    def fake_evaluate(model, batches, task=None):
        snapshots.append(copy.deepcopy(method.state_dict()))
        return {"auroc": next(scripted)}

    monkeypatch.setattr(loop, "evaluate", fake_evaluate)
    res = loop.fit(method, _arrays(80, 0), _arrays(40, 1), "binary", epochs=20, lr=1e-2, patience=3)
    assert len(res["history"]) == 5 and res["best_epoch"] == 2 and res["best_val"] == 0.75
    # the weights kept are those of the best epoch, not the last
    for k, v in method.state_dict().items():
        torch.testing.assert_close(v, snapshots[1][k])
    assert not all(torch.equal(v, snapshots[-1][k]) for k, v in method.state_dict().items())


def test_best_val_is_what_the_kept_model_scores():
    torch.manual_seed(0)
    method = build_method("concat", SPECS, "binary", 2, TrainConfig(hidden_dim=4))
    va = _arrays(40, 1)
    res = loop.fit(method, _arrays(80, 0), va, "binary", epochs=6, lr=1e-2, patience=6)
    again = loop.evaluate(method, tensor_batches(*va, "binary", 512))
    assert again["auroc"] == pytest.approx(res["best_val"])
    assert res["best_val"] == pytest.approx(max(h["val_auroc"] for h in res["history"]))


def test_fit_is_deterministic_in_the_seed():
    runs = []
    for _ in range(2):
        torch.manual_seed(123)  # fit reseeds: outside state must not matter
        method = build_method("omnifuse", SPECS, "binary", 2, TrainConfig(hidden_dim=4, omnifuse={"depth": 1}))
        res = loop.fit(method, _arrays(60, 0), _arrays(30, 1), "binary", epochs=2, batch_size=16, seed=5)
        runs.append([(h["train_loss"], h["val_auroc"], h["train_tla"]["lazy"]) for h in res["history"]])
    assert runs[0] == runs[1]


def test_fit_batches_takes_callables_and_a_config():
    torch.manual_seed(0)
    cfg = TrainConfig(hidden_dim=4, epochs=3, patience=3, lr=1e-2, omnifuse={"depth": 1})
    method = build_method("omnifuse", SPECS, "binary", 2, cfg)
    tr, va = _arrays(60, 0), _arrays(30, 1)
    asked = []

    def train_batches(epoch):
        asked.append(epoch)
        return tensor_batches(*tr, "binary", 20, shuffle=epoch is not None, seed=epoch or 0)

    res = loop.fit_batches(method, train_batches, lambda: tensor_batches(*va, "binary", 64), "binary", cfg)
    assert len(res["history"]) == 3
    assert asked == [0, None, 1, None, 2, None]  # each epoch: its batches, then the hooks' fixed pass
    tla = [h["train_tla"] for h in res["history"]]
    assert all(set(t["d"]) == {"a", "b", "a+b"} and t["lazy"] == max(t["d"], key=t["d"].get) for t in tla)


def test_regression_sets_the_label_variance():
    torch.manual_seed(0)
    method = build_method("omnifuse", SPECS, "regression", 1, TrainConfig(hidden_dim=4, omnifuse={"depth": 1}))
    x, m, _ = _arrays(40)
    y = np.linspace(0, 6, 40)
    loop.fit(method, (x, m, y), (x, m, y), "regression", epochs=1)
    assert float(method.var_y) == pytest.approx(np.var(y), rel=1e-6)


def test_precision_setting_maps_to_autocast_only_on_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert loop.amp_dtype("bf16", cuda) == torch.bfloat16 and loop.amp_dtype("fp16", cuda) == torch.float16
    assert loop.amp_dtype("fp32", cuda) is None
    assert all(loop.amp_dtype(p, cpu) is None for p in ("auto", "bf16", "fp16", "fp32"))  # CPU stays fp32
    with pytest.raises(ValueError):
        TrainConfig(precision="int8")
    # fp16 adds loss scaling; fp32/bf16 do not
    assert loop._Precision(torch.float16, "cpu").scaler is not None and loop._Precision(None, "cpu").scaler is None


def test_fit_on_cpu_ignores_the_precision_setting():
    data, val = _arrays(120, 0), _arrays(40, 1)
    runs = []
    for prec in ("auto", "fp16"):
        torch.manual_seed(7)  # same initial weights
        m = build_method("omnifuse", SPECS, "binary", 2, TrainConfig(hidden_dim=8, omnifuse={"depth": 1}))
        runs.append(loop.fit(m, data, val, "binary", epochs=2, batch_size=50, seed=3, device="cpu",
                             precision=prec)["history"])
    assert [h["train_loss"] for h in runs[0]] == [h["train_loss"] for h in runs[1]]

"""The framework-free training loop: one method, batches in, history out.

Used directly by the tests and the quality benchmark, and per worker by the
Ray Train shell (``raypipe.train.trainer``), which injects a cross-worker
``all_reduce`` and dataset-shard batch iterators into the :class:`HookContext`.
Methods plug in only through the hooks of ``raypipe.fusion.base.FusionMethod``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from raypipe.train import metrics as M
from raypipe.train.data import simulate_missing, tensor_batches

log = logging.getLogger(__name__)


@dataclass
class HookContext:
    """What a method's hooks may use. Identity ``all_reduce`` and local data outside Ray Train."""

    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    world_size: int = 1
    rank: int = 0
    epoch: int = 0
    train_batches: Callable[[], Iterable[dict]] | None = None
    val_batches: Callable[[], Iterable[dict]] | None = None
    p_drop: float = 0.5
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def unwrap(model: torch.nn.Module):
    """The method under a DistributedDataParallel wrapper (hooks live on the method)."""
    return model.module if hasattr(model, "module") else model


def train_epoch(model, batches: Iterable[dict], optimizer, ctx: HookContext, epoch: int | None = None,
                grad_clip: float = 5.0) -> dict[str, Any]:
    """One epoch: missing-pattern simulation, forward (through DDP if wrapped), backward, hooks, step."""
    method = unwrap(model)
    if epoch is not None:
        ctx.epoch = epoch
    method.on_epoch_start(ctx)
    model.train()
    rng = np.random.default_rng([ctx.seed, ctx.epoch, ctx.rank])
    sums: dict[str, float] = {}
    n = 0
    for batch in batches:
        full = batch["mask"]
        seen = simulate_missing(full, ctx.p_drop, rng) if ctx.p_drop > 0 else full
        out = model({"x": batch["x"], "mask": seen, "y": batch["y"]}, full_mask=full)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        method.on_after_backward(ctx)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(method.parameters(), grad_clip)
        optimizer.step()
        b = len(batch["y"])
        n += b
        for k, v in out.items():
            if k == "loss" or k.startswith("loss_"):
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * b
    stats: dict[str, Any] = {k: v / max(n, 1) for k, v in sums.items()}
    stats["samples"] = n
    trace = method.on_epoch_end(ctx)
    if trace:
        stats.update(trace)
    return stats


@torch.no_grad()
def predict_arrays(model, batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) over ``batches`` with the method's prediction path."""
    method = unwrap(model)
    was = method.training
    method.eval()
    ys, ps = [], []
    for b in batches:
        ps.append(method.predict_with_trace(b["x"], b["mask"])["probabilities"].float().cpu().numpy())
        ys.append(b["y"].cpu().numpy())
    method.train(was)
    if not ps:
        return np.zeros(0), np.zeros((0, method.n_outputs))
    return np.concatenate(ys), np.concatenate(ps)


def make_predict_fn(method, task: str, device=None):
    """numpy in, numpy out: ``fn(x: {m: array}, mask: (B, M) bool) -> {"probabilities", "prob_<m>", ...}``."""
    method.eval()

    @torch.no_grad()
    def predict(x: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
        xt = {m: torch.as_tensor(np.ascontiguousarray(v), dtype=torch.float32, device=device) for m, v in x.items()}
        out = method.predict_with_trace(xt, torch.as_tensor(mask, dtype=torch.bool, device=device))
        return {k: v.float().cpu().numpy() if v.dtype.is_floating_point else v.cpu().numpy() for k, v in out.items()}

    return predict


def fit(method, train: tuple, val: tuple, task: str, epochs: int = 30, batch_size: int = 64, lr: float = 1e-3,
        weight_decay: float = 1e-4, p_drop: float = 0.5, patience: int = 8, seed: int = 0) -> dict[str, Any]:
    """Train ``method`` on in-memory ``train=(x, mask, y)``, early-stop on ``val``; keeps the best weights.

    Returns {"history": [...], "best_epoch": int, "best_val": float}.
    """
    torch.manual_seed(seed)
    x_tr, m_tr, y_tr = train
    x_va, m_va, y_va = val
    if task == "regression":
        method.set_label_variance(float(np.var(y_tr)) or 1.0)
    optimizer = torch.optim.AdamW(method.parameters(), lr=lr, weight_decay=weight_decay)
    main = M.main_metric_name(task)
    ctx = HookContext(p_drop=p_drop, seed=seed,
                      train_batches=lambda: tensor_batches(x_tr, m_tr, y_tr, task, 512),
                      val_batches=lambda: tensor_batches(x_va, m_va, y_va, task, 512))
    history, best, best_state, best_epoch, since = [], -np.inf, None, 0, 0
    for epoch in range(epochs):
        stats = train_epoch(method, tensor_batches(x_tr, m_tr, y_tr, task, batch_size, shuffle=True,
                                                   seed=seed * 1000 + epoch), optimizer, ctx, epoch)
        y, p = predict_arrays(method, tensor_batches(x_va, m_va, y_va, task, 512))
        val = M.compute_metrics(task, y, p)
        score = val.get(main, np.nan)
        history.append({"epoch": epoch + 1, **{f"train_{k}": v for k, v in stats.items()},
                        **{f"val_{k}": v for k, v in val.items()}})
        if score > best + 1e-6:
            best, best_epoch, since = score, epoch + 1, 0
            best_state = (copy.deepcopy(method.state_dict()), copy.deepcopy(method.extra_state()))
        else:
            since += 1
            if since >= patience:
                break
    if best_state is not None:
        method.load_state_dict(best_state[0])
        method.load_extra_state(best_state[1])
    return {"history": history, "best_epoch": best_epoch, "best_val": float(best)}

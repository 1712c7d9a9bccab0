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


def identity_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The single-process ``all_reduce``: the sum over one worker is the tensor itself."""
    return tensor


@dataclass
class HookContext:
    """What a method's hooks may use.

    ``all_reduce(t) -> t`` sums a CPU float64 tensor of epoch statistics over all workers and
    returns the sum (every worker gets the same result). It is the identity locally; under DDP the
    wrapper passes a collective (moving the tensor to the backend's device if it must), and every
    worker calls it the same number of times in the same order, because hooks run on every
    worker. ``train_batches()`` / ``val_batches()`` iterate this worker's share of the training
    split (natural masks, fixed order) and of the validation split.
    """

    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = identity_all_reduce
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


def amp_dtype(precision: str, device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (auto/fp32/bf16/fp16) on ``device``; None = plain fp32.

    Mixed precision applies on CUDA only; ``auto`` picks bf16 where the GPU supports it, else fp16.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


class _Precision:
    """Autocast plus (for fp16) loss scaling around one training step; a no-op for fp32."""

    def __init__(self, dtype: torch.dtype | None, device):
        self.dtype = dtype
        self.device_type = torch.device(device).type if device is not None else "cpu"
        self.scaler = torch.amp.GradScaler(self.device_type) if dtype == torch.float16 else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)``, the same numbers: the total
    norm, then the gradients times min(1, max_norm / (norm + 1e-6)). On CPU the multiplication is skipped
    when that factor is 1 (an exact no-op; most steps: OmniFuse's 1.5 M gradients cost ~0.6 ms a step to
    multiply); on an accelerator it always runs, as torch does, so that no step waits for the device."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(grads, 2.0, False, foreach=True)
    if total.device.type == "cpu" and bool(max_norm / (total + 1e-6) >= 1.0):
        return total
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


def stops_early(method, since_best: int, patience: int) -> bool:
    """Early stopping: ``patience`` epochs without a better validation score, unless the method holds it
    (:meth:`FusionMethod.early_stop_hold`, e.g. OmniFuse's ``imp_patience``). One rule for this loop and the
    Ray Train worker."""
    return since_best >= patience and not method.early_stop_hold()


def train_epoch(model, batches: Iterable[dict], optimizer, ctx: HookContext, epoch: int | None = None,
                grad_clip: float = 5.0, precision: str = "auto") -> dict[str, Any]:
    """One epoch: missing-pattern simulation, forward (through DDP if wrapped), backward, hooks, step.

    On CUDA the forward pass runs under autocast (``precision``: see :func:`amp_dtype`; fp16 adds
    loss scaling); on CPU everything is fp32.
    """
    method = unwrap(model)
    if epoch is not None:
        ctx.epoch = epoch
    method.on_epoch_start(ctx)
    model.train()
    rng = np.random.default_rng([ctx.seed, ctx.epoch, ctx.rank])
    sums: dict[str, float] = {}
    n = 0
    amp: _Precision | None = None
    for batch in batches:
        if amp is None:
            dev = batch["mask"].device
            amp = _Precision(amp_dtype(precision, dev), dev)
        full = batch["mask"]
        seen = simulate_missing(full, ctx.p_drop, rng) if ctx.p_drop > 0 else full
        with amp.autocast():
            out = model({"x": batch["x"], "mask": seen, "y": batch["y"]}, full_mask=full)
        optimizer.zero_grad(set_to_none=True)
        if amp.scaler is not None:
            amp.scaler.scale(out["loss"]).backward()
            amp.scaler.unscale_(optimizer)  # hooks and clipping see true gradients
        else:
            out["loss"].backward()
        method.on_after_backward(ctx)
        if grad_clip:
            clip_gradients(method.parameters(), grad_clip)
        if amp.scaler is not None:
            amp.scaler.step(optimizer)
            amp.scaler.update()
        else:
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


def evaluate(model, batches: Iterable[dict], task: str | None = None) -> dict[str, float]:
    """METHOD section 3 metrics of the method's prediction path over ``batches`` (masks as given)."""
    task = task or unwrap(model).task
    y, p = predict_arrays(model, batches)
    return M.compute_metrics(task, y, p)


def make_predict_fn(method, task: str, device=None):
    """numpy in, numpy out: ``fn(x: {m: array}, mask: (B, M) bool) -> {"probabilities", "prob_<m>", ...}``."""
    method.eval()

    @torch.no_grad()
    def predict(x: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
        xt = {m: torch.as_tensor(np.ascontiguousarray(v), dtype=torch.float32, device=device) for m, v in x.items()}
        out = method.predict_with_trace(xt, torch.as_tensor(mask, dtype=torch.bool, device=device))
        return {k: v.float().cpu().numpy() if v.dtype.is_floating_point else v.cpu().numpy() for k, v in out.items()}

    return predict


def make_optimizer(method: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel: the same update as the per-tensor loop in one pass over all
    parameters (OmniFuse's 2R residual autoencoders have ~130 tensors: its step went from 8.5 to
    2.6 ms of CPU, docs/fusion.md); foreach where the parameters' device has no fused kernel."""
    params = list(method.parameters())
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def fit_batches(method, train_batches: Callable[[int | None], Iterable[dict]],
                val_batches: Callable[[], Iterable[dict]], task: str | None = None, cfg=None, *,
                epochs: int | None = None, lr: float | None = None, weight_decay: float | None = None,
                p_drop: float | None = None, patience: int | None = None, seed: int = 0,
                var_y: float | None = None) -> dict[str, Any]:
    """Train ``method`` on batch iterables and early-stop on the validation metric; keeps the best weights.

    ``train_batches(epoch)`` yields the training batches of an epoch (shuffled as the caller likes);
    ``train_batches(None)`` must yield them in a fixed order with natural masks (what the hooks see,
    e.g. TLA's subset mining). ``val_batches()`` yields the validation batches. Hyper-parameters come
    from ``cfg`` (a ``TrainConfig``; defaults if None) unless given as keywords. ``var_y`` is the
    training-label variance (regression confidence).

    Returns ``{"history": [per-epoch dict], "best_epoch": int, "best_val": float}``. Each history
    entry holds ``epoch``, ``seconds``, ``train_<loss>``, ``val_<metric>`` and what the method's
    ``on_epoch_end`` returned (OmniFuse: ``train_tla = {"lazy": "ct+pet", "d": {"ct": 0.41, ...}}``).
    """
    import time

    from raypipe.config import TrainConfig

    cfg = cfg or TrainConfig()
    task = task or method.task
    epochs = cfg.epochs if epochs is None else epochs
    lr = cfg.lr if lr is None else lr
    weight_decay = cfg.weight_decay if weight_decay is None else weight_decay
    p_drop = cfg.p_drop if p_drop is None else p_drop
    patience = cfg.patience if patience is None else patience
    torch.manual_seed(seed)
    if task == "regression" and var_y is not None:
        method.set_label_variance(var_y)
    optimizer = make_optimizer(method, lr, weight_decay)
    main = M.main_metric_name(task)
    ctx = HookContext(p_drop=p_drop, seed=seed, train_batches=lambda: train_batches(None), val_batches=val_batches)
    history, best, best_state, best_epoch, since = [], -np.inf, None, 0, 0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        stats = train_epoch(method, train_batches(epoch), optimizer, ctx, epoch, precision=cfg.precision)
        val = evaluate(method, val_batches(), task)
        score = val.get(main, np.nan)
        history.append({"epoch": epoch + 1, "seconds": time.perf_counter() - t0,
                        **{f"train_{k}": v for k, v in stats.items()}, **{f"val_{k}": v for k, v in val.items()}})
        if score > best + 1e-6:
            best, best_epoch, since = score, epoch + 1, 0
            best_state = (copy.deepcopy(method.state_dict()), copy.deepcopy(method.extra_state()))
        else:
            since += 1
            if stops_early(method, since, patience):
                log.info("early stop after epoch %d (best %s %.4f at epoch %d)", epoch + 1, main, best, best_epoch)
                break
    if best_state is not None:
        method.load_state_dict(best_state[0])
        method.load_extra_state(best_state[1])
    return {"history": history, "best_epoch": best_epoch, "best_val": float(best)}


def fit(method, train: tuple, val: tuple, task: str, epochs: int = 30, batch_size: int = 64, lr: float = 1e-3,
        weight_decay: float = 1e-4, p_drop: float = 0.5, patience: int = 8, seed: int = 0, device=None,
        precision: str = "auto") -> dict[str, Any]:
    """:func:`fit_batches` on in-memory arrays ``train = (x: {m: array}, mask: (N, M) bool, y)`` and ``val``.

    Training batches are reshuffled every epoch (seeded by ``seed`` and the epoch); hooks and
    validation see fixed-order batches of 512. ``device``: where the batches go (the method must
    already be there); ``precision``: the training autocast, see :func:`amp_dtype`.
    """
    from raypipe.config import TrainConfig

    x_tr, m_tr, y_tr = train
    x_va, m_va, y_va = val

    def train_batches(epoch: int | None):
        if epoch is None:
            return tensor_batches(x_tr, m_tr, y_tr, task, 512, device=device)
        return tensor_batches(x_tr, m_tr, y_tr, task, batch_size, shuffle=True, seed=seed * 1000 + epoch,
                              device=device)

    return fit_batches(method, train_batches, lambda: tensor_batches(x_va, m_va, y_va, task, 512, device=device),
                       task, TrainConfig(precision=precision), epochs=epochs, lr=lr, weight_decay=weight_decay,
                       p_drop=p_drop, patience=patience, seed=seed,
                       var_y=(float(np.var(y_tr)) or 1.0) if task == "regression" else None)

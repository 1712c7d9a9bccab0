"""Greedy weighted ensembles of fusion methods (Caruana et al. 2004), pure numpy/PyTorch, no Ray.

Ensemble selection with replacement: start from the empty ensemble; at each of ``size``
steps add the candidate (a model may be added again) whose inclusion gives the best score
of the averaged predictions; keep the best ensemble seen along the way (the earliest on a
tie). A model's weight is how often it was chosen divided by the length of that ensemble.
Ties between candidates at a step go to the lowest index, so the result is deterministic.

:class:`EnsembleMethod` is the fitted ensemble as one model: it predicts with every member
and averages their probabilities (or regression values) with the learned weights; the
per-modality outputs (``prob_<m>``, ``weight_<m>``, ``imputed_<m>``) are those of the member
with the largest weight. ``train.method=auto`` (raypipe.tune.auto) builds and saves it;
:func:`load_model` loads a run directory whether it holds one method or an ensemble.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

ScoreFn = Callable[[np.ndarray, np.ndarray], float]


def greedy_ensemble(predictions: Sequence[np.ndarray], y: np.ndarray, score: ScoreFn, size: int = 25,
                    higher_is_better: bool = True) -> tuple[np.ndarray, list[float]]:
    """Caruana's ensemble selection with replacement over out-of-fold ``predictions``.

    ``predictions[i]``: (N, K) probabilities (or (N, 1) values) of candidate i for the same N
    rows; ``score(y, p)`` scores averaged predictions. Returns (weights summing to 1, the
    score after each step). ``size`` steps at most; the returned weights are those of the best
    step (the earliest of equal scores).
    """
    preds = [np.asarray(p, np.float64) for p in predictions]
    if not preds:
        raise ValueError("no candidate predictions to ensemble")
    shape = preds[0].shape
    if any(p.shape != shape for p in preds):
        raise ValueError(f"candidate predictions differ in shape: {[p.shape for p in preds]}")
    sign = 1.0 if higher_is_better else -1.0
    counts = np.zeros(len(preds), dtype=np.int64)
    total = np.zeros(shape)
    history: list[float] = []
    best_counts, best_score = None, -np.inf
    for step in range(1, max(1, size) + 1):
        step_scores = []
        for p in preds:
            s = score(y, (total + p) / step)
            step_scores.append(sign * s if np.isfinite(s) else -np.inf)
        i = int(np.argmax(step_scores))  # first index on a tie
        counts[i] += 1
        total += preds[i]
        history.append(sign * step_scores[i])
        if step_scores[i] > best_score + 1e-12:
            best_score, best_counts = step_scores[i], counts.copy()
    if best_counts is None:  # every score was NaN: fall back to the first step's choice
        best_counts = np.zeros(len(preds), dtype=np.int64)
        best_counts[0] = 1
    return best_counts / best_counts.sum(), history


def combine(predictions: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted average of the members' predictions."""
    w = np.asarray(weights, np.float64)
    return sum(wi * np.asarray(p, np.float64) for wi, p in zip(w, predictions) if wi > 0) / w[w > 0].sum()


class EnsembleMethod(nn.Module):
    """Fitted members and their weights as one model (the interface ``raypipe infer`` and evaluation use)."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], names: Sequence[str]):
        super().__init__()
        if not members or len(members) != len(weights) or len(names) != len(members):
            raise ValueError("an ensemble needs as many members, weights and names")
        w = torch.as_tensor(np.asarray(weights, np.float64), dtype=torch.float64)
        if (w < 0).any() or float(w.sum()) <= 0:
            raise ValueError(f"ensemble weights must be >= 0 and not all 0, got {list(weights)}")
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", w / w.sum())
        self.names = list(names)
        first = members[0]
        self.task, self.n_outputs, self.modalities = first.task, first.n_outputs, list(first.modalities)
        for m in members[1:]:
            if (m.task, m.n_outputs, list(m.modalities)) != (self.task, self.n_outputs, self.modalities):
                raise ValueError("ensemble members must share the task, outputs and modalities")
        self.top = int(torch.argmax(self.weights))  # ties: the first member

    @property
    def top_member(self) -> nn.Module:
        """The member with the largest weight: source of the per-modality outputs."""
        return self.members[self.top]

    @torch.no_grad()
    def predict_with_trace(self, x: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        combined = None
        for i, (member, w) in enumerate(zip(self.members, self.weights)):
            if float(w) <= 0:
                continue
            o = member.predict_with_trace(x, mask)
            p = o["probabilities"].double() * w
            combined = p if combined is None else combined + p
            if i == self.top:
                out = {k: v for k, v in o.items() if k != "probabilities"}
        out["probabilities"] = combined.float()
        return out

    def forward(self, batch, full_mask=None):  # prediction only: an ensemble is not trained as one module
        probs = self.predict_with_trace(batch["x"], batch["mask"])["probabilities"]
        return {"probabilities": probs}


# ----------------------------------------------------------------------------- saving / loading
MODEL_FILE, META_FILE = "model.pt", "model_meta.json"


def ensemble_meta(member_metas: Sequence[dict], weights: Sequence[float], names: Sequence[str]) -> dict:
    """``model_meta.json`` of an ensemble: the common fields, plus every member's own meta and weight."""
    first = member_metas[0]
    keep = ("modalities", "shapes", "task", "n_outputs", "label_columns", "embedding_spec", "ehr_normalisation",
            "seed", "var_y")
    meta = {k: first.get(k) for k in keep}
    meta["method"] = "ensemble"
    meta["members"] = [{"name": n, "weight": float(w), "meta": {k: v for k, v in m.items() if k not in ("val",)}}
                       for n, w, m in zip(names, weights, member_metas)]
    meta["train_config"] = first.get("train_config")
    return meta


def build_ensemble_from_meta(meta: dict) -> EnsembleMethod:
    """The untrained ensemble described by ``meta`` (members rebuilt from their own metas)."""
    from raypipe.train.trainer import build_from_meta

    members = [build_from_meta(m["meta"]) for m in meta["members"]]
    return EnsembleMethod(members, [m["weight"] for m in meta["members"]], [m["name"] for m in meta["members"]])


def save_ensemble(run_dir: str, ensemble: EnsembleMethod, meta: dict) -> None:
    """Write ``model.pt`` (every member's weights in one state dict) and ``model_meta.json``.

    Both are written in full to temporary names first; then the old meta is removed, ``model.pt``
    renamed into place and the meta last. A crash part way leaves the old pair, or a ``model.pt``
    without a meta (which fails to load, loudly), never a model beside another model's meta."""
    os.makedirs(run_dir, exist_ok=True)
    model_path, meta_path = os.path.join(run_dir, MODEL_FILE), os.path.join(run_dir, META_FILE)
    tmp_model, tmp_meta = f"{model_path}.tmp-{os.getpid()}", f"{meta_path}.tmp-{os.getpid()}"
    try:
        torch.save(ensemble.state_dict(), tmp_model)
        with open(tmp_meta, "w") as fh:
            json.dump(meta, fh, indent=2, default=float)
        if os.path.exists(meta_path):
            os.remove(meta_path)
        os.replace(tmp_model, model_path)
        os.replace(tmp_meta, meta_path)
    finally:
        for tmp in (tmp_model, tmp_meta):
            if os.path.exists(tmp):
                os.remove(tmp)


def load_model(run_dir: str):
    """(model in eval mode, meta) from a run directory holding one fusion method or an ensemble."""
    with open(os.path.join(run_dir, META_FILE)) as fh:
        meta = json.load(fh)
    if meta.get("method") != "ensemble":
        from raypipe.train.trainer import load_trained

        return load_trained(run_dir)
    model = build_ensemble_from_meta(meta)
    state = torch.load(os.path.join(run_dir, MODEL_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, meta

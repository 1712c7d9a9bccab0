"""Method comparison on the same folds with paired t-tests: `raypipe compare`.

Every method (and OmniFuse's ablation rows b-f) is trained on the same k folds of the
training portion (grouped by patient, stratified; the test split is not used), one Ray
task per (method, fold), each with the framework-free loop and the same budget. Writes
``<out_dir>/compare/``: ``folds.csv`` (one row per method and fold: natural-missingness
metrics and the main metric per modality pattern), ``table.csv`` (mean ± std),
``summary.json`` (incl. the paired t-test of the first method against each other) and
``report.html``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np

from raypipe.config import Config

log = logging.getLogger(__name__)

DEFAULT_METHODS = ["omnifuse", "concat", "sum", "late", "se_gate", "attention", "transformer", "tensor", "ddf",
                   "gblend", "ogm_ge", "pmr", "medfuse", "metafusion"]
ABLATION_ROWS = {
    "omnifuse[b:dwfuse]": dict(use_imp_forward=False, use_imp_backward=False, use_tla=False),
    "omnifuse[c:+tla]": dict(use_imp_forward=False, use_imp_backward=False),
    "omnifuse[d:+imp_fwd]": dict(use_imp_backward=False),
    "omnifuse[f:no_dwfuse]": dict(use_dwfuse=False),
}


def _fold_task(method: str, omni: dict, train_cfg: dict, data_ref, fold: int, folds: np.ndarray, task: str,
               modalities: list[str], seed: int) -> dict[str, Any]:
    """Train ``method`` on folds != fold (minus a validation part), test on fold."""
    import torch

    from raypipe.config import TrainConfig
    from raypipe.fusion.base import ModalitySpec
    from raypipe.fusion.registry import build_method
    from raypipe.train import loop
    from raypipe.train.evaluate import all_patterns, pattern_name
    from raypipe.train.metrics import compute_metrics, main_metric_name
    from raypipe.train.splits import holdout_mask

    torch.set_num_threads(1)
    x, mask, y, ids, shapes = data_ref
    tc = TrainConfig.model_validate(train_cfg)
    tc = tc.model_copy(update={"omnifuse": tc.omnifuse.model_copy(update=omni)})
    torch.manual_seed(seed + fold)
    model = build_method(method, [ModalitySpec(m, tuple(shapes[m])) for m in modalities], task,
                         2 if task == "binary" else int(np.nanmax(y)) + 1 if task == "multiclass" else
                         (y.shape[1] if task == "multilabel" else 1), tc)
    tr_all, te = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
    val = holdout_mask(ids[tr_all], y[tr_all], fraction=0.2, seed=seed + fold)
    part = lambda idx: ({m: x[m][idx] for m in modalities}, mask[idx], y[idx])  # noqa: E731
    t0 = time.perf_counter()
    loop.fit(model, part(tr_all[~val]), part(tr_all[val]), task, epochs=tc.epochs, batch_size=tc.batch_size,
             lr=tc.lr, weight_decay=tc.weight_decay, p_drop=tc.p_drop, patience=tc.patience, seed=seed + fold)
    predict = loop.make_predict_fn(model, task)
    xt, mt, yt = part(te)
    row = {"method": method, "fold": fold, "seconds": time.perf_counter() - t0,
           **compute_metrics(task, yt, predict(xt, mt)["probabilities"])}
    main = main_metric_name(task)
    for pat in all_patterns(len(modalities)):
        want = np.array(pat)
        rows = np.all(mt[:, want], axis=1)
        if rows.sum() >= 4:
            pm = np.broadcast_to(want, (int(rows.sum()), len(modalities))).copy()
            out = predict({m: v[rows] for m, v in xt.items()}, pm)
            row[f"{main}[{pattern_name(modalities, pat)}]"] = compute_metrics(task, yt[rows], out["probabilities"]).get(main)
    return row


def run_compare(cfg: Config, methods: list[str] | None = None) -> dict:
    """Run the comparison; returns the summary (also written to ``compare/summary.json``)."""
    import pandas as pd
    import ray
    from scipy.stats import ttest_rel

    from raypipe.fusion.registry import REGISTRY
    from raypipe.runtime import init_ray
    from raypipe.train.metrics import main_metric_name
    from raypipe.train.splits import kfold_assignments
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.train.trainer import assign_splits

    methods = methods or DEFAULT_METHODS
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {', '.join(sorted(REGISTRY))}")
    init_ray(cfg)
    table = read_embeddings(cfg.train_input, cfg.ingest.label_columns)
    task, _ = infer_task(table.y, cfg.train.task)
    portion = assign_splits(table, cfg) != "test"
    sub = table.take(portion)
    folds = kfold_assignments(sub.sample_id, sub.y, k=cfg.tune.folds, seed=cfg.run.seed)
    data_ref = ray.put((sub.x, sub.mask, sub.y, sub.sample_id, {m: list(s) for m, s in sub.shapes.items()}))
    runs = [(m, m, {}) for m in methods]
    if "omnifuse" in methods:
        runs += [(name, "omnifuse", sw) for name, sw in ABLATION_ROWS.items()]
    remote = ray.remote(num_cpus=1)(_fold_task)
    train_cfg = cfg.train.model_dump(mode="json")
    t0 = time.perf_counter()
    futures = {(label, f): remote.remote(method, sw, train_cfg, data_ref, f, folds, task, sub.modalities, cfg.run.seed)
               for label, method, sw in runs for f in range(cfg.tune.folds)}
    rows = []
    try:
        from tqdm import tqdm

        pending = list(futures.values())
        label_of = {v: k for k, v in futures.items()}
        with tqdm(total=len(pending), desc="compare", unit="fit") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                r = ray.get(done[0])
                r["method"] = label_of[done[0]][0]
                rows.append(r)
                bar.update(1)
    except KeyboardInterrupt:
        for f in futures.values():
            ray.cancel(f)
        raise
    seconds = time.perf_counter() - t0
    df = pd.DataFrame(rows).sort_values(["method", "fold"]).reset_index(drop=True)
    out_dir = os.path.join(cfg.run.out_dir, "compare")
    os.makedirs(out_dir, exist_ok=True)
    df.to_csv(os.path.join(out_dir, "folds.csv"), index=False)
    main = main_metric_name(task)
    metric_cols = [c for c in df.columns if c not in ("method", "fold", "seconds")]
    order = [label for label, _, _ in runs]
    table_rows = []
    first = order[0]
    base = df[df.method == first].sort_values("fold")[main].to_numpy()
    for label in order:
        part = df[df.method == label].sort_values("fold")
        r = {"method": label}
        for c in metric_cols:
            v = part[c].to_numpy(dtype=float)
            r[c] = f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}"
        if label != first:
            p = ttest_rel(base, part[main].to_numpy()).pvalue
            r[f"p vs {first}"] = float(p)
        table_rows.append(r)
    tdf = pd.DataFrame(table_rows)
    tdf.to_csv(os.path.join(out_dir, "table.csv"), index=False)
    means = {label: float(df[df.method == label][main].mean()) for label in order}
    ranked = sorted((m for m in methods), key=lambda m: -means[m])
    summary = {"ok": True, "task": task, "folds": cfg.tune.folds, "main_metric": main, "seconds": round(seconds, 1),
               "mean": means, "rank": ranked,
               "p_values": {r["method"]: r.get(f"p vs {first}") for r in table_rows if r["method"] != first},
               "table": os.path.abspath(os.path.join(out_dir, "table.csv"))}
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    _write_compare_html(os.path.join(out_dir, "report.html"), tdf, means, main, first)
    print_cols = ["method", main, f"p vs {first}"]
    summary["printed"] = "\n" + tdf[[c for c in print_cols if c in tdf.columns]].to_string(index=False)
    return summary


def _write_compare_html(path: str, tdf, means: dict, main: str, first: str) -> None:
    import base64
    import html
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(means) + 1))
    labels = list(means)
    ax.barh(labels[::-1], [means[k] for k in labels[::-1]], color=["C3" if k == first else "C0" for k in labels[::-1]])
    ax.set_xlabel(f"mean {main} over folds")
    lo = min(means.values())
    ax.set_xlim(max(0.0, lo - 0.05), max(means.values()) + 0.02)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    img = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    table = tdf.to_html(index=False, float_format=lambda v: f"{v:.3g}", escape=True)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>raypipe comparison</title>"
            f"<style>body{{font-family:system-ui,sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:3px 6px}}"
            f"table{{border-collapse:collapse}}</style></head><body><h1>Method comparison ({html.escape(main)})</h1>"
            f"<img alt='comparison' src='{img}'><h2>Mean ± std over folds, paired t-test vs {html.escape(first)}</h2>"
            f"{table}</body></html>")
    with open(path + ".tmp", "w") as fh:
        fh.write(page)
    os.replace(path + ".tmp", path)

"""Method comparison on the same folds with paired t-tests: `raypipe compare`.

Every method (and, with ``ablation``, OmniFuse's ablation rows b-f) is trained on the same
k folds (grouped by patient, stratified) of the training portion (``tune.holdout:
test_split``; the test split is not used) or of every row (``tune.holdout: none``), one Ray
task per (method, fold), each with the framework-free loop and the same budget
(``raypipe.tune.folds``). Writes ``<out_dir>/compare/``: ``folds.parquet`` (sample_id ->
fold), ``folds.csv`` (one row per method and fold: natural-missingness metrics and the main
metric per modality pattern), ``table.csv`` (numeric ``<metric>_mean`` and ``<metric>_std``
columns, std over folds with ddof=1, and the p-value of the paired t-test of the first
method against each other on ``tune.metric``), ``summary.json`` and ``report.html``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from raypipe import console
from raypipe.config import Config

log = logging.getLogger(__name__)

ABLATION_ROWS = {
    "omnifuse[b:dwfuse]": dict(use_imp_forward=False, use_imp_backward=False, use_tla=False),
    "omnifuse[c:+tla]": dict(use_imp_forward=False, use_imp_backward=False),
    "omnifuse[d:+imp_fwd]": dict(use_imp_backward=False),
    "omnifuse[f:no_dwfuse]": dict(use_dwfuse=False),
}


def run_compare(cfg: Config, methods: list[str] | None = None, ablation: bool = False) -> dict:
    """Run the comparison; returns the summary (also written to ``compare/summary.json``).

    The table, labels, methods, metric and folds are checked before Ray starts (fail fast).
    ``ablation``: with omnifuse listed, add OmniFuse's ablation rows (b, c, d, f).
    """
    import pandas as pd
    from scipy.stats import ttest_rel

    from raypipe.fusion.registry import REGISTRY
    from raypipe.runtime import init_ray
    from raypipe.train.splits import kfold_assignments
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.tune.folds import FitJob, cv_rows, resolve_metric, run_fits, summarise, write_folds

    unknown = [m for m in methods or () if m not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {', '.join(sorted(REGISTRY))}")
    table = read_embeddings(cfg.train_input, cfg.ingest.label_columns)
    task, _ = infer_task(table.y, cfg.train.task)
    # default: every registered method suited to the task (new methods join without a list to update)
    methods = methods or [name for name, cls in REGISTRY.items() if task in cls.info.tasks]
    unsuited = [m for m in methods if task not in REGISTRY[m].info.tasks]
    if unsuited:
        raise ValueError(f"methods {unsuited} do not support a {task} task")
    metric, higher = resolve_metric(cfg.tune.metric, task)
    sub = table.take(cv_rows(table, cfg))
    folds = kfold_assignments(sub.sample_id, sub.y, k=cfg.tune.folds, seed=cfg.run.seed)
    out_dir = os.path.join(cfg.run.out_dir, "compare")
    os.makedirs(out_dir, exist_ok=True)
    write_folds(os.path.join(out_dir, "folds.parquet"), sub.sample_id, folds)

    import ray

    init_ray(cfg)
    data_ref = ray.put((sub.x, sub.mask, sub.y, sub.sample_id, {m: list(s) for m, s in sub.shapes.items()}))
    runs = [(m, m, {}) for m in methods]
    if ablation and "omnifuse" in methods:
        runs += [(name, "omnifuse", sw) for name, sw in ABLATION_ROWS.items()]
    train_cfg = cfg.train.model_dump(mode="json")
    jobs = [FitJob(label, method, f, train_cfg, sw) for label, method, sw in runs for f in range(cfg.tune.folds)]
    t0 = time.perf_counter()
    rows, _, errors = run_fits(jobs, data_ref, folds, task, sub.modalities, cfg.run.seed,
                               progress_bars=console.bars_wanted(cfg), desc="compare")
    if errors:
        raise RuntimeError(f"fits failed: {errors}")
    seconds = time.perf_counter() - t0
    df = pd.DataFrame(rows).sort_values(["method", "fold"]).reset_index(drop=True)
    df.to_csv(os.path.join(out_dir, "folds.csv"), index=False)
    metric_cols = [c for c in df.columns if c not in ("method", "fold", "seconds", "cpu_seconds")]
    order = [label for label, _, _ in runs]
    table_rows = []
    first = order[0]
    base = df[df.method == first].sort_values("fold")[metric].to_numpy()
    for label in order:
        part = df[df.method == label].sort_values("fold")
        r: dict = {"method": label}
        for c in metric_cols:
            r[f"{c}_mean"], r[f"{c}_std"] = summarise(part[c].to_numpy(dtype=float))
        r["seconds_mean"] = float(part["seconds"].mean())
        if label != first:
            r[f"p vs {first}"] = float(ttest_rel(base, part[metric].to_numpy()).pvalue)
        table_rows.append(r)
    tdf = pd.DataFrame(table_rows)
    tdf.to_csv(os.path.join(out_dir, "table.csv"), index=False)
    means = {label: float(df[df.method == label][metric].mean()) for label in order}
    ranked = sorted(order, key=lambda m: -means[m] if higher else means[m])
    summary = {"ok": True, "task": task, "folds": cfg.tune.folds, "rows": int(len(sub)),
               "holdout": cfg.tune.holdout, "metric": metric, "higher_is_better": higher,
               "main_metric": metric, "seconds": round(seconds, 1), "mean": means, "rank": ranked,
               "p_values": {r["method"]: r.get(f"p vs {first}") for r in table_rows if r["method"] != first},
               "table": os.path.abspath(os.path.join(out_dir, "table.csv")),
               "folds_file": os.path.abspath(os.path.join(out_dir, "folds.parquet"))}
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    _write_compare_html(os.path.join(out_dir, "report.html"), tdf, means, metric, first)
    shown = pd.DataFrame({"method": tdf["method"],
                          metric: [f"{m:.3f} ± {s:.3f}" for m, s in zip(tdf[f"{metric}_mean"], tdf[f"{metric}_std"])]})
    if f"p vs {first}" in tdf.columns:
        shown[f"p vs {first}"] = tdf[f"p vs {first}"].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
    summary["printed"] = "\n" + shown.to_string(index=False)
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

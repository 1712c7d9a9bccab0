"""Self-contained HTML report of a training run (plots embedded as PNG data URIs).

Reads only the run directory's files (the contract of the train stage):

- ``metrics.json``  test metrics: natural missingness, per pattern, missing-rate curve,
  subgroups, mean reliability weight per modality
- ``history.json``  per-epoch training trace (losses, validation metric, TLA lazy subset, d_S)
- ``predictions_test.parquet``  per test sample: label, probabilities, reliability weights
- ``projection.parquet`` (optional)  2-D projection of observed vs imputed modality embeddings

and writes ``report.html`` next to them (atomically).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if np.isnan(v) else f"{v:.3f}"
    return html.escape(str(v))


def _table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    columns = columns or list(rows[0].keys())
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _roc_pr_figures(pred) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

    y = np.asarray(pred["label"], dtype=float)
    p = np.stack(pred["probabilities"].to_numpy())
    if p.ndim != 2 or len(np.unique(y)) != 2:
        return []
    score = p[:, -1]
    fpr, tpr, _ = roc_curve(y, score)
    prec, rec, _ = precision_recall_curve(y, score)
    fig, ax = plt.subplots(1, 2, figsize=(9, 4))
    ax[0].plot(fpr, tpr, lw=2, label=f"AUROC {roc_auc_score(y, score):.3f}")
    ax[0].plot([0, 1], [0, 1], "k--", lw=1)
    ax[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test split)")
    ax[0].legend(loc="lower right")
    ax[1].plot(rec, prec, lw=2)
    ax[1].axhline(y.mean(), color="k", ls="--", lw=1, label=f"prevalence {y.mean():.2f}")
    ax[1].set(xlabel="recall", ylabel="precision", title="Precision-recall (test split)")
    ax[1].legend(loc="upper right")
    return [("ROC and precision-recall", _png(fig))]


def _curve_figure(curve: list[dict], metric: str) -> str | None:
    import matplotlib.pyplot as plt

    if not curve:
        return None
    rates = [c["rate"] * 100 for c in curve]
    vals = [c.get(metric, np.nan) for c in curve]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(rates, vals, "o-", lw=2)
    ax.set(xlabel="missing rate (%)", ylabel=metric, title=f"Test {metric} vs. simulated missing rate")
    ax.grid(alpha=0.3)
    return _png(fig)


def _tla_figure(history: list[dict]) -> str | None:
    import matplotlib.pyplot as plt

    traces = [(h["epoch"], h["tla"]) for h in history if h.get("tla")]
    if not traces:
        return None
    subsets = sorted({s for _, t in traces for s in t.get("d", {})}, key=lambda s: (s.count("+"), s))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for s in subsets:
        ax.plot([e for e, _ in traces], [t["d"].get(s, np.nan) for _, t in traces], lw=1.5, label=s)
    lazy = [(e, t["d"].get(t["lazy"], np.nan)) for e, t in traces if t.get("lazy")]
    ax.scatter([e for e, _ in lazy], [v for _, v in lazy], color="k", marker="x", zorder=5, label="lazy (argmax)")
    ax.set(xlabel="epoch", ylabel="d_S (cross-entropy)", title="TLA trace: loss of each modality subset")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    return _png(fig)


def _history_figure(history: list[dict]) -> str | None:
    import matplotlib.pyplot as plt

    if not history:
        return None
    losses = [k for k in history[0] if k.startswith("train_loss") and isinstance(history[0][k], (int, float))]
    scores = [k for k in history[0] if k.startswith("val_") and "threshold" not in k
              and isinstance(history[0][k], (int, float))]
    if not losses and not scores:
        return None
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for k in losses:
        ax[0].plot(epochs, [max(h.get(k, np.nan), 1e-6) for h in history], lw=1.5, label=k[len("train_"):])
    ax[0].set(xlabel="epoch", title="Training losses", yscale="log")
    ax[0].legend(fontsize=7)
    for k in scores:
        ax[1].plot(epochs, [h.get(k, np.nan) for h in history], lw=1.5, label=k)
    ax[1].set(xlabel="epoch", title="Validation metrics")
    ax[1].legend(fontsize=7)
    return _png(fig)


def _weights_figure(pred, modalities: list[str]) -> str | None:
    import matplotlib.pyplot as plt

    cols = [f"weight_{m}" for m in modalities if f"weight_{m}" in pred.columns]
    if not cols:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    data = [pred[c].dropna().to_numpy() for c in cols]
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(cols) + 1), [c[len("weight_"):] for c in cols])
    ax.set(ylabel="reliability weight w_m", title="Label-free reliability weight per modality (test)")
    return _png(fig)


def _projection_figure(proj) -> str | None:
    import matplotlib.pyplot as plt

    if proj is None or len(proj) == 0:
        return None
    mods = sorted(proj["modality"].unique())
    fig, axes = plt.subplots(1, len(mods), figsize=(4 * len(mods), 3.6), squeeze=False)
    for ax, m in zip(axes[0], mods):
        part = proj[proj["modality"] == m]
        for kind, marker in (("observed", "o"), ("imputed", "^")):
            sel = part[part["kind"] == kind]
            ax.scatter(sel["x"], sel["y"], s=10, marker=marker, alpha=0.6, label=kind)
        ax.set_title(m)
        ax.legend(fontsize=7)
    fig.suptitle("Observed vs. imputed modality embeddings (PCA)")
    return _png(fig)


def _patterns_with_intervals(patterns: list[dict], pred, modalities: list[str]) -> list[dict]:
    """Pattern rows with a Hanley-McNeil AUROC interval (class counts from the test predictions' masks)."""
    from raypipe.train.metrics import auroc_ci_hanley_mcneil

    if pred is None or not patterns or "auroc" not in patterns[0]:
        return patterns
    rows = []
    y = np.asarray(pred["label"])
    for p in patterns:
        r = dict(p)
        mods = p["pattern"].split("+")
        cols = [f"mask_{m}" for m in mods]
        if y.ndim == 1 and all(c in pred.columns for c in cols) and np.isfinite(p.get("auroc", np.nan)):
            sel = np.all(np.stack([pred[c].to_numpy().astype(bool) for c in cols]), axis=0)
            lo, hi = auroc_ci_hanley_mcneil(p["auroc"], int((y[sel] == 1).sum()), int((y[sel] == 0).sum()))
            r = {"pattern": p["pattern"], "n": p.get("n"), "auroc": p["auroc"], "auroc 95% CI": f"{lo:.3f}-{hi:.3f}",
                 **{k: v for k, v in p.items() if k not in ("pattern", "n", "auroc")}}
        rows.append(r)
    return rows


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}.flag{color:#b00;font-weight:bold}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em}"""


def build_report_html(run_dir: str) -> str:
    """Render the report of ``run_dir`` into an HTML string."""
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    metrics_path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"{run_dir} is not a training run directory (no metrics.json); "
                                "run `raypipe train` first and pass its run directory")
    with open(metrics_path) as fh:
        metrics = json.load(fh)
    history = []
    if os.path.isfile(os.path.join(run_dir, "history.json")):
        with open(os.path.join(run_dir, "history.json")) as fh:
            history = json.load(fh)
    pred_path = os.path.join(run_dir, "predictions_test.parquet")
    pred = pd.read_parquet(pred_path) if os.path.isfile(pred_path) else None
    proj_path = os.path.join(run_dir, "projection.parquet")
    proj = pd.read_parquet(proj_path) if os.path.isfile(proj_path) else None

    modalities = metrics.get("modalities", [])
    test = metrics.get("test", {})
    main_metric = metrics.get("main_metric", "auroc")
    parts = [f"<h1>raypipe run: {html.escape(metrics.get('method', '?'))}</h1>",
             f"<p>task <b>{html.escape(str(metrics.get('task')))}</b>; modalities "
             f"{html.escape(', '.join(modalities))}; test samples {test.get('natural', {}).get('n', '?')}.</p>"]
    from raypipe.tune.auto import leaderboard_html  # train.method=auto: the candidates' leaderboard ("" otherwise)

    parts.append(leaderboard_html(run_dir))
    parts.append("<h2>Test metrics (natural missingness)</h2>")
    natural = dict(test.get("natural", {}))
    ci_note = ""
    if pred is not None and metrics.get("task") == "binary":
        from raypipe.train.metrics import auroc_ci

        y = np.asarray(pred["label"], dtype=int)
        ci = auroc_ci(y, np.array([float(np.asarray(p)[-1]) for p in pred["probabilities"]]))
        if np.isfinite(ci["se"]):
            natural = {"n": natural.pop("n", ci["n"]), "auroc": natural.pop("auroc", ci["auroc"]),
                       "auroc 95% CI": f"{ci['lo']:.3f}-{ci['hi']:.3f}", **natural}
            ci_note = ("<p>AUROC interval: DeLong's variance, normal approximation, over the "
                       f"{ci['n']} test samples ({ci['n_pos']} positive).</p>")
    parts.append(_table([natural]))
    parts.append(ci_note)
    if pred is not None:
        for title, img in _roc_pr_figures(pred):
            parts.append(f"<h3>{title}</h3><img alt='{title}' src='{img}'>")
    parts.append("<h2>Every modality pattern</h2>")
    parts.append(_table(_patterns_with_intervals(test.get("patterns", []), pred, modalities)))
    parts.append("<p>Each row: the test samples that have every modality of the pattern, given only those "
                 "modalities; rows differ in their patients, so compare a row with the natural-missingness "
                 "result on the same patients, not with another row. AUROC interval: Hanley-McNeil "
                 "(from the AUROC and the class counts).</p>")
    img = _curve_figure(test.get("missing_rate_curve", []), main_metric)
    if img:
        parts.append(f"<h2>Missing-rate curve</h2><img alt='missing-rate curve' src='{img}'>")
    img = _tla_figure(history)
    if img:
        parts.append(f"<h2>Traceable laziness (TLA)</h2><img alt='TLA trace' src='{img}'>")
        parts.append(_table([{"epoch": h["epoch"], "lazy subset": h["tla"].get("lazy")}
                             for h in history if h.get("tla")]))
    img = _history_figure(history)
    if img:
        parts.append(f"<h2>Training history</h2><img alt='history' src='{img}'>")
    if test.get("reliability_mean"):
        parts.append("<h2>Reliability weights</h2>")
        parts.append(_table([test["reliability_mean"]]))
        if pred is not None:
            img = _weights_figure(pred, modalities)
            if img:
                parts.append(f"<img alt='weights' src='{img}'>")
    if test.get("subgroups"):
        parts.append("<h2>Subgroups (bias assessment)</h2>")
        for col, sg in test["subgroups"].items():
            flag = " <span class='flag'>gap above threshold</span>" if sg.get("flagged") else ""
            parts.append(f"<h3>{html.escape(col)}{flag}</h3>")
            parts.append(_table(sg.get("groups", [])))
            parts.append(f"<p>largest gap {_fmt(sg.get('max_gap', float('nan')))}, equalised-odds difference "
                         f"{_fmt(sg.get('equalized_odds_difference', float('nan')))}</p>")
    img = _projection_figure(proj)
    if img:
        parts.append(f"<h2>Observed vs. imputed embeddings</h2><img alt='projection' src='{img}'>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>raypipe report</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>")


def write_report(cfg_or_run_dir) -> dict:
    """Write ``report.html`` into the run directory; returns {"ok", "report"}.

    Accepts a run directory path or a :class:`raypipe.config.Config` (uses
    ``report.run_dir``, else the default training run directory).
    """
    if isinstance(cfg_or_run_dir, str):
        run_dir = cfg_or_run_dir
    else:
        cfg = cfg_or_run_dir
        run_dir = cfg.report.run_dir or cfg.train_dir()
    page = build_report_html(run_dir)
    out = os.path.join(run_dir, "report.html")
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(page)
    os.replace(tmp, out)
    log.info("wrote %s", out)
    return {"ok": True, "report": os.path.abspath(out)}


# ----------------------------------------------------------------------------- headline numbers
def _binary_test_predictions(run_dir: str):
    """(metrics, predictions DataFrame with a ``p1`` column) of a binary run, else (metrics, None)."""
    import pandas as pd

    with open(os.path.join(run_dir, "metrics.json")) as fh:
        metrics = json.load(fh)
    path = os.path.join(run_dir, "predictions_test.parquet")
    if metrics.get("task") != "binary" or not os.path.isfile(path):
        return metrics, None
    pred = pd.read_parquet(path)
    pred["p1"] = [float(np.asarray(p)[-1]) for p in pred["probabilities"]]
    pred["label"] = pred["label"].astype(int)
    return metrics, pred


def headline_numbers(run_dirs: dict[str, str], level: float = 0.95) -> dict:
    """Test-split headline of one or more trained runs, with intervals (binary tasks).

    ``run_dirs``: {method: run directory}, the first is the one the others are compared with.
    Returns {"methods": {m: auroc_ci(...)}, "comparisons": {m: paired DeLong difference first - m},
    "single": {m: {...}}} where "single" compares, on the *same* test patients (those who have the
    modality), each method given only its best single modality (the pattern row of
    metrics.json, with a Hanley-McNeil interval: no per-sample scores are kept for patterns)
    against the same method given every modality those patients have (DeLong interval).
    Non-binary runs: {"methods": {m: {"metric", "value", "n"}}} without intervals.
    """
    from raypipe.train import metrics as M

    out: dict = {"level": level, "methods": {}, "comparisons": {}, "single": {}}
    preds = {}
    for m, run_dir in run_dirs.items():
        if not os.path.isfile(os.path.join(run_dir, "metrics.json")):
            continue
        metrics, pred = _binary_test_predictions(run_dir)
        if pred is None:
            main = metrics.get("main_metric", "auroc")
            out["methods"][m] = {"metric": main, "value": metrics["test"]["natural"].get(main),
                                 "n": metrics["test"]["natural"].get("n")}
            continue
        preds[m] = (metrics, pred)
        out["methods"][m] = {"metric": "auroc", **M.auroc_ci(pred["label"].to_numpy(), pred["p1"].to_numpy(), level)}
    if not preds:
        return out
    first = next(iter(preds))
    _, pred0 = preds[first]
    for m, (_, pred) in preds.items():
        if m == first:
            continue
        both = pred0[["sample_id", "label", "p1"]].merge(pred[["sample_id", "p1"]], on="sample_id", suffixes=("", "_b"))
        if len(both) == len(pred0):
            out["comparisons"][m] = M.auroc_difference(both["label"].to_numpy(), both["p1"].to_numpy(),
                                                       both["p1_b"].to_numpy(), level)
    for m, (metrics, pred) in preds.items():
        singles = [p for p in metrics["test"].get("patterns", []) if "+" not in p["pattern"]
                   and np.isfinite(p.get("auroc", np.nan)) and f"mask_{p['pattern']}" in pred.columns]
        if not singles:
            continue
        best = max(singles, key=lambda p: p["auroc"])
        rows = pred[pred[f"mask_{best['pattern']}"].astype(bool)]
        y = rows["label"].to_numpy()
        lo, hi = M.auroc_ci_hanley_mcneil(best["auroc"], int(y.sum()), int((1 - y).sum()), level)
        out["single"][m] = {"modality": best["pattern"], "n": int(len(rows)),
                            "alone": {"auroc": float(best["auroc"]), "lo": lo, "hi": hi, "method": "hanley-mcneil"},
                            "fused": M.auroc_ci(y, rows["p1"].to_numpy(), level)}
    return out


def headline_lines(h: dict) -> list[str]:
    """Plain-language lines for the console: intervals, and a loss to a single modality said as such."""
    pct = int(round(100 * h.get("level", 0.95)))
    lines = []
    for m, r in h["methods"].items():
        if "lo" not in r:
            lines.append(f"{m:>10s}: test {r['metric']} {r['value']:.3f} (n={r['n']}; no interval for this task)")
            continue
        lines.append(f"{m:>10s}: test AUROC {r['auroc']:.3f} ({pct}% CI {r['lo']:.3f}-{r['hi']:.3f}, DeLong; "
                     f"n={r['n']} test patients, natural missingness)")
        if r["hi"] - r["lo"] >= 0.05:
            lines.append(f"{'':>12s}note: the interval is {r['hi'] - r['lo']:.3f} wide; more test patients "
                         "(synth.n, ingest.test_fraction) narrow it")
    names = list(h["methods"])
    for m, c in h["comparisons"].items():
        pval = "<0.001" if c["p"] < 0.001 else f"={c['p']:.3f}"
        verdict = (f"{names[0]} is significantly {'better' if c['diff'] > 0 else 'WORSE'}" if c["p"] < 0.05
                   else "no significant difference")
        lines.append(f"{names[0]} - {m}: {c['diff']:+.3f} AUROC ({pct}% CI {c['lo']:+.3f} to {c['hi']:+.3f}, "
                     f"paired DeLong, p{pval}): {verdict}")
    for m, s in h.get("single", {}).items():
        a, f = s["alone"], s["fused"]
        lines.append(f"{m} on its best single modality: {s['modality']} alone AUROC {a['auroc']:.3f} "
                     f"({pct}% CI {a['lo']:.3f}-{a['hi']:.3f}, Hanley-McNeil) on the {s['n']} test patients who "
                     f"have {s['modality']}; the same patients with all their modalities: AUROC {f['auroc']:.3f} "
                     f"({pct}% CI {f['lo']:.3f}-{f['hi']:.3f}, DeLong)")
        if f["auroc"] < a["auroc"]:
            overlap = "the intervals overlap" if f["hi"] >= a["lo"] and a["hi"] >= f["lo"] else \
                "the intervals do not overlap"
            lines.append(f"NOTE: on these patients fused {m} scores BELOW {s['modality']} alone "
                         f"({f['auroc']:.3f} vs {a['auroc']:.3f}; {overlap}): fusion did not help them here")
    return lines

"""``train.auto.refit``: ``full`` against ``bag`` on issue 18's auto criterion (helper E3's pre-stated rule,
/work/notes/results_E3.md, benchmarks/RESULTS.md).

For each data set and view-dropout rate of benchmarks/fusion_quality.py, runs
``benchmarks/fusion_quality_auto.py --refit full`` and ``--refit bag`` (auto's default rule ``--select``, its
default 4 candidates and 3 inner folds) on the cached fits (``auto_cache``: the outer fits for ``full``, the
``*_bag.npz`` inner fold models' outer-test predictions for ``bag``; no new fits when both are there), merges
the ``auto`` and ``auto ensemble`` rows with the single methods' rows of the same conditions (``base_*``,
``core_*``, ``omni_*`` here) and checks issue 18's criterion: held-out mean >= the best single method's mean
minus that method's fold-std (ddof = 1). Prints one line per condition and mode, the count of conditions met,
the mean held-out AUROC per mode and bag - full per outer fold; writes ``--json``.

    python benchmarks/quality_runs/auto_bag_rule.py --json benchmarks/quality_runs/auto_bag_rule.json
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from auto_select_rules import _module, _write_json  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="synthetic2,breast_cancer,htad")
    p.add_argument("--rates", default="0,0.5,0.9")
    p.add_argument("--modes", default="full,bag")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    bench = _module("fusion_quality", HERE.parent / "fusion_quality.py")
    fqa = _module("fusion_quality_auto", HERE.parent / "fusion_quality_auto.py")
    out: dict = {"modes": {}, "conditions": {}}
    for ds in args.datasets.split(","):
        parts = []
        for path in [str(HERE / f"base_{ds}.json"), str(HERE / f"core_{ds}.json"),
                     *sorted(glob.glob(str(HERE / f"omni_{ds}_*_abl.json"))),
                     *sorted(glob.glob(str(HERE / f"omni_{ds}_*_e.json")))]:
            with open(path) as fh:
                parts.append(json.load(fh)["scores"])
        singles, _ = bench.merge_scores(parts)
        for rate in args.rates.split(","):
            for mode in args.modes.split(","):
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    scores = fqa.main(["--dataset", ds, "--dropout", rate, "--refit", mode])
                (cond, rows), = scores.items()
                pool = {k: np.array([r["auroc"] for r in v]) for k, v in singles[cond].items()
                        if bench._is_single_method(k)}
                best = max(pool, key=lambda k: pool[k].mean())
                b = pool[best]
                key = f"{ds} {cond}"
                c = out["conditions"].setdefault(key, {"best_single": best, "best_mean": float(b.mean()),
                                                       "best_std": float(b.std(ddof=1))})
                for row, name in ((bench.AUTO_ROW, "auto"), (bench.ENSEMBLE_ROW, "auto ensemble")):
                    a = np.array([r["auroc"] for r in rows[row]])
                    ok = bool(a.mean() >= b.mean() - b.std(ddof=1))
                    c.setdefault(mode, {})[name] = {"mean": float(a.mean()), "per_fold": a.tolist(), "met": ok,
                                                    "chosen": [r.get("chosen") for r in rows[row]]}
                    m = out["modes"].setdefault(mode, {}).setdefault(name, {"met": 0, "means": []})
                    m["met"] += ok
                    m["means"].append(float(a.mean()))
                    print(f"{key:24s} {mode:4s} {name:13s} {a.mean():.4f} vs {best} {b.mean():.4f} ± "
                          f"{b.std(ddof=1):.4f}: {'met' if ok else 'NOT met'} ({a.mean() - b.mean():+.4f})"
                          + (f"; chose {', '.join(r['chosen'] for r in rows[row])}" if name == "auto" else ""),
                          flush=True)
    for mode, rows in out["modes"].items():
        for name, m in rows.items():
            m["mean_auroc"] = float(np.mean(m["means"]))
            print(f"{mode} {name}: criterion met in {m['met']} of {len(m['means'])} conditions; mean held-out "
                  f"AUROC {m['mean_auroc']:.4f}")
    if {"full", "bag"} <= set(out["modes"]):
        for name in ("auto", "auto ensemble"):
            d = np.concatenate([np.array(c["bag"][name]["per_fold"]) - np.array(c["full"][name]["per_fold"])
                                for c in out["conditions"].values()])
            out.setdefault("bag_minus_full", {})[name] = {"better": int((d > 1e-12).sum()),
                                                          "same": int((np.abs(d) <= 1e-12).sum()),
                                                          "worse": int((d < -1e-12).sum()),
                                                          "mean": float(d.mean())}
            print(f"{name}: bag - full per outer fold ({len(d)}): {out['bag_minus_full'][name]}")
    if args.json:
        _write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

"""Issue 18's auto criterion under each selection rule of ``raypipe.tune.auto.choose_model`` (``--select``).

For each data set and view-dropout rate of benchmarks/fusion_quality.py and each rule, runs
``benchmarks/fusion_quality_auto.py --select RULE`` on its cached fits (no new fits: every candidate's inner
out-of-fold and outer test probabilities are in ``auto_cache``), merges its ``auto`` row with the single
methods' rows of the same conditions (``base_*``, ``core_*``, ``omni_*`` JSON files here) and checks: auto's
held-out mean >= the best single method's mean minus that method's fold-std (ddof = 1). Prints one line per
condition and rule, the count of conditions met and the mean held-out AUROC per rule; writes ``--json``.

    python benchmarks/quality_runs/auto_select_rules.py --json benchmarks/quality_runs/auto_select_rules.json
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import io
import json
import os
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent


def _module(name: str, path: pathlib.Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _write_json(path: str, doc: dict) -> None:
    """``doc`` as JSON at ``path``, written to a temporary file and renamed over it."""
    with open(path + ".tmp", "w") as fh:
        json.dump(doc, fh, indent=2)
    os.replace(path + ".tmp", path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="synthetic2,breast_cancer,htad")
    p.add_argument("--rates", default="0,0.5,0.9")
    p.add_argument("--rules", default="best,ensemble_1se,simplest_1se")
    p.add_argument("--candidates", default=None, help="fusion_quality_auto.py --candidates (default: its own)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    bench = _module("fusion_quality", HERE.parent / "fusion_quality.py")
    fqa = _module("fusion_quality_auto", HERE.parent / "fusion_quality_auto.py")
    out: dict = {"rules": {}, "conditions": {}}
    for ds in args.datasets.split(","):
        singles_files = [str(HERE / f"base_{ds}.json"), str(HERE / f"core_{ds}.json"),
                         *sorted(glob.glob(str(HERE / f"omni_{ds}_*_abl.json"))),
                         *sorted(glob.glob(str(HERE / f"omni_{ds}_*_e.json")))]
        parts = []
        for path in singles_files:
            with open(path) as fh:
                parts.append(json.load(fh)["scores"])
        singles, _ = bench.merge_scores(parts)
        for rate in args.rates.split(","):
            for rule in args.rules.split(","):
                cli = ["--dataset", ds, "--dropout", rate, "--select", rule]
                if args.candidates:
                    cli += ["--candidates", args.candidates]
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    scores = fqa.main(cli)
                (cond, rows), = scores.items()
                auto = rows[bench.AUTO_ROW]
                a = np.array([r["auroc"] for r in auto])
                pool = {k: np.array([r["auroc"] for r in v]) for k, v in singles[cond].items()
                        if bench._is_single_method(k)}
                best = max(pool, key=lambda k: pool[k].mean())
                b = pool[best]
                ok = bool(a.mean() >= b.mean() - b.std(ddof=1))
                key = f"{ds} {cond}"
                out["conditions"].setdefault(key, {"best_single": best, "best_mean": float(b.mean()),
                                                   "best_std": float(b.std(ddof=1))})
                out["conditions"][key][rule] = {"auto_mean": float(a.mean()), "per_fold": a.tolist(),
                                                "chosen": [r["chosen"] for r in auto], "met": ok}
                r = out["rules"].setdefault(rule, {"met": 0, "means": []})
                r["met"] += ok
                r["means"].append(float(a.mean()))
                print(f"{key:28s} {rule:13s} auto {a.mean():.4f} vs {best} {b.mean():.4f} ± {b.std(ddof=1):.4f}: "
                      f"{'met' if ok else 'NOT met'} (diff {a.mean() - b.mean():+.4f}); chose "
                      f"{', '.join(x['chosen'] for x in auto)}", flush=True)
    for rule, r in out["rules"].items():
        r["mean_auroc"] = float(np.mean(r["means"]))
        print(f"{rule}: criterion met in {r['met']} of {len(r['means'])} conditions; mean held-out AUROC "
              f"{r['mean_auroc']:.4f}")
    if args.json:
        _write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

"""Issue 18's auto criterion with ``train.method=auto``'s own inner fold count (5), ``--refit bag``, auto's default
``--select`` and the 4 default candidates (helper E5's pre-stated rule, /work/notes/results_E5.md).

Reads the per-condition outputs of ``auto_k5_run.sh`` (``auto_k5_<ds>_<rate>.json``, written by
``benchmarks/fusion_quality_auto.py --inner-folds 5 --refit bag``; no fits here) and computes

1. issue 18's criterion exactly as ``auto_bag_rule.py`` does, by calling its ``main`` per condition with
   ``fusion_quality_auto.main`` answered from those JSON files (rows ``auto`` and ``auto ensemble``: held-out
   mean >= the best single method's mean minus its fold-std, ddof = 1, over the 17 single methods' rows of
   base_/core_/omni_*.json); beside it the recorded 3-inner-fold bag rows (``auto_bag_rule.json``);
2. ensemble vs its best member: ``auto ensemble``'s held-out mean >= the best of the 4 candidates' mean minus
   that candidate's fold-std (ddof = 1); 2a (deciding) with the members as the ensemble uses them under bag
   (detail ``outer``), 2b with their refitted outer fits (detail ``outer_full``); for 5 and for 3 inner folds.

Conditions whose JSON is missing are listed as not run.

    python benchmarks/quality_runs/auto_k5_rule.py --json benchmarks/quality_runs/auto_k5_rule.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from auto_select_rules import _module, _write_json  # noqa: E402


def _arg(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def member_check(detail: list[dict], ens_folds: list[float], key: str) -> dict:
    """Criterion 2 on one condition: the ensemble's outer per-fold AUROC against the best candidate's
    (``key``: ``outer`` = as the ensemble uses them, ``outer_full`` = refitted)."""
    labels = list(detail[0][key])
    per = {l: np.array([d[key][l] for d in detail]) for l in labels}
    best = max(per, key=lambda l: per[l].mean())
    b, e = per[best], np.array(ens_folds)
    return {"best_member": best, "best_mean": float(b.mean()), "best_std": float(b.std(ddof=1)),
            "ensemble_mean": float(e.mean()), "met": bool(e.mean() >= b.mean() - b.std(ddof=1)),
            "members": {l: float(v.mean()) for l, v in per.items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="breast_cancer,synthetic2,htad")
    p.add_argument("--rates", default="0,0.5,0.9")
    p.add_argument("--prefix", default="auto_k5", help="per-condition JSON files <prefix>_<ds>_<rate>.json")
    p.add_argument("--inner-folds", type=int, default=5, help="the inner fold count the JSON files must have")
    p.add_argument("--recorded", default="auto_bag", help="the recorded 3-inner-fold bag runs' JSON prefix")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    fqa = _module("fusion_quality_auto", HERE.parent / "fusion_quality_auto.py")
    rule = _module("auto_bag_rule", HERE / "auto_bag_rule.py")

    def from_json(argv_):  # fusion_quality_auto.main's rows, read from the run's own output (no fits)
        with open(HERE / f"{args.prefix}_{_arg(argv_, '--dataset')}_{_arg(argv_, '--dropout')}.json") as fh:
            doc = json.load(fh)
        assert doc["auto"]["refit"] == "bag" and doc["auto"]["inner_folds"] == args.inner_folds, doc["auto"]
        return doc["scores"]

    fqa.main = from_json
    with open(HERE / "auto_bag_rule.json") as fh:
        recorded = json.load(fh)["conditions"]
    out: dict = {"conditions": {}, "not_run": [], "met": {}}
    for ds in args.datasets.split(","):
        for rate in args.rates.split(","):
            path = HERE / f"{args.prefix}_{ds}_{rate}.json"
            if not path.exists():
                out["not_run"].append(f"{ds} {rate}")
                continue
            with contextlib.redirect_stdout(io.StringIO()):
                res = rule.main(["--datasets", ds, "--rates", rate, "--modes", "bag"])
            (key, c), = res["conditions"].items()
            with open(path) as fh:
                doc = json.load(fh)
            rec = recorded[key]
            row = {"best_single": c["best_single"], "bar": c["best_mean"] - c["best_std"],
                   "best_mean": c["best_mean"], "best_std": c["best_std"], "inner_folds_5": c["bag"],
                   "inner_folds_3_recorded": rec["bag"], "seconds": doc["seconds"],
                   "auto_select": doc["auto"]["select"], "candidates": doc["auto"]["candidates"]}
            det5 = doc["auto"]["folds"]
            ens5 = c["bag"]["auto ensemble"]["per_fold"]
            row["member_check_5"] = {k: member_check(det5, ens5, k) for k in ("outer", "outer_full")}
            with open(HERE / f"{args.recorded}_{ds}_{rate}.json") as fh:
                det3 = json.load(fh)["auto"]["folds"]
            ens3 = rec["bag"]["auto ensemble"]["per_fold"]
            row["member_check_3_recorded"] = {k: member_check(det3, ens3, k) for k in ("outer", "outer_full")}
            row["oof_max_diff"] = max(max(d["oof_max_diff"].values()) for d in det5)
            out["conditions"][key] = row
            a5, e5 = c["bag"]["auto"], c["bag"]["auto ensemble"]
            a3, e3 = rec["bag"]["auto"], rec["bag"]["auto ensemble"]
            m5 = row["member_check_5"]["outer"]
            print(f"{key:24s} bar {row['bar']:.4f} ({c['best_single']} {c['best_mean']:.4f} ± {c['best_std']:.4f}) | "
                  f"auto k3 {a3['mean']:.4f} {'met' if a3['met'] else 'NOT'} | auto k5 {a5['mean']:.4f} "
                  f"{'met' if a5['met'] else 'NOT'} | ens k3 {e3['mean']:.4f} {'met' if e3['met'] else 'NOT'} | "
                  f"ens k5 {e5['mean']:.4f} {'met' if e5['met'] else 'NOT'} | k5 chose {','.join(a5['chosen'])} | "
                  f"k5 ens vs best member {m5['best_member']} {m5['best_mean']:.4f} ± {m5['best_std']:.4f}: "
                  f"{'met' if m5['met'] else 'NOT'} (refit members: "
                  f"{'met' if row['member_check_5']['outer_full']['met'] else 'NOT'}); {doc['seconds']:.0f} s",
                  flush=True)
    conds = out["conditions"].values()
    for name, get in (("auto k3 (recorded)", lambda r: r["inner_folds_3_recorded"]["auto"]["met"]),
                      ("auto k5", lambda r: r["inner_folds_5"]["auto"]["met"]),
                      ("auto ensemble k3 (recorded)", lambda r: r["inner_folds_3_recorded"]["auto ensemble"]["met"]),
                      ("auto ensemble k5", lambda r: r["inner_folds_5"]["auto ensemble"]["met"]),
                      ("ensemble vs best member k3 (bag members)", lambda r: r["member_check_3_recorded"]["outer"]["met"]),
                      ("ensemble vs best member k5 (bag members)", lambda r: r["member_check_5"]["outer"]["met"]),
                      ("ensemble vs best member k3 (refit members)",
                       lambda r: r["member_check_3_recorded"]["outer_full"]["met"]),
                      ("ensemble vs best member k5 (refit members)", lambda r: r["member_check_5"]["outer_full"]["met"])):
        out["met"][name] = [int(sum(get(r) for r in conds)), len(out["conditions"])]
        print(f"{name}: met in {out['met'][name][0]} of {out['met'][name][1]} conditions run", flush=True)
    for name in ("auto", "auto ensemble"):
        d = [r["inner_folds_5"][name]["mean"] - r["inner_folds_3_recorded"][name]["mean"] for r in conds]
        if d:
            out.setdefault("k5_minus_k3_mean", {})[name] = float(np.mean(d))
            print(f"{name}: mean held-out AUROC k5 - k3 over the conditions run {np.mean(d):+.4f}", flush=True)
    if out["not_run"]:
        print("not run: " + ", ".join(out["not_run"]), flush=True)
    if args.json:
        _write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

"""Apply docs/fusion.md's selection rule to fusion_quality JSON files (one per condition).

A candidate row replaces the current default row iff its mean AUROC over the conditions is higher
and in no condition is it below the default by more than the default's fold-std (ddof 1) there;
among qualifiers the highest mean. Prints a markdown table (mean ± std per condition, the mean) and
the verdict per candidate.

    python benchmarks/quality_runs/omni_rule.py --default omnifuse benchmarks/quality_runs/omni_root_*_0.?.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy.stats import ttest_rel


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--default", default="omnifuse", help="the row the candidates must beat")
    p.add_argument("--metric", default="auroc")
    args = p.parse_args(argv)
    cond, rows = [], None
    for f in args.files:
        d = json.load(open(f))
        for key, scores in d["scores"].items():
            cond.append((f"{d['dataset']} {key}", {r: [s[args.metric] for s in v] for r, v in scores.items()
                                                     if v and not r.startswith("ref:")}))
            rows = list(cond[-1][1]) if rows is None else [r for r in rows if r in cond[-1][1]]
    print("| row | " + " | ".join(c for c, _ in cond) + " | mean |")
    print("|---|" + "---|" * (len(cond) + 1))
    means = {}
    for r in rows:
        vals = [np.mean(sc[r]) for _, sc in cond]
        means[r] = float(np.mean(vals))
        print(f"| {r} | " + " | ".join(f"{np.mean(sc[r]):.3f} ± {np.std(sc[r], ddof=1):.3f}" for _, sc in cond)
              + f" | {means[r]:.4f} |")
    print()
    qualify = []
    for r in rows:
        if r == args.default:
            continue
        worst = min((np.mean(sc[r]) - np.mean(sc[args.default])) / max(np.std(sc[args.default], ddof=1), 1e-12)
                    for _, sc in cond)
        ps = [ttest_rel(sc[r], sc[args.default]).pvalue for _, sc in cond]
        ok = means[r] > means[args.default] and worst >= -1
        qualify += [r] if ok else []
        print(f"- {r}: mean {means[r]:.4f} vs {means[args.default]:.4f} ({means[r] - means[args.default]:+.4f}); "
              f"worst condition {worst:+.2f} default fold-stds; paired p vs default {min(ps):.2g}-{max(ps):.2g}: "
              f"{'QUALIFIES' if ok else 'does not qualify'}")
    best = max(qualify, key=means.get) if qualify else None
    print(f"\nverdict: {'replace the default by ' + best if best else 'keep the current default'}")


if __name__ == "__main__":
    main()

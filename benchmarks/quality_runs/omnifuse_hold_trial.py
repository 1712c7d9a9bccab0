"""``omni_trial.py`` (fusion_quality with OmniFuse constructor options the config lacks) plus the option
``imp_patience`` (issue 14 item 4: the loop's early stopping waits while the cascade's validation
imputation NMSE still improves; docs/fusion.md, /work/notes/results_A2.md for the pre-written rule).

    python benchmarks/quality_runs/omnifuse_hold_trial.py --dataset synthetic2 --folds 3 --epochs 20 \\
        --patience 5 --dropout 0.5 --methods=omnifuse --no-ablation --no-single --variant hold5:imp_patience=5
"""

from __future__ import annotations

import os
import sys

from pydantic import Field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import omni_trial  # noqa: E402  (installs the widened configuration into fusion_quality)

omni_trial.TRIAL.add("imp_patience")


class HoldTrialOmniFuseConfig(omni_trial.TrialOmniFuseConfig):
    imp_patience: int = Field(0, ge=0)


omni_trial.TrialOmniFuseConfig = HoldTrialOmniFuseConfig  # what _train_config validates with
omni_trial.config.OmniFuseConfig = HoldTrialOmniFuseConfig  # what fusion_quality validates --variant with

if __name__ == "__main__":
    omni_trial.fusion_quality.main()

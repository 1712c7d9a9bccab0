"""``benchmarks/fusion_quality.py`` with OmniFuse constructor options that raypipe/config.py's
OmniFuseConfig does not have yet (options under trial: cascade_init, imp_warmup, imp_hide_one, cascade_passes).

The harness is fusion_quality's own, unchanged (same folds, masks, rows, report); only the
configuration step is widened: ``--variant``/``--set`` keys the installed OmniFuseConfig lacks are
validated against the OmniFuse constructor's options below and reach the model through
``train.method_args``. Once config.py has the fields this wrapper is not needed.

    python benchmarks/quality_runs/omni_trial.py --dataset synthetic2 --folds 3 --epochs 20 --patience 5 \\
        --dropout 0.5 --methods=concat --ablation b --no-single --variant zero:cascade_init=zero
"""

from __future__ import annotations

import os
import sys
from typing import Literal

from pydantic import Field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fusion_quality  # noqa: E402
import raypipe.config as config  # noqa: E402

TRIAL = {"cascade_init", "imp_warmup", "imp_hide_one", "cascade_passes"}


class TrialOmniFuseConfig(config.OmniFuseConfig):
    cascade_init: Literal["default", "zero"] = "default"
    imp_warmup: int = Field(0, ge=0)
    imp_hide_one: bool = False
    cascade_passes: int = Field(0, ge=0)


_TrainConfig = config.TrainConfig


def _train_config(**kw):
    omni = dict(kw.pop("omnifuse", None) or {})
    trial = {k: omni.pop(k) for k in list(omni) if k in TRIAL}
    TrialOmniFuseConfig(**omni, **trial)  # validated like a config section
    if trial:
        kw["method_args"] = {**kw.get("method_args", {}), **trial}
    return _TrainConfig(omnifuse=omni, **kw)


config.OmniFuseConfig = TrialOmniFuseConfig  # what fusion_quality validates --set/--variant against
fusion_quality.TrainConfig = _train_config

if __name__ == "__main__":
    fusion_quality.main()

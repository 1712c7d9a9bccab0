"""Ray job: every stage, raw files to predictions and report.

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/X.yaml

Inside a job, Ray is already running: `init_ray` joins it (RAY_ADDRESS is set by
the job supervisor). With `--set synth.n=...` and `--synth`, a synthetic cohort is
written first (the demo, on a cluster).
"""

import sys

from _common import job_config
from raypipe.cli import PIPELINE_STEPS, run_pipeline

if __name__ == "__main__":
    synth = "--synth" in sys.argv
    if synth:
        sys.argv.remove("--synth")
    cfg = job_config(__doc__)
    steps = (("synth",) if synth else ()) + PIPELINE_STEPS
    sys.exit(run_pipeline(cfg, steps, title="pipeline job"))

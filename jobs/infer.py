"""Ray job: the infer stage. `ray job submit --working-dir . -- python jobs/infer.py --config configs/X.yaml`"""

import sys

from _common import job_config
from raypipe.cli import run_pipeline

if __name__ == "__main__":
    cfg = job_config(__doc__)
    sys.exit(run_pipeline(cfg, ("infer",), title="infer job"))

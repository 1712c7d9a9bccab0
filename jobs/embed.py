"""Ray job: the embed stage. `ray job submit --working-dir . -- python jobs/embed.py --config configs/X.yaml`"""

import sys

from _common import job_config
from raypipe.cli import run_pipeline

if __name__ == "__main__":
    cfg = job_config(__doc__)
    sys.exit(run_pipeline(cfg, ("embed",), title="embed job"))

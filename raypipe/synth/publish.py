"""Atomic publication of a synthetic cohort written into a temporary directory."""

from __future__ import annotations

import json
import os
import shutil


def publish_cohort(tmp: str, out_dir: str, summary: dict) -> None:
    """Write ``truth.json`` into ``tmp`` and move ``tmp`` into place as ``out_dir`` (replacing it)."""
    with open(os.path.join(tmp, "truth.json"), "w") as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)

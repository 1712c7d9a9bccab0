"""Shared fixtures: one Ray for the whole session, small synthetic cohorts in tmp dirs.

No test touches the network: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE are forced on.
"""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAYPIPE_ID_SECRET", "test-secret-for-raypipe-tests")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs) shared by every test that needs it; shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    yield ray
    ray.shutdown()

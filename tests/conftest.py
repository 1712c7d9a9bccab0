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


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only contend (10x slower under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs) shared by every test that needs it; shut down at the end.

    ``address="local"``: always a new cluster, never one that a `ray start` (job-submit or
    cluster tests, another process on this machine) left in /tmp/ray/ray_current_cluster.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def clinical_cohort(tmp_path_factory):
    """A small synthetic clinical cohort (12 patients, 10 slices of 32x32) written once per session.

    Returns (cohort_dir, truth_summary). Treat it as read-only.
    """
    from raypipe.synth.clinical import write_clinical_cohort

    out = str(tmp_path_factory.mktemp("cohort") / "clinical")
    summary = write_clinical_cohort(out, n=12, seed=0, slices=10, image_size=32)
    return out, summary


@pytest.fixture(scope="session")
def regions_cohort(tmp_path_factory):
    """A small synthetic regions cohort (8 regions, 64x64 scenes). Returns (dir, summary)."""
    from raypipe.synth.regions import write_regions_cohort

    out = str(tmp_path_factory.mktemp("cohort") / "regions")
    return out, write_regions_cohort(out, n=8, seed=0, scene_size=64)

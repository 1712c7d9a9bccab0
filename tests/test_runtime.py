"""Runtime: a local Ray keeps its files under the run directory; joining uses the address."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from raypipe.config import load_config
from raypipe.runtime import _local_temp_dir, results_dir


def test_results_dir_under_out_dir(tmp_path):
    cfg = load_config(None, [f"run.out_dir={tmp_path}"])
    assert results_dir(cfg) == os.path.join(str(tmp_path), "ray_results")
    cfg = load_config(None, ["run.out_dir=s3://bucket/run1"])
    assert results_dir(cfg) == "s3://bucket/run1/ray_results"


def test_long_out_dir_gets_short_linked_temp_dir(tmp_path):
    deep = tmp_path / ("x" * 60) / "run"
    short = _local_temp_dir(str(deep))
    assert len(short) <= 40 and os.path.isdir(short)
    assert os.path.realpath(deep / ".ray") == os.path.realpath(short)


def test_init_ray_starts_local_ray_with_files_under_run(tmp_path):
    # A separate process: the test session already has its own Ray.
    out = tmp_path / "r"
    code = textwrap.dedent(f"""
        import os, ray
        from raypipe.config import load_config
        from raypipe.runtime import init_ray
        cfg = load_config(None, ["run.out_dir={out}", "ray.num_cpus=1", "ray.progress_bars=false"])
        ctx = init_ray(cfg)
        assert ctx.started_local
        assert ray.cluster_resources()["CPU"] == 1
        import ray.data
        assert ray.data.DataContext.get_current().enable_progress_bars is False
        assert init_ray(cfg).started_local is False  # idempotent
        ray.shutdown()
        print("TEMP", ctx.temp_dir)
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    temp = r.stdout.split("TEMP", 1)[1].strip()
    assert os.path.realpath(temp) == os.path.realpath(out / ".ray")
    assert any(name.startswith("session_") for name in os.listdir(temp))
    # quiet console (ray.quiet, the default): Ray's messages went to the run log, not the console
    log_text = (out / "logs" / "ray.log").read_text()
    assert "Started a local Ray instance" in log_text
    assert "Started a local Ray instance" not in r.stdout + r.stderr


def test_dashboard_setting_resolves_against_the_installed_ray():
    from raypipe.runtime import _dashboard_wanted

    assert _dashboard_wanted(True) is True and _dashboard_wanted(False) is False
    try:
        import ray.dashboard.optional_deps  # noqa: F401
        installed = True
    except ImportError:
        installed = False
    assert _dashboard_wanted(None) is installed  # ray[default] (a project dependency) -> on

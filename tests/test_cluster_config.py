"""cluster.yaml passes the Ray cluster launcher's own schema and keeps the house rules."""

from __future__ import annotations

import copy
import pathlib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_launcher_schema_accepts_it(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before launching anything: fill the provider defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_launcher_schema_rejects_a_broken_copy(cluster):
    import jsonschema

    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(cluster)
    del broken["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_node_types_images_dashboard_and_auth(cluster):
    nodes = cluster["available_node_types"]
    assert cluster["head_node_type"] == "head"
    assert nodes["gpu_worker"]["resources"].get("GPU", 0) >= 1
    assert "GPU" not in nodes["cpu_worker"]["resources"]
    images = [cluster["docker"]["image"], nodes["gpu_worker"]["docker"]["worker_image"]]
    assert all(i.startswith("rayproject/ray:") and "ray-ml" not in i for i in images)
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # only via `ray dashboard` port-forwarding
    assert "0.0.0.0" not in yaml.safe_dump(cluster)
    starts = head + " ".join(cluster["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=disabled" not in starts and starts.count("RAY_AUTH_MODE=token") == 2
    assert any("raypipe" in c for c in cluster["setup_commands"])

"""Start or join Ray, set Ray Data's context, and keep Ray's files under the run directory.

Rules (docs/cluster.md):
- ``ray.address`` in the config, ``--address`` on the CLI or ``RAY_ADDRESS`` in the
  environment joins an existing cluster; otherwise a local Ray is started, sized to
  this machine (or to ``ray.num_cpus``/``ray.num_gpus``).
- A local Ray keeps its session files (logs, spilled objects) under
  ``<run.out_dir>/.ray`` and Train/Tune results under ``<run.out_dir>/ray_results``,
  so that one run's files live in one place.
- Ray's token authentication is left exactly as Ray ships it.
- Quiet console (``ray.quiet``, on unless ``raypipe -v``): Ray's own output goes to
  ``<run.out_dir>/logs/ray.log``; see :mod:`raypipe.console`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass

from raypipe.config import Config

log = logging.getLogger(__name__)

# Unix socket paths are limited to ~107 bytes; Ray puts sockets under
# <temp_dir>/session_<timestamp>/sockets/plasma_store, which adds ~60.
_MAX_TEMP_DIR_LEN = 40


@dataclass(frozen=True)
class RayContext:
    """What :func:`init_ray` did: whether it started Ray, and where results go."""

    started_local: bool
    address: str | None
    results_dir: str  # storage_path for Ray Train / Tune
    temp_dir: str | None


def _local_temp_dir(out_dir: str) -> str:
    want = os.path.abspath(os.path.join(out_dir, ".ray"))
    if len(want) <= _MAX_TEMP_DIR_LEN:
        return want
    # Too long for Ray's sockets: use a short, stable path and link it from the run dir.
    short = os.path.join(tempfile.gettempdir(), "rp-" + hashlib.sha1(want.encode()).hexdigest()[:10])
    os.makedirs(short, exist_ok=True)
    os.makedirs(os.path.dirname(want), exist_ok=True)
    if not os.path.lexists(want):
        try:
            os.symlink(short, want)
        except OSError:  # e.g. a filesystem without symlinks: the temp dir still works
            pass
    return short


def results_dir(cfg: Config) -> str:
    """Storage path for Ray Train/Tune results (must be shared storage on a multi-node cluster)."""
    out = cfg.run.out_dir
    if "://" in out:
        return out.rstrip("/") + "/ray_results"
    return os.path.abspath(os.path.join(out, "ray_results"))


def configure_data_context(cfg: Config) -> None:
    """Ray Data settings raypipe relies on: progress bars, deterministic order, no dropped blocks."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    if _quiet(cfg):
        # One bar per dataset on a terminal, none per operator; without a terminal Ray Data would log
        # multi-line progress reports every few seconds instead: off (raypipe prints a line per stage).
        ctx.enable_operator_progress_bars = False
        from raypipe import console

        if not console.on_screen():  # a terminal or a notebook's output area keeps its bars
            ctx.enable_progress_bars = False
    # Outputs are sorted by id before writing; preserving order keeps runs reproducible.
    ctx.execution_options.preserve_order = True
    # Bad rows are quarantined inside our UDFs (errors table); a failing block is a bug,
    # never something to silently drop with its good rows.
    ctx.max_errored_blocks = 0


def init_ray(cfg: Config, address: str | None = None) -> RayContext:
    """Start or join Ray for ``cfg`` and configure Ray Data. Idempotent within a process."""
    import ray

    addr = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    res_dir = results_dir(cfg)
    if ray.is_initialized():
        configure_data_context(cfg)
        return RayContext(False, addr, res_dir, None)

    run_log = _open_console(cfg)
    if addr:
        log.info("joining Ray cluster at %s", addr)
        ray.init(address=addr, log_to_driver=cfg.ray.log_to_driver)
        configure_data_context(cfg)
        _route_console(cfg, run_log)
        return RayContext(False, addr, res_dir, None)

    os.makedirs(cfg.run.out_dir, exist_ok=True)
    temp_dir = _local_temp_dir(cfg.run.out_dir)
    kwargs = dict(
        num_cpus=cfg.ray.num_cpus or os.cpu_count(),
        log_to_driver=cfg.ray.log_to_driver,
        # The dashboard process also serves Ray's state API, which Ray Train V2's controller
        # polls; without it every training run logs tracebacks. Bound to localhost only.
        include_dashboard=_dashboard_wanted(cfg.ray.dashboard),
        dashboard_host="127.0.0.1",
        _temp_dir=temp_dir,
    )
    if cfg.ray.num_gpus is not None:
        kwargs["num_gpus"] = cfg.ray.num_gpus
    if cfg.ray.object_store_memory:
        kwargs["object_store_memory"] = cfg.ray.object_store_memory
    log.info("starting a local Ray with %s CPUs (temp dir %s)", kwargs["num_cpus"], temp_dir)
    ray.init(**kwargs)
    global _local_gcs
    _local_gcs = ray.get_runtime_context().gcs_address
    configure_data_context(cfg)
    _route_console(cfg, run_log)
    return RayContext(True, None, res_dir, temp_dir)


#: GCS address of the local Ray that :func:`init_ray` started in this process (None: joined or none)
_local_gcs: str | None = None


def on_own_local_ray() -> bool:
    """Whether this process is connected to the one-machine Ray that :func:`init_ray` started here
    (not to a cluster it joined, whose nodes may come and go)."""
    import ray

    return _local_gcs is not None and ray.is_initialized() and ray.get_runtime_context().gcs_address == _local_gcs


def _quiet(cfg: Config) -> bool:
    from raypipe import console

    return cfg.ray.quiet and not console.verbose()


def _open_console(cfg: Config) -> str | None:
    """Before ``ray.init``: the run log (Ray's start-up messages are its first lines)."""
    from raypipe import console

    if not _quiet(cfg) and not console.verbose():
        return None  # ray.quiet=false from a library caller: Ray prints as it always does
    path = console.open_run_log(cfg.run.out_dir)
    if path:
        log.info("Ray's messages: %s", path)
    return path


def _route_console(cfg: Config, run_log: str | None) -> None:
    """After ``ray.init``: Ray's worker/raylet output and the driver's native error lines to the run log."""
    from raypipe import console

    if run_log is None:
        return
    console.open_run_log(cfg.run.out_dir)  # again: `import ray.data` configured its console handler
    console.route_ray_output()
    if _quiet(cfg):
        console.capture_native_stderr()


def _dashboard_wanted(setting: bool | None) -> bool:
    """``ray.dashboard`` resolved: None means "when ray[default]'s dashboard dependencies are installed"."""
    if setting is not None:
        return setting
    try:
        import ray.dashboard.optional_deps  # noqa: F401 - what Ray itself checks for ray[default]
    except ImportError as exc:
        log.warning("Ray's dashboard dependencies (ray[default]) are missing (%s): starting Ray without the "
                    "dashboard; Ray Train V2 then logs state-API errors", exc)
        return False
    return True


def cluster_resources() -> dict[str, float]:
    """CPUs/GPUs of the connected cluster (for deriving pool sizes)."""
    import ray

    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))}


def actor_cpus(pool_size: int, cpus: float) -> float:
    """CPUs per actor so that a pool of ``pool_size`` never holds every CPU of the cluster.

    Ray Data's read tasks need a free CPU; an actor pool that takes them all hangs the
    pipeline. One CPU per actor when there is room, a fraction otherwise.
    """
    # 1 whole CPU stays free for a read task, plus a margin for small reservations such as a
    # Tune trial's driver ({"CPU": 0.01}); 0.99 free CPUs would not fit a 1-CPU read task.
    spare = max(cpus - 1.1, 0.5)
    return min(1.0, spare / max(pool_size, 1))

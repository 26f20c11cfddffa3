"""The Ray cluster a pool runs on: Ray imported only here and only when a pool starts, a local
cluster sized for this machine (or a running one, probed first: Ray itself retries an address
that answers nothing for minutes), and each worker's share of it."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from vengine.distributed.config import PoolConfig
from vengine.engine.threads import available_cores
from vengine.errors import ConfigError, one_line

LOCAL_OBJECT_STORE = 256 * 2**20  # rows and prompt ids only: Ray's default is 30% of RAM
PROBE_TIMEOUT_S = 5.0
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding vengine/


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("workers: Ray is not installed; pip install vengine[distributed]",
                          field="workers") from None
    return ray


class Cluster:
    """A connection to Ray for one pool; `close` shuts down only what this pool started."""

    def __init__(self, config: PoolConfig) -> None:
        self.ray = ray = import_ray()
        self.started, self.temp_dir = False, None
        if config.host_port is not None:
            _probe(config.ray_address, *config.host_port)
        if ray.is_initialized():  # the caller's own ray.init (a test, a notebook): use it
            return
        quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
        try:
            if config.ray_address is None:
                self.temp_dir = tempfile.mkdtemp(prefix="vengine-ray-")
                ray.init(address="local", num_cpus=available_cores(), include_dashboard=False,
                         object_store_memory=LOCAL_OBJECT_STORE, _temp_dir=self.temp_dir, **quiet)
            else:
                ray.init(address=config.ray_address, **quiet)
        except (ConnectionError, ValueError, RuntimeError) as e:
            self.close()
            where = config.ray_address or "a local cluster"
            raise ConfigError(f"ray_address {where}: cannot start Ray ({one_line(e)})",
                              field="ray_address") from None
        self.started = True

    def worker_options(self, workers: int, engine_options: dict[str, Any]
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(Ray actor options, engine options) of one worker: a GPU each where the cluster has
        enough and --device allows, else an equal share of the CPUs with as many threads."""
        resources = self.ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        device = str(engine_options.get("device", "auto"))
        use_gpus = device != "cpu" and gpus > 0
        if device.startswith("cuda") and not gpus:
            raise ConfigError(f"device {device}: the Ray cluster has no GPU", field="device")
        if use_gpus and workers > gpus:
            raise ConfigError(f"workers {workers}: the Ray cluster has {gpus} GPUs, one a worker",
                              field="workers")
        if not use_gpus and workers > cpus:
            raise ConfigError(f"workers {workers}: the Ray cluster has {cpus} CPUs, one at least "
                              "a worker", field="workers")
        share = max(1, cpus // workers)
        path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        actor = {"num_cpus": share, "num_gpus": 1 if use_gpus else 0, "max_restarts": 0,
                 "runtime_env": {"env_vars": {"PYTHONPATH": path}}}  # this vengine, not another
        threads = engine_options.get("threads") or share
        return actor, {**engine_options, "threads": threads}

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def _probe(address: str, host: str, port: int) -> None:
    """Fail in seconds, with one line, where nothing listens at the head's address."""
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"ray_address {address}: cannot connect "
                          f"({e.strerror or one_line(e)})", field="ray_address") from None

"""What a pool of engine workers needs besides the engine's own options, checked before Ray
starts: how many workers, and which cluster."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vengine.checks import check_int
from vengine.errors import ConfigError

ADDRESS = re.compile(r"auto|\[?[\w.:-]+?\]?:\d{1,5}")  # "auto" or host:port (IPv6 in brackets)


@dataclass(frozen=True)
class PoolConfig:
    """workers: engine actors (one GPU each, or a share of the CPUs), each holding at most its
    engine's max_batch requests. ray_address: a running Ray cluster ("host:port" of its head, or
    "auto"); None starts a local one for the pool alone."""

    workers: int = 1
    ray_address: str | None = None

    def __post_init__(self) -> None:
        check_int(self.workers, "workers", 1, 4096)
        address = self.ray_address
        if address is not None and not (isinstance(address, str) and ADDRESS.fullmatch(address)):
            raise ConfigError(f"ray_address must be host:port (the Ray head's GCS address) or "
                              f"auto, got {address!r}", field="ray_address")
        if self.host_port is not None and not 1 <= self.host_port[1] <= 65535:
            raise ConfigError(f"ray_address {address}: the port must be in [1, 65535]",
                              field="ray_address")

    @property
    def host_port(self) -> tuple[str, int] | None:
        """The head's (host, port) to probe before Ray tries it (None: auto or a local cluster)."""
        if self.ray_address in (None, "auto"):
            return None
        host, _, port = self.ray_address.rpartition(":")
        return host.strip("[]"), int(port)

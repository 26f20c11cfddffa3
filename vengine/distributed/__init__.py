"""Data-parallel batch generation: engine workers on Ray, fed by one driver (`EnginePool`,
`generate_pool`). Ray is imported when a pool starts, never by `import vengine.distributed`."""

from __future__ import annotations

from vengine.distributed.config import PoolConfig
from vengine.distributed.pool import EnginePool, generate_pool

__all__ = ["EnginePool", "PoolConfig", "generate_pool"]

"""Session stores: where the gateway keeps sessions so that they outlive it.

``open_store`` reads ``--session-store``: ``sqlite`` (the default; a database
under ``--state-dir``, one gateway), ``memory`` (lost on restart) or
``redis://host:port/db`` (shared by several gateway replicas).
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.store.base import Fence, SessionRecord, SessionStore, TurnRecord
from specdec.core.errors import InvalidArgument

__all__ = [
    "Fence",
    "SessionRecord",
    "SessionStore",
    "TurnRecord",
    "default_state_dir",
    "open_store",
]


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/specdec``, else ``~/.local/state/specdec``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "specdec"


async def open_store(spec: str, state_dir: str = "") -> SessionStore:
    """The store ``spec`` names; ``Unavailable`` when it cannot be reached or opened."""
    if spec == "memory":
        from gateway.store.memory import MemoryStore

        return MemoryStore()
    if spec == "sqlite":
        from gateway.store.sqlite import SqliteStore

        return SqliteStore(state_dir or default_state_dir())
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from gateway.store.redis import RedisStore

        store = RedisStore(spec)
        await store.ping()
        return store
    raise InvalidArgument(
        f"--session-store must be sqlite, memory or redis://host:port/db, got {spec!r}"
    )


def describe(store: SessionStore) -> str:
    """Where ``store`` keeps sessions, for the start-up log."""
    path = getattr(store, "path", None) or getattr(store, "url", None)
    return str(path) if path is not None else "memory (lost on restart)"

"""The head's hard state on disk: deployments and the epoch counter, in SQLite (standard library).

Runs in the head process, called from its reactor thread only; owns no socket. Every write is committed
before the head acknowledges the command that caused it, so an acknowledged deploy survives a crash.
Soft state (agents, placements, health) is never stored: agents report it again after a restart; only
which agent owns which replica is kept, as a security binding.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Optional

from runtime.stack_config import DeploymentSpec, parse_deployment

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,          -- JSON of DeploymentSpec.to_dict()
    generation INTEGER NOT NULL, -- bumped when anything but the replica count changes (rolling update)
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS replica_owners (  -- which agent started each replica (runtime.authz)
    replica_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL
);
"""


class StateStore:
    def __init__(self, path: Optional[str | Path]) -> None:
        """`path` None keeps state in memory only (tests, throwaway stacks)."""
        target = str(path) if path else ":memory:"
        if path:
            # the state directory (admin token, keys/) is the head's alone: 0700 when we make it, and the
            # database 0600 from its first byte (SQLite gives its -wal and -shm files the same mode)
            Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        # autocommit with explicit transactions; built in one thread, used by the reactor thread only
        self._db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def next_epoch(self) -> int:
        """A new epoch, larger than any this store handed out before (and than wall-clock ms)."""
        with self._tx():
            row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            epoch = max(int(row[0]) + 1 if row else 0, int(time.time() * 1000))
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (str(epoch),))
        return epoch

    def seeded(self) -> bool:
        """True once a config file's deployments were applied, or any deployment was ever stored."""
        row = self._db.execute("SELECT value FROM meta WHERE key='seeded'").fetchone()
        return row is not None or self._db.execute("SELECT 1 FROM deployments LIMIT 1").fetchone() is not None

    def mark_seeded(self) -> None:
        with self._tx():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('seeded', '1')")

    def load(self) -> list[tuple[DeploymentSpec, int]]:
        rows = self._db.execute("SELECT spec, generation FROM deployments ORDER BY name").fetchall()
        out = []
        for spec, gen in rows:
            try:
                out.append((parse_deployment(json.loads(spec)), gen))
            except ValueError as exc:  # stored by an older head that took it (a count past 2**64 - 1)
                log.error("[startup] stored deployment spec no longer valid, not loaded (deploy it again): %s", exc)
        return out

    def put(self, spec: DeploymentSpec, generation: int) -> None:
        with self._tx():
            self._db.execute("INSERT OR REPLACE INTO deployments VALUES (?, ?, ?, ?)",
                             (spec.name, json.dumps(spec.to_dict(), sort_keys=True), generation, time.time()))

    def delete(self, name: str) -> None:
        with self._tx():
            self._db.execute("DELETE FROM deployments WHERE name=?", (name,))

    def owners(self) -> dict[str, str]:
        """replica id -> the agent bound to it at its first report (kept across head restarts, so an agent
        key cannot claim another agent's replicas while the head re-learns placements; head.access drops a
        binding once its replica is gone for good)."""
        return dict(self._db.execute("SELECT replica_id, agent_id FROM replica_owners").fetchall())

    def bind_owners(self, pairs: list[tuple[str, str]]) -> None:
        with self._tx():
            self._db.executemany("INSERT OR IGNORE INTO replica_owners VALUES (?, ?)", pairs)

    def drop_owners(self, replica_ids: list[str]) -> None:
        with self._tx():
            self._db.executemany("DELETE FROM replica_owners WHERE replica_id=?", [(r,) for r in replica_ids])

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> "_Transaction":
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")

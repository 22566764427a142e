"""Persistent MAC → IPv4 leases per LAN, in one sqlite file under ``--data-dir``.

The BAVY guest takes its address once and never asks again, so the same MAC must get the same
address across reconnects *and* relay restarts. WAL mode keeps a registration to one small
write without an fsync per commit; leases are few and written only when a MAC registers.
Addresses go out highest first (10.0.2.254 down to 10.0.2.10, as the BAVY relay does); when
the pool is full, the least recently used lease of a MAC with no live session gives way.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

from relay.errors import ConfigError
from relay.lan.addresses import POOL_FIRST, POOL_LAST, Lease, LeaseError, PoolExhausted

log = logging.getLogger("relay.lan")

SCHEMA_VERSION = 1
BUSY_TIMEOUT = 0.1
"""Seconds to wait for a lock held by another process: the wait blocks the relay's loop."""
FILE_NAME = "leases.sqlite3"


class LeaseDatabase:
    """The lease file; one connection, used from the relay's single trio thread."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        try:
            self._db = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot use lease database {path}: {exc}") from None

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise ConfigError(f"{self.path} was written by a newer relay (schema {version})")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS leases ("
            " lan TEXT NOT NULL, mac BLOB NOT NULL, ip INTEGER NOT NULL,"
            " last_used REAL NOT NULL, PRIMARY KEY (lan, mac), UNIQUE (lan, ip))"
        )
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @classmethod
    def in_dir(cls, data_dir: Path) -> LeaseDatabase:
        return cls(data_dir / FILE_NAME)

    def pool(self, lan: str) -> SqlitePool:
        return SqlitePool(self, lan)

    def close(self) -> None:
        self._db.close()

    def lookup(self, lan: str, mac: bytes) -> IPv4Address | None:
        row = self._db.execute(
            "SELECT ip FROM leases WHERE lan = ? AND mac = ?", (lan, mac)
        ).fetchone()
        return None if row is None else IPv4Address(row[0])

    def lease(
        self,
        lan: str,
        mac: bytes,
        in_use: frozenset[bytes],
        first: IPv4Address = POOL_FIRST,
        last: IPv4Address = POOL_LAST,
    ) -> IPv4Address:
        try:
            return self._lease(lan, mac, in_use, first, last)
        except sqlite3.Error as exc:
            log.error("lease database %s: %s", self.path, exc)
            raise LeaseError("lease database unavailable") from None

    def _lease(
        self,
        lan: str,
        mac: bytes,
        in_use: frozenset[bytes],
        first: IPv4Address,
        last: IPv4Address,
    ) -> IPv4Address:
        now = self._clock()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            ip = self.lookup(lan, mac)
            if ip is not None:
                db.execute(
                    "UPDATE leases SET last_used = ? WHERE lan = ? AND mac = ?", (now, lan, mac)
                )
            else:
                ip = self._free_address(lan, in_use, int(first), int(last))
                db.execute(
                    "INSERT INTO leases (lan, mac, ip, last_used) VALUES (?, ?, ?, ?)",
                    (lan, mac, int(ip), now),
                )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return ip

    def _free_address(
        self, lan: str, in_use: frozenset[bytes], first: int, last: int
    ) -> IPv4Address:
        taken = {
            ip
            for (ip,) in self._db.execute(
                "SELECT ip FROM leases WHERE lan = ? AND ip BETWEEN ? AND ?", (lan, first, last)
            )
        }
        for candidate in range(last, first - 1, -1):
            if candidate not in taken:
                return IPv4Address(candidate)
        for mac, ip in self._db.execute(
            "SELECT mac, ip FROM leases WHERE lan = ? AND ip BETWEEN ? AND ?"
            " ORDER BY last_used ASC",
            (lan, first, last),
        ).fetchall():
            if bytes(mac) not in in_use:
                self._db.execute("DELETE FROM leases WHERE lan = ? AND mac = ?", (lan, mac))
                return IPv4Address(ip)
        raise PoolExhausted("IP pool exhausted")


class SqlitePool:
    """One LAN's view of the lease file (an ``AddressAllocator``)."""

    def __init__(self, database: LeaseDatabase, lan: str) -> None:
        self.database = database
        self.lan = lan

    def lease(self, mac: bytes, *, in_use: frozenset[bytes]) -> Lease:
        return Lease(mac, self.database.lease(self.lan, mac, in_use))

    def lookup(self, mac: bytes) -> Lease | None:
        ip = self.database.lookup(self.lan, mac)
        return None if ip is None else Lease(mac, ip)

"""Persistent leases in sqlite."""

from __future__ import annotations

import sqlite3
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from relay.errors import ConfigError
from relay.lan.addresses import LeaseError, PoolExhausted
from relay.lan.leases import LeaseDatabase

A, B, C = (bytes((2, 0, 0, 0, 0, n)) for n in (1, 2, 3))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_highest_first_sticky_and_per_lan(tmp_path: Path) -> None:
    db = LeaseDatabase.in_dir(tmp_path)
    default, other = db.pool("default"), db.pool("other")
    assert default.lease(A, in_use=frozenset()).ip == IPv4Address("10.0.2.254")
    assert default.lease(B, in_use=frozenset()).ip == IPv4Address("10.0.2.253")
    assert default.lease(A, in_use=frozenset()).ip == IPv4Address("10.0.2.254")
    assert other.lease(B, in_use=frozenset()).ip == IPv4Address("10.0.2.254")
    lease = default.lookup(B)
    assert lease is not None and lease.ip == IPv4Address("10.0.2.253")
    assert other.lookup(A) is None


def test_leases_survive_reopening_and_use_wal(tmp_path: Path) -> None:
    db = LeaseDatabase.in_dir(tmp_path)
    first = [db.pool("default").lease(m, in_use=frozenset()).ip for m in (A, B, C)]
    db.close()
    again = LeaseDatabase.in_dir(tmp_path)
    assert [again.pool("default").lease(m, in_use=frozenset()).ip for m in (C, B, A)] == first[::-1]
    mode = sqlite3.connect(tmp_path / "leases.sqlite3").execute("PRAGMA journal_mode").fetchone()
    assert mode == ("wal",)


def test_full_pool_reclaims_least_recently_used_idle_lease(tmp_path: Path) -> None:
    db = LeaseDatabase(tmp_path / "l.db", clock=Clock())
    ten, eleven = IPv4Address("10.0.2.10"), IPv4Address("10.0.2.11")
    assert db.lease("x", A, frozenset(), first=ten, last=eleven) == eleven
    assert db.lease("x", B, frozenset(), first=ten, last=eleven) == ten
    db.lease("x", A, frozenset(), first=ten, last=eleven)  # A used more recently than B
    assert db.lease("x", C, frozenset({A}), first=ten, last=eleven) == ten  # B gave way
    assert db.lookup("x", B) is None
    with pytest.raises(PoolExhausted):
        db.lease("x", B, frozenset({A, C}), first=ten, last=eleven)


def test_unusable_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "leases.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError, match="lease database"):
        LeaseDatabase.in_dir(tmp_path)


def test_a_locked_database_refuses_quickly_instead_of_blocking(tmp_path: Path) -> None:
    db = LeaseDatabase.in_dir(tmp_path)
    other = sqlite3.connect(tmp_path / "leases.sqlite3", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(LeaseError, match="lease database unavailable"):
        db.lease("default", A, frozenset())
    other.execute("ROLLBACK")
    assert db.lease("default", A, frozenset()) == IPv4Address("10.0.2.254")

"""What the SQLite stores (batch jobs, feedback) share: files only their owner can read, one write
transaction taken at its start, and telling a lock held too long by another process from other
failures."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

log = structlog.get_logger("routesvc.sqlite")

# The first pause between two tries to switch a file to WAL, doubled each try up to the longest.
_FIRST_PAUSE_SECONDS = 0.001
_LONGEST_PAUSE_SECONDS = 0.05


def create_private(path: Path | str) -> None:
    """Create the database file at ``path``, readable and writable by its owner only, unless it
    exists. SQLite would create it 0644 (less the umask), readable by every local user, and gives
    its -wal and -shm files the database file's mode: the batch store holds prompts and answers,
    the feedback store embeddings of prompts and tenant names. A file that cannot be made here
    (a folder that is not there, a read-only one) is left to SQLite's open, which says why."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


@contextlib.contextmanager
def immediate(connection: sqlite3.Connection) -> Iterator[None]:
    """One write transaction on ``connection`` (opened with ``isolation_level=None``), taken at its
    start so other processes wait on the busy timeout; rolled back if the block (or the commit)
    raises."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        # SQLite has rolled back already after some errors (a full disk, an I/O error): a second
        # ROLLBACK would fail and hide the error that ended the transaction.
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is SQLITE_BUSY: another connection held the lock past the busy timeout (a
    passing condition, unlike a full disk or a file that is not a database). An error Python's
    sqlite3 raises itself (a closed connection's ProgrammingError) has no SQLite code: not busy."""
    return result_code(exc) == sqlite3.SQLITE_BUSY


def result_code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code of ``exc`` (of an extended one), None for an error Python's
    sqlite3 raised itself (no ``sqlite_errorcode``)."""
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def use_wal(connection: sqlite3.Connection, path: Path | str, busy_timeout_seconds: float) -> None:
    """Switch the file at ``path`` (opened by ``connection``) to WAL, waiting up to
    ``busy_timeout_seconds`` for another connection's lock. The switch of a new file reads it
    under a shared lock, then needs an exclusive one: when another connection holds the write lock
    meanwhile (several processes opening one new file at once, the workers of ``serve --workers
    N``), SQLite fails at once with SQLITE_BUSY rather than call the busy handler (the two could
    wait on each other), so the switch is tried again, after a short pause, until that time
    has passed. A file in WAL already switches at once."""
    deadline = time.monotonic() + busy_timeout_seconds
    pause = _FIRST_PAUSE_SECONDS
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
            if pause == _FIRST_PAUSE_SECONDS:
                log.debug("sqlite_wal_switch_waiting", path=str(path))
        time.sleep(pause)
        pause = min(2 * pause, _LONGEST_PAUSE_SECONDS)

"""The synchronous SQLite half of the embedded store.

Everything here runs on the embedded store's single worker thread, one statement group
per transaction, so the asyncio loop never waits on disk or on another process's lock.

Schema: ``kv`` holds the current keys (etcd's "keyIndex" collapsed to its latest
version), ``log`` holds one row per change (the revision history that watches replay),
``lease`` holds leases with absolute expiry times (wall clock, because several processes
share the file and they only share the wall clock), ``meta`` holds the current and the
oldest kept revision. Keys are stored as UTF-8 BLOBs so that ``ORDER BY`` and prefix
ranges compare bytes exactly like etcd does.

Write transactions use ``BEGIN IMMEDIATE``: they take the file's write lock before
reading, so two processes never both read revision N and both write N+1.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from villi.errors import StoreError
from villi.kvstore._keys import prefix_range
from villi.kvstore.store import (
    Compacted,
    EventType,
    KeyValue,
    LeaseID,
    ListResult,
    TxnOp,
    WatchEvent,
    check_unique,
)

_PUT, _DELETE = 0, 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY, value BLOB NOT NULL, create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv(lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS log (
    rev INTEGER NOT NULL, seq INTEGER NOT NULL, type INTEGER NOT NULL,
    key BLOB NOT NULL, value BLOB NOT NULL, PRIMARY KEY (rev, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lease (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ttl INTEGER NOT NULL, expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS lease_by_expiry ON lease(expires);
INSERT OR IGNORE INTO meta VALUES ('revision', 1), ('compact_revision', 1);
"""


def _kv(row: tuple[bytes, bytes, int, int, int | None]) -> KeyValue:
    key, value, create_rev, mod_rev, lease = row
    return KeyValue(
        key.decode(), bytes(value), create_rev, mod_rev, LeaseID(lease) if lease else None)


class Database:
    """One SQLite connection and the store's operations on it (not thread-safe: the
    embedded store calls it from one worker thread)."""

    def __init__(
        self,
        path: str | None,
        *,
        history: int,
        clock: Callable[[], float],
        durable: bool = True,
        busy_timeout_ms: int = 5000,
    ) -> None:
        self.path = path
        self.history = history
        self.clock = clock
        self.commits = 0  # our own committed changes, so the async side knows to notify
        self._conn = sqlite3.connect(
            path or ":memory:", isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if path is not None:
                self._conn.execute("PRAGMA journal_mode = WAL")
                self._conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            with self._write(expire=False):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    # --- transactions -----------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A snapshot: every SELECT inside sees the same committed state (WAL)."""
        self._expire_if_due()
        self._conn.execute("BEGIN")
        try:
            yield self._conn
        finally:
            self._conn.execute("COMMIT")

    @contextmanager
    def _write(self, *, expire: bool = True) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        self._changed = False
        try:
            if expire:
                self._expire_locked()
            yield self._conn
            if self._changed:
                self._compact_if_needed()
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        if self._changed:
            self.commits += 1

    def _meta(self, name: str) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return int(row[0])

    def _set_meta(self, name: str, value: int) -> None:
        self._conn.execute("UPDATE meta SET value = ? WHERE name = ?", (value, name))

    def _new_revision(self) -> int:
        rev = self._meta("revision") + 1
        self._set_meta("revision", rev)
        self._changed = True
        return rev

    # --- changes (inside a write transaction) -------------------------------------------

    def _put_locked(self, key: bytes, value: bytes, lease: int | None, rev: int,
                    seq: int = 0) -> None:
        if lease is not None and not self._lease_alive(lease):
            raise StoreError(f"lease {lease} not found or expired")
        self._conn.execute(
            "INSERT INTO kv VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT(key) DO UPDATE SET "
            "value = excluded.value, mod_rev = excluded.mod_rev, version = version + 1, "
            "lease = excluded.lease",
            (key, value, rev, rev, lease),
        )
        self._conn.execute("INSERT INTO log VALUES (?, ?, ?, ?, ?)",
                           (rev, seq, _PUT, key, value))

    def _delete_keys_locked(self, keys: list[bytes], rev: int) -> None:
        """Delete ``keys`` (all existing) in revision ``rev``, one log row each."""
        for seq, key in enumerate(keys):
            self._conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            self._conn.execute("INSERT INTO log VALUES (?, ?, ?, ?, x'')", (rev, seq, _DELETE, key))

    def _lease_alive(self, lease: int) -> bool:
        row = self._conn.execute("SELECT expires FROM lease WHERE id = ?", (lease,)).fetchone()
        return row is not None and row[0] > self.clock()

    def _drop_lease_locked(self, lease: int) -> None:
        """Remove a lease and its keys (one revision for all of them, as etcd does)."""
        keys = [r[0] for r in self._conn.execute(
            "SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,))]
        if keys:
            self._delete_keys_locked(keys, self._new_revision())
        self._conn.execute("DELETE FROM lease WHERE id = ?", (lease,))

    def _expire_locked(self) -> None:
        expired = [r[0] for r in self._conn.execute(
            "SELECT id FROM lease WHERE expires <= ? ORDER BY expires", (self.clock(),))]
        for lease in expired:
            self._drop_lease_locked(lease)
        if expired:
            self._changed = True

    def _expire_if_due(self) -> None:
        due = self._conn.execute(
            "SELECT 1 FROM lease WHERE expires <= ? LIMIT 1", (self.clock(),)).fetchone()
        if due:
            with self._write():
                pass

    def _compact_if_needed(self) -> None:
        rev, oldest = self._meta("revision"), self._meta("compact_revision")
        # Compact in steps of ~10% so the DELETE runs once per many writes, not each one.
        if rev - oldest + 1 > self.history + max(1, self.history // 10):
            self._compact_locked(rev - self.history + 1)

    def _compact_locked(self, revision: int) -> None:
        self._conn.execute("DELETE FROM log WHERE rev < ?", (revision,))
        self._set_meta("compact_revision", revision)

    # --- the store's operations -----------------------------------------------------------

    def revision(self) -> int:
        with self._read():
            return self._meta("revision")

    def get(self, key: str) -> KeyValue | None:
        with self._read() as c:
            row = c.execute(
                "SELECT key, value, create_rev, mod_rev, lease FROM kv WHERE key = ?",
                (key.encode(),)).fetchone()
        return _kv(row) if row else None

    def list_prefix(self, prefix: str) -> ListResult:
        start, end = prefix_range(prefix)
        with self._read() as c:
            rows = c.execute(
                "SELECT key, value, create_rev, mod_rev, lease FROM kv WHERE key >= ? "
                "AND (? IS NULL OR key < ?) ORDER BY key", (start, end, end)).fetchall()
            return ListResult([_kv(r) for r in rows], self._meta("revision"))

    def put(self, key: str, value: bytes, lease: int | None) -> int:
        with self._write():
            rev = self._new_revision()
            self._put_locked(key.encode(), value, lease, rev)
        return rev

    def delete(self, key: str) -> bool:
        return self._delete_where(key.encode(), key.encode() + b"\0") > 0

    def delete_prefix(self, prefix: str) -> int:
        return self._delete_where(*prefix_range(prefix))

    def _delete_where(self, start: bytes, end: bytes | None) -> int:
        with self._write() as c:
            keys = [r[0] for r in c.execute(
                "SELECT key FROM kv WHERE key >= ? AND (? IS NULL OR key < ?) ORDER BY key",
                (start, end, end))]
            if keys:
                self._delete_keys_locked(keys, self._new_revision())
        return len(keys)

    def compare_and_swap(self, key: str, expected: int, value: bytes, lease: int | None) -> bool:
        """Write when the key's mod revision equals ``expected`` (0: when absent)."""
        with self._write() as c:
            row = c.execute("SELECT mod_rev FROM kv WHERE key = ?", (key.encode(),)).fetchone()
            if (row[0] if row else 0) != expected:
                return False
            self._put_locked(key.encode(), value, lease, self._new_revision())
        return True

    def compare_and_delete(self, key: str, expected: int) -> bool:
        with self._write() as c:
            row = c.execute("SELECT mod_rev FROM kv WHERE key = ?", (key.encode(),)).fetchone()
            if row is None or row[0] != expected:
                return False
            self._delete_keys_locked([key.encode()], self._new_revision())
        return True

    def commit(self, ops: Sequence[TxnOp], expect: Mapping[str, int]) -> int | None:
        """Every op in one revision if every expected mod revision still holds."""
        check_unique(ops)
        with self._write() as c:
            for key, expected in expect.items():
                row = c.execute("SELECT mod_rev FROM kv WHERE key = ?",
                                (key.encode(),)).fetchone()
                if (row[0] if row else 0) != expected:
                    return None
            rev: int | None = None
            seq = 0
            for op in ops:
                bkey = op.key.encode()
                if op.value is None:
                    if c.execute("SELECT 1 FROM kv WHERE key = ?", (bkey,)).fetchone() is None:
                        continue
                    rev = rev or self._new_revision()
                    c.execute("DELETE FROM kv WHERE key = ?", (bkey,))
                    c.execute("INSERT INTO log VALUES (?, ?, ?, ?, x'')",
                              (rev, seq, _DELETE, bkey))
                else:
                    rev = rev or self._new_revision()
                    self._put_locked(bkey, bytes(op.value), op.lease, rev, seq)
                seq += 1
            return rev if rev is not None else self._meta("revision")

    def grant_lease(self, ttl: int) -> LeaseID:
        with self._write() as c:
            cur = c.execute("INSERT INTO lease (ttl, expires) VALUES (?, ?)",
                            (ttl, self.clock() + ttl))
            lease = cur.lastrowid
        assert lease is not None
        return LeaseID(lease)

    def keep_alive(self, lease: int) -> bool:
        # The write transaction first expires due leases, so an expired lease is gone
        # (and its keys deleted) before we look for it.
        with self._write() as c:
            row = c.execute("SELECT ttl FROM lease WHERE id = ?", (lease,)).fetchone()
            if row is None:
                return False
            c.execute("UPDATE lease SET expires = ? WHERE id = ?", (self.clock() + row[0], lease))
        return True

    def revoke_lease(self, lease: int) -> None:
        with self._write():
            self._drop_lease_locked(lease)

    def expire_leases(self) -> None:
        """The background sweep: cheap when nothing is due (one indexed SELECT)."""
        self._expire_if_due()

    def compact(self, revision: int) -> None:
        with self._write():
            current, oldest = self._meta("revision"), self._meta("compact_revision")
            if revision > current:
                raise StoreError(f"cannot compact to {revision}: current revision is {current}")
            if revision > oldest:
                self._compact_locked(revision)

    def events(
        self, prefix: str, from_rev: int, max_revisions: int
    ) -> tuple[list[WatchEvent], int]:
        """Changes under ``prefix`` in revisions ``[from_rev, from_rev + max_revisions)``
        and the last revision this scan covered (the caller continues after it).

        Windows are counted in revisions, not rows, so the events of one revision (a
        prefix delete, a lease expiry) are never split between two calls.
        """
        start, end = prefix_range(prefix)
        with self._read() as c:
            oldest = self._meta("compact_revision")
            if from_rev < oldest:
                raise Compacted(oldest)
            upto = min(self._meta("revision"), from_rev + max_revisions - 1)
            rows = c.execute(
                "SELECT rev, type, key, value FROM log WHERE rev >= ? AND rev <= ? AND "
                "key >= ? AND (? IS NULL OR key < ?) ORDER BY rev, seq",
                (from_rev, upto, start, end, end)).fetchall()
        events = [
            WatchEvent(EventType.PUT if t == _PUT else EventType.DELETE, k.decode(), bytes(v), r)
            for r, t, k, v in rows
        ]
        return events, upto

    def data_version(self) -> int:
        """Changes when ANOTHER connection (process) commits; our own commits are
        counted in :attr:`commits`."""
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

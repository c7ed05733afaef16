"""The traffic store: prompts (and optionally completions) captured by the server, in SQLite.

The server writes, ``zeda capture export`` and ``zeda retrain`` read; the store is the only
thing besides checkpoints and the admin API that they share. The database runs in WAL mode, so
readers never block the writer, and every write is one short transaction that also applies the
retention limits: rows older than ``max_age_s``, then the oldest rows beyond ``max_rows``, then
the oldest rows while the stored pages exceed ``max_bytes``. Freed pages go back to the file
system (incremental auto-vacuum), so the file stays bounded too.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from zeda_core.atomic import atomic_write_text
from zeda_core.errors import ZedaError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS captures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    endpoint TEXT NOT NULL,
    model_version TEXT NOT NULL,
    prompt TEXT NOT NULL,
    chat INTEGER NOT NULL,
    completion TEXT,
    zero_expert_ratio REAL
);
CREATE INDEX IF NOT EXISTS captures_created ON captures (created);
"""
_BUSY_TIMEOUT_S = 30.0
_TRIM_SHARE = 0.1  # over the byte bound, drop this share of the rows (at least one) per pass


@dataclass(frozen=True)
class CapturedRequest:
    """One captured request.

    Attributes:
        prompt: the user turn of a single-turn chat (``chat`` true), else the full prompt text
            the model continued (a multi-turn chat arrives already rendered by its template).
        completion: the generated text, only when completions are captured.
        zero_expert_ratio: the request's measured r_ze (share of routed slots that were zero).
    """

    endpoint: str
    model_version: str
    prompt: str
    chat: bool
    completion: str | None = None
    zero_expert_ratio: float | None = None
    created: float = 0.0
    id: int = 0


class TrafficStore:
    """A bounded SQLite store of captured requests; safe to share between threads.

    Args:
        path: database file (created with its parent directory).
        max_rows: rows kept; the oldest go first.
        max_age_s: rows older than this many seconds are dropped.
        max_bytes: bound on the database's used pages; the oldest rows go first.
    """

    def __init__(
        self,
        path: str | Path,
        max_rows: int = 100_000,
        max_age_s: float = 30 * 86400.0,
        max_bytes: int = 1 << 30,
    ) -> None:
        if max_rows < 1 or max_age_s <= 0 or max_bytes < 1:
            raise ZedaError(
                f"capture limits must be positive (max_rows={max_rows}, max_age_s={max_age_s}, max_bytes={max_bytes})"
            )
        self.path = Path(path)
        self.max_rows, self.max_age_s, self.max_bytes = max_rows, max_age_s, max_bytes
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new database
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ZedaError(f"cannot open the capture store {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    def add(self, request: CapturedRequest) -> int:
        """Insert one row (its ``created`` defaults to now) and apply retention; returns its id."""
        created = request.created or time.time()
        with self._lock:
            with self._db:
                cursor = self._db.execute(
                    "INSERT INTO captures"
                    " (created, endpoint, model_version, prompt, chat, completion, zero_expert_ratio)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        created,
                        request.endpoint,
                        request.model_version,
                        request.prompt,
                        int(request.chat),
                        request.completion,
                        request.zero_expert_ratio,
                    ),
                )
                self._apply_retention()
            self._db.execute("PRAGMA incremental_vacuum").fetchall()  # hand freed pages back to the file system
        return int(cursor.lastrowid)

    def _apply_retention(self) -> None:
        """Drop rows past the age, count and byte bounds, oldest first (inside the write's transaction)."""
        self._db.execute("DELETE FROM captures WHERE created < ?", (time.time() - self.max_age_s,))
        self._db.execute(
            "DELETE FROM captures WHERE id <= (SELECT id FROM captures ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (self.max_rows,),
        )
        while self._used_bytes() > self.max_bytes:
            rows = int(self._db.execute("SELECT COUNT(*) FROM captures").fetchone()[0])
            if rows <= 1:
                return
            oldest = "SELECT id FROM captures ORDER BY id LIMIT ?"
            self._db.execute(f"DELETE FROM captures WHERE id IN ({oldest})", (max(1, int(rows * _TRIM_SHARE)),))

    def _used_bytes(self) -> int:
        """Bytes in pages that hold data (free pages excluded)."""
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._db.execute("PRAGMA page_size").fetchone()[0]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM captures").fetchone()[0])

    def rows(self, since: float = 0.0, limit: int | None = None) -> Iterator[CapturedRequest]:
        """Rows created at or after ``since`` (unix seconds), newest first, at most ``limit``."""
        query = (
            "SELECT endpoint, model_version, prompt, chat, completion, zero_expert_ratio, created, id"
            " FROM captures WHERE created >= ? ORDER BY id DESC"
        )
        with self._lock:
            fetched = self._db.execute(query + (" LIMIT ?" if limit else ""), (since, limit) if limit else (since,))
            records = fetched.fetchall()
        for endpoint, version, prompt, chat, completion, ratio, created, row_id in records:
            yield CapturedRequest(endpoint, version, prompt, bool(chat), completion, ratio, created, row_id)

    def export_jsonl(self, out: str | Path, since: float = 0.0, limit: int | None = None) -> int:
        """Write rows (oldest first) to ``out`` as JSONL, atomically; returns the row count.

        Each line also carries ``domain: "captured"`` so the file is a valid prompt set for
        ``zeda train opd`` and ``zeda retrain``.
        """
        records = [asdict(r) | {"domain": "captured"} for r in reversed(list(self.rows(since, limit)))]
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
        return len(records)

    def close(self) -> None:
        """Fold the write-ahead log into the database file, then close it."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            self._db.close()


def open_existing_store(path: str | Path) -> TrafficStore:
    """Open a store that must already exist (readers: export, retrain)."""
    if not Path(path).is_file():
        raise ZedaError(f"capture store {path} does not exist (start the server with --capture-db {path})")
    return TrafficStore(path)

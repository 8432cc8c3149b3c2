"""Reviewer decisions, stored in SQLite beside the audit, never lost.

The table is append-only: every decision is a new row, and the current decision for a slice is its
latest row. A decision is committed (``synchronous=FULL``) before :meth:`ReviewStore.record` returns,
so a UI that confirms after the call never confirms a decision that is not on disk. Decisions are
keyed by the audit's ID and the synthetic slice's content hash, so they survive a restart and a
re-run of the same audit.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

__all__ = ["DECISIONS", "Review", "ReviewStore", "ReviewError"]

#: The decisions a reviewer can record for a flagged pair.
DECISIONS: tuple[str, ...] = ("copy", "near copy", "not a copy", "unsure")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    audit_id TEXT NOT NULL,
    slice_sha256 TEXT NOT NULL,
    slice_key TEXT NOT NULL DEFAULT '',
    decision TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    reviewer TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reviews_audit ON reviews (audit_id, slice_sha256, id);
"""


class ReviewError(ValueError):
    """An invalid decision, reviewer or database."""


@dataclass(frozen=True)
class Review:
    """One recorded decision.

    Attributes
    ----------
    audit_id, slice_sha256, slice_key, decision, comment, reviewer, created_at : str
    id : int
        Row number (monotonic).
    """

    id: int
    audit_id: str
    slice_sha256: str
    slice_key: str
    decision: str
    comment: str
    reviewer: str
    created_at: str


class ReviewStore:
    """SQLite-backed store of reviewer decisions.

    Parameters
    ----------
    path : str or Path
        The database file (created with its folder when missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as con:
                con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ReviewError(
                f"{self.path} is not a usable review database ({e}); choose another file or move it aside."
            ) from e

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        return con

    def record(
        self,
        audit_id: str,
        slice_sha256: str,
        decision: str,
        reviewer: str,
        comment: str = "",
        *,
        slice_key: str = "",
    ) -> Review:
        """Store a decision durably, then return it.

        Parameters
        ----------
        audit_id : str
            The audit's ID (``AuditResult.audit_id``).
        slice_sha256 : str
            Content hash of the synthetic slice.
        decision : str
            One of :data:`DECISIONS`.
        reviewer : str
            Who decided (required).
        comment : str
            Free text.
        slice_key : str
            Human-readable ``path#index`` of the slice.

        Returns
        -------
        Review
        """
        if decision not in DECISIONS:
            raise ReviewError(f"decision {decision!r} is not one of {DECISIONS}.")
        if not reviewer or not reviewer.strip():
            raise ReviewError("reviewer name is required; enter who made the decision.")
        if not audit_id or not slice_sha256:
            raise ReviewError("audit_id and slice_sha256 are required to key a decision.")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._connect() as con:
            cur = con.execute(
                "INSERT INTO reviews (audit_id, slice_sha256, slice_key, decision, comment, reviewer, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (audit_id, slice_sha256, slice_key, decision, comment or "", reviewer.strip(), now),
            )
            row_id = int(cur.lastrowid or 0)
        con.close()
        return Review(row_id, audit_id, slice_sha256, slice_key, decision, comment or "", reviewer.strip(), now)

    def _rows(self, sql: str, args: Iterable) -> list[Review]:
        con = self._connect()
        try:
            rows = con.execute(sql, tuple(args)).fetchall()
        finally:
            con.close()
        return [Review(*r) for r in rows]

    def latest(self, audit_id: str) -> dict[str, Review]:
        """The current decision per slice hash for one audit.

        Returns
        -------
        dict of str to Review
        """
        rows = self._rows(
            "SELECT id, audit_id, slice_sha256, slice_key, decision, comment, reviewer, created_at FROM reviews"
            " WHERE audit_id = ? ORDER BY id",
            (audit_id,),
        )
        return {r.slice_sha256: r for r in rows}

    def history(self, audit_id: str, slice_sha256: str) -> list[Review]:
        """Every decision ever recorded for one slice, oldest first."""
        return self._rows(
            "SELECT id, audit_id, slice_sha256, slice_key, decision, comment, reviewer, created_at FROM reviews"
            " WHERE audit_id = ? AND slice_sha256 = ? ORDER BY id",
            (audit_id, slice_sha256),
        )

    def progress(self, audit_id: str, slice_hashes: Iterable[str]) -> tuple[int, int]:
        """How many of ``slice_hashes`` have a decision: ``(reviewed, total)``."""
        wanted = list(dict.fromkeys(slice_hashes))
        done = self.latest(audit_id)
        return sum(h in done for h in wanted), len(wanted)

    def to_frame(self, audit_id: str) -> pd.DataFrame:
        """Current decisions of one audit as a table (one row per reviewed slice)."""
        rows = [asdict(r) for r in self.latest(audit_id).values()]
        cols = ["id", "audit_id", "slice_sha256", "slice_key", "decision", "comment", "reviewer", "created_at"]
        return pd.DataFrame(rows, columns=cols)

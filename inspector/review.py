"""Reviewer decisions and release sign-offs, in one SQLite store beside the audit, never lost.

Both tables are append-only: every decision is a new row, and the current decision for a slice is its
latest row. A decision is committed (``synchronous=FULL``) before :meth:`ReviewStore.record` returns,
so a UI that confirms after the call never confirms a decision that is not on disk. Decisions are
keyed by the audit's ID and the synthetic slice's content hash, so they survive a restart and a
re-run of the same audit.

When another program holds the database's write lock for longer than the store waits
(:data:`DEFAULT_TIMEOUT_S`, 30 s), a write raises :class:`ReviewStoreBusyError` with a message saying nothing
was saved and to retry: never a raw ``sqlite3.OperationalError``, and never a decision reported saved that is
not on disk.
"""

from __future__ import annotations

import datetime as _dt
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "DECISIONS",
    "SIGNOFF_DECISIONS",
    "Review",
    "ReviewStore",
    "ReviewError",
    "ReviewStoreBusyError",
    "DEFAULT_TIMEOUT_S",
    "SignOff",
    "SignOffError",
    "RecordedSignOff",
]

#: The decisions a reviewer can record for a flagged pair.
DECISIONS: tuple[str, ...] = ("copy", "near copy", "not a copy", "unsure")
#: The decisions a signer can take on the release of the synthetic set.
SIGNOFF_DECISIONS: tuple[str, ...] = ("release", "do not release", "release after removing the flagged slices")

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


class ReviewStoreBusyError(ReviewError):
    """Another program holds the review database's write lock for longer than the store waits; nothing was
    written. The caller keeps what it was saving and retries.

    Attributes
    ----------
    path : Path
    timeout : float
        Seconds the store waited for the lock.
    """

    def __init__(self, message: str, path: Path, timeout: float) -> None:
        super().__init__(message)
        self.path = path
        self.timeout = timeout


#: Seconds a write waits for another writer's lock before :class:`ReviewStoreBusyError`.
DEFAULT_TIMEOUT_S: float = 30.0


class SignOffError(ReviewError):
    """An invalid sign-off, or one refused because flagged pairs are unreviewed and no reason is given."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


@dataclass(frozen=True)
class SignOff:
    """A release decision by a named person.

    Attributes
    ----------
    signer : str
        Who signs (a staff name, never a patient's).
    role : str
        Their role, e.g. "privacy officer".
    decision : str
        One of :data:`SIGNOFF_DECISIONS`.
    date : str
        ISO date ``YYYY-MM-DD`` (or date-time) of the decision; today (UTC) when empty.
    reason : str
        Why; required when flagged pairs are unreviewed.
    """

    signer: str
    role: str
    decision: str
    date: str = ""
    reason: str = ""

    def __post_init__(self) -> None:
        for name in ("signer", "role"):
            val = getattr(self, name)
            if not isinstance(val, str) or not val.strip():
                raise SignOffError(f"SignOff.{name} is required; got {val!r}. State who signs and in which role.")
            object.__setattr__(self, name, val.strip())
        if self.decision not in SIGNOFF_DECISIONS:
            raise SignOffError(f"SignOff.decision {self.decision!r} is not one of {SIGNOFF_DECISIONS}.")
        date = (self.date or "").strip() or _dt.datetime.now(_dt.UTC).date().isoformat()
        try:
            _dt.datetime.fromisoformat(date)
        except ValueError as e:
            raise SignOffError(f"SignOff.date {self.date!r} is not an ISO date; use YYYY-MM-DD.") from e
        object.__setattr__(self, "date", date)
        object.__setattr__(self, "reason", (self.reason or "").strip())


@dataclass(frozen=True)
class RecordedSignOff:
    """A sign-off as stored: the :class:`SignOff` fields plus the review state when it was recorded."""

    id: int
    audit_id: str
    signer: str
    role: str
    decision: str
    date: str
    reason: str
    recorded_at: str
    n_flagged: int
    n_reviewed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SIGNOFF_SCHEMA = """
CREATE TABLE IF NOT EXISTS signoffs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    audit_id TEXT NOT NULL,
    signer TEXT NOT NULL,
    role TEXT NOT NULL,
    decision TEXT NOT NULL,
    date TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    recorded_at TEXT NOT NULL,
    n_flagged INTEGER NOT NULL,
    n_reviewed INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS signoffs_audit ON signoffs (audit_id, id);
CREATE TRIGGER IF NOT EXISTS signoffs_no_update BEFORE UPDATE ON signoffs
BEGIN SELECT RAISE(ABORT, 'signoffs are append-only'); END;
CREATE TRIGGER IF NOT EXISTS signoffs_no_delete BEFORE DELETE ON signoffs
BEGIN SELECT RAISE(ABORT, 'signoffs are append-only'); END;
"""


class ReviewStore:
    """SQLite-backed, append-only store of reviewer decisions and release sign-offs.

    Parameters
    ----------
    path : str or Path
        The database file (created with its folder when missing).
    timeout : float, optional
        Seconds a write waits for another writer's lock (default :data:`DEFAULT_TIMEOUT_S`) before
        :class:`ReviewStoreBusyError`.
    """

    def __init__(self, path: str | Path, *, timeout: float | None = None) -> None:
        self.path = Path(path)
        self.timeout = float(DEFAULT_TIMEOUT_S if timeout is None else timeout)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._session("open") as con:
                have = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
                if not {"reviews", "signoffs", "signoffs_no_update", "signoffs_no_delete"} <= have:
                    con.executescript(_SCHEMA)
                    con.executescript(_SIGNOFF_SCHEMA)
        except ReviewError:
            raise
        except sqlite3.DatabaseError as e:
            raise ReviewError(
                f"{self.path} is not a usable review database ({e}); choose another file or move it aside."
            ) from e

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=self.timeout)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
        except BaseException:
            con.close()
            raise
        return con

    @contextmanager
    def _session(self, doing: str) -> Iterator[sqlite3.Connection]:
        """A connection, closed afterwards; a held lock becomes :class:`ReviewStoreBusyError`, another
        operational failure a :class:`ReviewError` (never a raw ``sqlite3.OperationalError``)."""
        try:
            con = self._connect()
        except sqlite3.OperationalError as e:
            raise self._error(e, doing) from e
        try:
            yield con
        except sqlite3.OperationalError as e:
            raise self._error(e, doing) from e
        finally:
            con.close()

    def _error(self, e: sqlite3.OperationalError, doing: str) -> ReviewError:
        text = str(e).lower()
        if getattr(e, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED") or "locked" in text or "busy" in text:
            return ReviewStoreBusyError(
                f"The review database {self.path} is busy: another program has held its write lock for more than "
                f"{self.timeout:g} s, so it could not {doing} and nothing was written. Nothing is lost; "
                "retry once the other program (another app session, a sign-off, a backup) has finished.",
                self.path,
                self.timeout,
            )
        return ReviewError(f"The review database {self.path} could not {doing} ({e}); nothing was written.")

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
        with self._session("save the decision") as con, con:
            cur = con.execute(
                "INSERT INTO reviews (audit_id, slice_sha256, slice_key, decision, comment, reviewer, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (audit_id, slice_sha256, slice_key, decision, comment or "", reviewer.strip(), now),
            )
            row_id = int(cur.lastrowid or 0)
        return Review(row_id, audit_id, slice_sha256, slice_key, decision, comment or "", reviewer.strip(), now)

    def _rows(self, sql: str, args: Iterable) -> list[Review]:
        with self._session("read the decisions") as con:
            rows = con.execute(sql, tuple(args)).fetchall()
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

    # ------------------------------------------------------------------ sign-offs
    def record_signoff(self, audit_id: str, signoff: SignOff, *, n_flagged: int, n_reviewed: int) -> RecordedSignOff:
        """Store a sign-off durably (committed before returning) and return it."""
        if not audit_id:
            raise SignOffError("audit_id is required to record a sign-off.")
        if not isinstance(signoff, SignOff):
            raise TypeError(f"signoff must be a SignOff; got {type(signoff).__name__}.")
        now = _now()
        values = (
            audit_id,
            signoff.signer,
            signoff.role,
            signoff.decision,
            signoff.date,
            signoff.reason,
            now,
            int(n_flagged),
            int(n_reviewed),
        )
        with self._session("record the sign-off") as con, con:
            cur = con.execute(
                "INSERT INTO signoffs (audit_id, signer, role, decision, date, reason, recorded_at, n_flagged,"
                " n_reviewed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            row_id = int(cur.lastrowid or 0)
        return RecordedSignOff(row_id, *values)

    def signoffs(self, audit_id: str) -> list[RecordedSignOff]:
        """Every sign-off of one audit, oldest first."""
        with self._session("read the sign-offs") as con:
            rows = con.execute(
                "SELECT id, audit_id, signer, role, decision, date, reason, recorded_at, n_flagged, n_reviewed"
                " FROM signoffs WHERE audit_id = ? ORDER BY id",
                (audit_id,),
            ).fetchall()
        return [RecordedSignOff(*r) for r in rows]

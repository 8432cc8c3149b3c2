"""Keyed pseudonyms for subject identifiers, and the secret key they are computed with.

Scheme
------
A DICOM subject's pseudonym is ``"sub-"`` followed by the first 12 hex characters (48 bits) of
``HMAC-SHA256(key, raw_identifier)``, where ``key`` is a per-project secret of 32 random bytes.
Without the key a pseudonym cannot be recomputed from the identifier, so pseudonyms do not link
across projects or sites and short identifiers (record numbers) cannot be enumerated. With the same
key the same identifier always gives the same pseudonym (stable across runs).

Where the key lives
-------------------
:func:`key_path` decides, first match wins:

1. an explicit path (``LoadConfig.pseudonym_key_file``, or the ``path`` argument here);
2. the environment variable ``INSPECTOR_PSEUDONYM_KEY_FILE`` (a path; empty means unset);
3. ``platformdirs.user_config_dir("mri-memorization-inspector")/pseudonym.key``, e.g.
   ``~/.config/mri-memorization-inspector/pseudonym.key`` on Linux,
   ``~/Library/Application Support/mri-memorization-inspector/pseudonym.key`` on macOS,
   ``%LOCALAPPDATA%\\mri-memorization-inspector\\pseudonym.key`` on Windows.

The key is never written into an audit's outputs. :func:`load_or_create_key` creates it on first use
(64 hex characters and a newline; the file mode 0600, its folder 0700 when created), atomically, so
concurrent first runs agree on one key. A key file readable by other users is used with a logged
warning. A key file may also hold exactly 32 raw bytes (``head -c 32 /dev/urandom > key``).

Sharing across sites, deliberately
----------------------------------
Pseudonyms computed under different keys never match. To make two sites (or two machines) give the
same pseudonym to the same patient, copy one key file to the other site over a secure channel and
point ``INSPECTOR_PSEUDONYM_KEY_FILE`` (or ``LoadConfig.pseudonym_key_file``) at it. Anyone holding
the key and a candidate identifier can test whether that identifier is behind a pseudonym: treat the
key like the identifiers themselves. Deleting or replacing the key changes every pseudonym.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

__all__ = [
    "APP_NAME",
    "KEY_ENV_VAR",
    "KEY_FILE_NAME",
    "KEY_BYTES",
    "PseudonymKeyError",
    "key_path",
    "load_or_create_key",
    "pseudonym",
    "root_hash",
]

log = logging.getLogger(__name__)

#: The application name of the default config folder.
APP_NAME = "mri-memorization-inspector"
#: Environment variable naming the key file (a path), overriding the default location.
KEY_ENV_VAR = "INSPECTOR_PSEUDONYM_KEY_FILE"
#: File name of the key in the default config folder.
KEY_FILE_NAME = "pseudonym.key"
#: Length of a generated key in bytes.
KEY_BYTES = 32
#: Hex characters of the HMAC kept in a pseudonym.
_DIGITS = 12


class PseudonymKeyError(ValueError):
    """The pseudonym key file exists but cannot be used (unreadable, malformed, not a file)."""


def key_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The key file to use: ``path``, else ``$INSPECTOR_PSEUDONYM_KEY_FILE``, else the user config dir.

    Parameters
    ----------
    path : str or PathLike, optional
        An explicit key file (e.g. ``LoadConfig.pseudonym_key_file``).

    Returns
    -------
    Path
        The key file's path (``~`` expanded); it need not exist yet.
    """
    if path is not None and os.fspath(path):
        return Path(path).expanduser()
    env = os.environ.get(KEY_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / KEY_FILE_NAME


def _parse_key(data: bytes, where: Path) -> bytes:
    text = data.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(data) == KEY_BYTES:
        return data
    raise PseudonymKeyError(
        f"Pseudonym key file {where} does not hold a key: expected {2 * KEY_BYTES} hex characters "
        f"(or exactly {KEY_BYTES} raw bytes); found {len(data)} bytes. Restore the original key file "
        "(a new key changes every pseudonym), or delete it to create a new key on the next run."
    )


def _read_key(where: Path) -> bytes:
    try:
        st = os.stat(where)
    except OSError as e:
        raise PseudonymKeyError(f"Cannot use pseudonym key file {where}: {type(e).__name__}: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise PseudonymKeyError(f"Pseudonym key file {where} is not a regular file; point {KEY_ENV_VAR} at a file.")
    if st.st_size > 4096:
        raise PseudonymKeyError(f"Pseudonym key file {where} is {st.st_size} bytes; a key file holds one key.")
    if os.name == "posix" and st.st_mode & 0o077:
        log.warning(
            "pseudonym key file %s is readable by other users (mode %o); restrict it with chmod 600",
            where,
            stat.S_IMODE(st.st_mode),
        )
    try:
        data = where.read_bytes()
    except OSError as e:
        raise PseudonymKeyError(f"Cannot read pseudonym key file {where}: {type(e).__name__}: {e}") from e
    return _parse_key(data, where)


def _create_key(where: Path) -> None:
    """Write a new key to ``where`` unless it exists (then leave the existing one alone)."""
    made = not where.parent.exists()
    where.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if made:
        log.debug("created key folder %s", where.parent)
    key = secrets.token_bytes(KEY_BYTES)
    tmp = where.with_name(f".{where.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)
            os.write(fd, (key.hex() + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, where)  # atomic, and fails when another process created the key first
        except FileExistsError:
            return
        except OSError:  # no hard links on this file system: exclusive create of the key itself
            try:
                fd2 = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return
            try:
                os.write(fd2, (key.hex() + "\n").encode("ascii"))
                os.fsync(fd2)
            finally:
                os.close(fd2)
        log.info("created a new pseudonym key %s: keep it (pseudonyms change without it), never publish it", where)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def load_or_create_key(path: str | os.PathLike[str] | None = None) -> bytes:
    """The project's secret pseudonym key, created (32 random bytes, mode 0600) on first use.

    Parameters
    ----------
    path : str or PathLike, optional
        The key file; default :func:`key_path` (``$INSPECTOR_PSEUDONYM_KEY_FILE``, else the user
        config dir).

    Returns
    -------
    bytes
        The 32-byte key.

    Raises
    ------
    PseudonymKeyError
        If the key file exists but is not a usable key, or cannot be created.
    """
    where = key_path(path)
    if not os.path.lexists(where):
        try:
            _create_key(where)
        except OSError as e:
            raise PseudonymKeyError(
                f"Cannot create the pseudonym key file {where}: {type(e).__name__}: {e}. "
                f"Point {KEY_ENV_VAR} (or LoadConfig.pseudonym_key_file) at a writable location."
            ) from e
    return _read_key(where)


def pseudonym(raw: str, key: bytes) -> str:
    """The keyed pseudonym of a raw identifier: ``"sub-"`` + 12 hex chars of HMAC-SHA256(key, raw).

    Parameters
    ----------
    raw : str
        The raw identifier (e.g. a DICOM PatientID). Never logged.
    key : bytes
        The secret key (:func:`load_or_create_key`), at least 16 bytes.

    Returns
    -------
    str
        Stable for one (raw, key); different keys give unrelated pseudonyms.
    """
    if isinstance(key, str):
        raise TypeError(
            "pseudonym(raw, key) takes the secret key bytes (load_or_create_key()), not a salt string: the "
            "constant-salt digest was replaced by a keyed HMAC."
        )
    if not isinstance(key, bytes | bytearray) or len(key) < 16:
        raise TypeError("pseudonym(raw, key) needs the secret key bytes (at least 16) from load_or_create_key().")
    digest = hmac.new(bytes(key), str(raw).encode("utf-8"), hashlib.sha256).hexdigest()
    return "sub-" + digest[:_DIGITS]


def root_hash(root: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a cohort root's absolute path string: what the outputs hold instead of the root.

    Parameters
    ----------
    root : str or PathLike
        The cohort root (``~`` expanded, made absolute, symlinks not resolved), as :attr:`Cohort.root`.

    Returns
    -------
    str
        64 hex characters; the same root gives the same hash (not keyed: it tells "the same folder" across
        audits of one machine, and a guessed root can be checked against it).
    """
    return hashlib.sha256(str(Path(root).expanduser().absolute()).encode("utf-8")).hexdigest()

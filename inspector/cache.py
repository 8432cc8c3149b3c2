"""Content-addressed cache of embeddings and trained weights.

Keys are sha256 digests over a canonical JSON of *everything* that determines the result: the
slices' content hashes, the extractor's fingerprint (name, full config, checkpoint or trained-weights
hash), the view and the package version — never a bare name. Entries are written atomically (a
temporary file in the same folder, then :func:`os.replace`) with a JSON manifest beside them; a
corrupt or mismatched entry is treated as a miss, removed and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["default_cache_dir", "hash_key", "EmbeddingCache", "atomic_write_bytes"]

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """The cache root: ``$INSPECTOR_CACHE_DIR`` if set, else the user's cache dir (never site-packages).

    Returns
    -------
    Path
    """
    env = os.environ.get("INSPECTOR_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mri-memorization-inspector"))


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return obj.as_posix()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def hash_key(**parts: Any) -> str:
    """sha256 over a canonical JSON encoding of ``parts`` (sorted keys, no whitespace).

    Returns
    -------
    str
        64 hex characters.
    """
    blob = json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the usual rw-r--r-- (not via os.umask: not thread-safe)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EmbeddingCache:
    """Arrays stored under ``root/embeddings/<key[:2]>/<key>.npz`` with a ``<key>.json`` manifest.

    Parameters
    ----------
    root : Path, optional
        Cache root; :func:`default_cache_dir` when omitted.
    enabled : bool
        When False every lookup misses and nothing is written.
    """

    def __init__(self, root: str | Path | None = None, *, enabled: bool = True) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.enabled = enabled

    def _paths(self, key: str) -> tuple[Path, Path]:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be 64 hex characters; got {key!r}.")
        d = self.root / "embeddings" / key[:2]
        return d / f"{key}.npz", d / f"{key}.json"

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        """Return the arrays stored under ``key``, or None on a miss (or a corrupt entry, removed).

        Returns
        -------
        dict of str to np.ndarray, or None
        """
        if not self.enabled:
            return None
        data_path, man_path = self._paths(key)
        if not data_path.exists() or not man_path.exists():
            return None
        try:
            manifest = json.loads(man_path.read_text())
            if manifest.get("key") != key:
                raise ValueError(f"manifest key {manifest.get('key')!r} does not match")
            with np.load(data_path, allow_pickle=False) as z:
                arrays = {name: np.array(z[name]) for name in z.files}
            expected = manifest.get("arrays", {})
            for name, meta in expected.items():
                if name not in arrays or list(arrays[name].shape) != list(meta["shape"]):
                    raise ValueError(f"array {name!r} missing or with a different shape")
            if set(arrays) != set(expected):
                raise ValueError("array names differ from the manifest")
        except Exception as e:  # noqa: BLE001 - any corruption is a miss, never a crash
            warnings.warn(
                f"Corrupt cache entry {data_path} ({type(e).__name__}: {e}); it is removed and recomputed.",
                stacklevel=2,
            )
            data_path.unlink(missing_ok=True)
            man_path.unlink(missing_ok=True)
            return None
        log.debug("cache hit %s", key[:12])
        return arrays

    def save(self, key: str, arrays: dict[str, np.ndarray], manifest: dict[str, Any] | None = None) -> Path | None:
        """Store ``arrays`` under ``key`` atomically, with a JSON manifest.

        Parameters
        ----------
        key : str
            From :func:`hash_key`.
        arrays : dict of str to np.ndarray
        manifest : dict, optional
            Extra JSON-able provenance (what the key was made of).

        Returns
        -------
        Path or None
            The data file, or None when the cache is disabled.
        """
        if not self.enabled:
            return None
        data_path, man_path = self._paths(key)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        import io

        buf = io.BytesIO()
        np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
        atomic_write_bytes(data_path, buf.getvalue())
        meta = {
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
            **(_canonical(manifest) if manifest else {}),
        }
        atomic_write_bytes(man_path, json.dumps(meta, indent=1, default=str).encode())
        return data_path

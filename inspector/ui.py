"""Display helpers for the Streamlit app: paths, progress text, image rendering, figures, tables.

Nothing here computes a score. Every number the app shows comes from
:class:`~inspector.result.AuditResult` (``flagged_at``, ``threshold_for``, ``summary_counts``,
``roc``, ``confusion_at``, ``pair``); this module only turns those numbers and arrays into
pictures, text and tables. Only :func:`audit_store` touches Streamlit (imported on first use), so the
rest is unit-testable on its own.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "ALPHAS",
    "AuditEntry",
    "audit_store",
    "InputPathError",
    "PRIVACY_OPTIONS",
    "ProgressThrottle",
    "apply_privacy_options",
    "launch_app",
    "served_privately",
    "blend",
    "colourise_difference",
    "config_settings",
    "default_reviews_db",
    "flagged_frame",
    "format_alpha",
    "format_p",
    "histogram_figure",
    "input_signature",
    "operating_point",
    "parse_layers",
    "render_png",
    "repo_root",
    "resolve_input",
    "roc_figure",
    "scores_with_decisions",
    "setting_widget",
    "stage_label",
    "subject_review_frame",
    "window_to_uint8",
    "VOLUME_PLANES",
    "axial_slice_evidence",
    "copied_subjects",
    "open_volume",
    "plane_caption",
    "plane_length",
    "through_plane_stretch",
    "volume_facts",
    "volume_pair_of",
    "volume_plane",
    "volume_review_frame",
    "volume_truth",
    "volume_unit_note",
]

#: Log-spaced per-slice false-positive rates offered by the threshold controls.
ALPHAS: tuple[float, ...] = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
#: Short labels of the settings in the sidebar (the help text comes from AuditConfig's docstring).
SETTING_LABELS: dict[str, str] = {
    "mode": "Mode",
    "extractor": "Feature extractor",
    "checkpoint": "MRI-CORE checkpoint file",
    "layers": "Layers (optional, comma-separated)",
    "alpha": "α: target false-positive rate per slice",
    "fdr": "Benjamini–Hochberg control across the set",
    "views": "Views matched (comma-separated)",
    "rerank": "Alignment-verified re-ranking",
    "shortlist": "Candidates registered per slice",
    "align_flips": "Flips tried in registration",
    "top_k": "Neighbours shown per layer",
    "axis": "Slicing axis for volumes",
    "size": "Slice size (pixels)",
    "allow_skipped": "Allow skipped training/holdout files (missing evidence)",
    "show_paths": "Show real file and folder names (off: pseudonymous labels)",
    "allow_outside_root": "Read manifest rows outside the manifest's folder",
    "align_size": "Registration size (pixels)",
    "n_bootstrap": "Bootstrap rounds of the paper's null",
    "device": "Device",
    "seed": "Random seed",
}

#: Environment variable naming one reviews database for every audit (instead of each audit folder's own).
REVIEWS_DB_ENV = "INSPECTOR_REVIEWS_DB"
#: Environment variable naming the folder the app writes audit folders into (default ``audits`` under the cwd).
AUDITS_DIR_ENV = "INSPECTOR_AUDITS_DIR"
#: CSS pixels of each pane of the pair viewer: with the header and metrics it stays above the fold at 1366×768.
VIEWER_PANE_HEIGHT = 400
#: Keyboard shortcuts of the review queue (Streamlit reserves C and R).
REVIEW_SHORTCUTS: dict[str, str] = {
    "copy": "1",
    "near copy": "2",
    "not a copy": "3",
    "unsure": "4",
    "next": "J",
    "previous": "K",
}

#: Streamlit options the app sets itself, wherever it is started from (they repeat .streamlit/config.toml):
#: no usage statistics, no error details in the browser, bound to the loopback interface only.
PRIVACY_OPTIONS: dict[str, Any] = {
    "browser.gatherUsageStats": False,
    "client.showErrorDetails": "none",
    "client.toolbarMode": "minimal",
    "server.address": "127.0.0.1",
    "browser.serverAddress": "127.0.0.1",
    "server.headless": True,
}
#: Addresses a server may listen on and still serve this machine only.
LOOPBACK_ADDRESSES: frozenset[str] = frozenset({"127.0.0.1", "localhost", "::1"})
#: Set to 1 to serve the app on another interface than loopback (behind an authenticating proxy); off by default.
ALLOW_REMOTE_ENV = "INSPECTOR_ALLOW_REMOTE"


class InputPathError(FileNotFoundError):
    """A cohort path typed into the app does not exist (the message names every place looked at)."""


# ----------------------------------------------------------------------------------------------
# The app's result cache
# ----------------------------------------------------------------------------------------------


@dataclass
class AuditEntry:
    """A finished audit held in memory by the app.

    Attributes
    ----------
    result : AuditResult
    seconds : float
        Wall time of the audit call.
    pairs : dict of int to PairEvidence
        ``result.pair(i)`` already looked at.
    derived : dict
        Tables derived from the result at a setting (e.g. :func:`subjects_at`), computed once each.
    """

    result: Any
    seconds: float
    pairs: dict[int, Any] = field(default_factory=dict)
    positions: dict[str, dict[int, int]] = field(default_factory=dict)
    derived: dict[Any, Any] = field(default_factory=dict)

    def train_position(self, train_index: int) -> tuple[str, int, int]:
        """``(subject, position, n)``: a training slice by its pseudonymous subject and its 1-based position
        among that subject's slices (``AuditResult.subject_slices`` order), never by file name, which
        could carry a patient's name."""
        subj = self.result.train[int(train_index)].subject_id
        if subj not in self.positions:
            self.positions[subj] = {t: i for i, t in enumerate(self.result.subject_slices(subj))}
        pos = self.positions[subj]
        return subj, pos.get(int(train_index), 0) + 1, len(pos)

    def train_label(self, train_index: int) -> str:
        """``"<subject> · slice 12/40"`` (see :meth:`train_position`)."""
        subj, p, n = self.train_position(train_index)
        return f"{subj} · slice {p}/{n}"


def _new_store() -> dict[str, AuditEntry]:
    return {}


_store_fn: Callable[[], dict[str, AuditEntry]] | None = None


def audit_store() -> dict[str, AuditEntry]:
    """The app's process-wide audit results, keyed by inputs + their file state + config.

    An ``st.cache_resource`` (Streamlit is imported on first use), so it survives reruns and is
    shared by sessions; ``st.cache_resource.clear()`` empties it.
    """
    global _store_fn
    if _store_fn is None:
        import streamlit as st

        _store_fn = st.cache_resource(show_spinner=False)(_new_store)
    return _store_fn()


# ----------------------------------------------------------------------------------------------
# Privacy options and the launcher
# ----------------------------------------------------------------------------------------------


_UNSET: Any = object()
_BOUND_AT_START: Any = _UNSET


def apply_privacy_options() -> str | None:
    """Set :data:`PRIVACY_OPTIONS` in Streamlit's config, whatever config file (if any) was read.

    Called first by ``app.py``: usage statistics and error details are read per session and per error, so they
    take effect wherever the app was started from. The listening address is fixed when the server starts;
    what it was at the process's first call (before this function changed it) is returned (``None``: all
    interfaces), for :func:`served_privately`.
    """
    from streamlit import config

    global _BOUND_AT_START
    if _BOUND_AT_START is _UNSET:  # the first run of the process: the value the server was started with
        _BOUND_AT_START = config.get_option("server.address")
    for key, value in PRIVACY_OPTIONS.items():
        config.set_option(key, value, where_defined="inspector.ui.PRIVACY_OPTIONS")
    return _BOUND_AT_START  # type: ignore[return-value]


def served_privately(bound: str | None, *, real_server: bool) -> bool:
    """Whether a server that was started listening on ``bound`` serves this machine only.

    ``None`` or ``""`` means every interface. A unix socket is local. ``real_server`` False (a headless test
    runner) serves nobody; ``$INSPECTOR_ALLOW_REMOTE=1`` accepts any address.
    """
    if not real_server or os.environ.get(ALLOW_REMOTE_ENV) == "1":
        return True
    if not bound:
        return False
    return bound in LOOPBACK_ADDRESSES or bound.startswith("unix://") or bound.startswith("127.")


def launch_app(script: str | Path, argv: Sequence[str] = ()) -> int:
    """Start the Streamlit server on ``script`` with :data:`PRIVACY_OPTIONS` as command-line flags (which
    override any config file), so ``python app.py`` is private from any folder. Extra ``argv`` (e.g.
    ``--server.port 8502``) are passed on."""
    import sys

    from streamlit.web import cli as stcli

    flags = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in PRIVACY_OPTIONS.items()]
    sys.argv = ["streamlit", "run", str(script), *flags, *argv]
    try:
        stcli.main()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


# ----------------------------------------------------------------------------------------------
# Paths and cache keys
# ----------------------------------------------------------------------------------------------


def repo_root() -> Path:
    """The folder holding ``app.py`` (the repository root when running from a checkout)."""
    return Path(__file__).resolve().parent.parent


def resolve_input(text: str, *, what: str, bases: Sequence[Path] | None = None) -> Path:
    """Resolve a cohort path typed in the sidebar.

    Parameters
    ----------
    text : str
        Absolute path, ``~`` path, or a path relative to the working directory or the repository root.
    what : str
        What the path is for (``"training cohort"``), used in the error message.
    bases : sequence of Path, optional
        Folders a relative path is tried against, in order (default: the working directory, then the
        repository root).

    Returns
    -------
    Path
        The existing, absolute path.

    Raises
    ------
    InputPathError
        When the path is empty or exists nowhere; the message lists every place looked at.
    """
    raw = (text or "").strip()
    if not raw:
        raise InputPathError(f"No {what} given: type a folder or a CSV manifest path.")
    p = Path(raw).expanduser()
    if p.is_absolute():
        if p.exists():
            return p
        raise InputPathError(f"The {what} path {p} does not exist. Check the spelling or choose another folder.")
    tried = []
    for base in bases if bases is not None else (Path.cwd(), repo_root()):
        cand = (base / p).absolute()
        if cand.exists():
            return cand
        tried.append(str(cand))
    raise InputPathError(
        f"The {what} path {raw!r} does not exist; looked at: {', '.join(dict.fromkeys(tried))}. "
        "Type an existing folder or CSV manifest."
    )


def input_signature(path: str | Path) -> str:
    """A fingerprint of the files under a cohort path: names, sizes and modification times.

    A folder contributes every file below it; a CSV manifest contributes itself and each file or
    folder it lists (``path`` column, relative to the manifest's folder). Used in the app's
    result-cache key so that an edited cohort is re-audited, and an unchanged one is not.

    Parameters
    ----------
    path : str or Path
        An existing folder, manifest or file.

    Returns
    -------
    str
        Hex sha256.
    """
    p = Path(path)
    h = hashlib.sha256(str(p.absolute()).encode())

    def add_tree(root: Path) -> None:
        if root.is_file():
            st = root.stat()
            h.update(f"{root}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            return
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                f = Path(dirpath) / name
                try:
                    st = f.stat()
                except OSError:
                    continue
                h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())

    if p.is_file() and p.suffix.lower() == ".csv":
        add_tree(p)
        try:
            with p.open(newline="", encoding="utf-8", errors="replace") as fh:
                rows = list(csv.DictReader(fh))
        except OSError:
            rows = []
        for row in rows:
            ref = (row.get("path") or "").strip()
            if not ref:
                continue
            q = Path(ref) if Path(ref).is_absolute() else p.parent / ref
            if q.exists():
                add_tree(q)
            else:
                h.update(f"missing:{ref}\n".encode())
    elif p.exists():
        add_tree(p)
    return h.hexdigest()


def default_reviews_db(cwd: Path | None = None) -> Path:
    """The one database named by ``$INSPECTOR_REVIEWS_DB``, else ``audits/reviews.sqlite3`` under the cwd (kept
    for callers of the old default; the app uses :func:`reviews_db_for`)."""
    env = os.environ.get(REVIEWS_DB_ENV)
    if env:
        return Path(env).expanduser()
    return (cwd or Path.cwd()) / "audits" / "reviews.sqlite3"


def audits_dir(cwd: Path | None = None) -> Path:
    """Where the app writes audit folders: ``$INSPECTOR_AUDITS_DIR``, else ``audits`` under the cwd."""
    env = os.environ.get(AUDITS_DIR_ENV)
    return Path(env).expanduser() if env else (cwd or Path.cwd()) / "audits"


def audit_folder_path(audit_id: str, cwd: Path | None = None) -> Path:
    """The audit folder the app saves an audit into (and ``inspector report --audit`` reads)."""
    if not audit_id:
        raise ValueError("audit_id is required to name the audit folder.")
    return audits_dir(cwd) / f"audit_{audit_id[:12]}"


def reviews_db_for(audit_id: str, text: str = "", cwd: Path | None = None) -> Path:
    """The reviews database of one audit.

    ``text`` (the sidebar's field) when given; else ``$INSPECTOR_REVIEWS_DB`` when set; else the audit folder's
    ``reviews.sqlite3``, the database ``inspector report --audit`` reads by default, so the app and the report
    share the decisions of one audit without naming a file.
    """
    if text and text.strip():
        return Path(text.strip()).expanduser()
    env = os.environ.get(REVIEWS_DB_ENV)
    if env:
        return Path(env).expanduser()
    from .folder import DEFAULT_REVIEWS_FILE

    return audit_folder_path(audit_id, cwd) / DEFAULT_REVIEWS_FILE


def review_order(table: pd.DataFrame, flags: np.ndarray) -> list[int]:
    """The flagged rows in the ranking every page shows: most significant first (p-value, then similarity).

    Returns
    -------
    list of int
        Rows of ``table``.
    """
    from .folder import most_significant_first

    rows = np.flatnonzero(np.asarray(flags, bool))
    p = table["p_value"].to_numpy(np.float64)
    sim = table["similarity"].to_numpy(np.float64)
    return [int(i) for i in most_significant_first(rows, p, sim)]


def review_counts(table: pd.DataFrame, flags: np.ndarray, latest: Mapping[str, Any]) -> dict[str, int]:
    """``n_flagged``, ``n_reviewed`` and ``n_copies`` (judged copy or near copy) over the flagged rows."""
    shas = table.loc[np.asarray(flags, bool), "sha256"].astype(str)
    decided = [latest[s].decision for s in shas if s in latest]
    return {
        "n_flagged": int(len(shas)),
        "n_reviewed": len(decided),
        "n_copies": sum(d in ("copy", "near copy") for d in decided),
    }


def config_settings() -> tuple[Any, ...]:
    """Every :class:`~inspector.config.AuditConfig` setting (:func:`inspector.config.settings`), for the sidebar."""
    from .config import settings

    return settings()


def setting_widget(container: Any, setting: Any) -> Any:
    """Draw the sidebar widget of one :class:`~inspector.config.Setting` (key ``in_<name>``); return its value.

    Choices become a select box (the mode a radio), booleans a checkbox, numbers a number input (alpha a
    log-spaced slider), tuples a comma-separated text field; the default is the dataclass's.
    """
    label = SETTING_LABELS.get(setting.name, setting.name.replace("_", " ").capitalize())
    key, help_text, default = f"in_{setting.name}", setting.help, setting.default
    if setting.name == "alpha":
        return container.select_slider(label, ALPHAS, value=default, format_func=format_alpha, key=key, help=help_text)
    if setting.choices is not None:
        options = list(setting.choices)
        if default in options:  # the default first
            options.insert(0, options.pop(options.index(default)))
        if setting.name == "mode":
            return container.radio(label, options, key=key, horizontal=True, help=help_text)
        return container.selectbox(label, options, key=key, help=help_text)
    if setting.kind is bool:
        return container.checkbox(label, bool(default), key=key, help=help_text)
    if setting.kind is int:
        return int(
            container.number_input(
                label,
                min_value=setting.minimum,
                max_value=getattr(setting, "maximum", None),
                value=int(default),
                step=1,
                key=key,
                help=help_text,
            )
        )
    if setting.kind is float:
        return float(container.number_input(label, value=float(default), key=key, help=help_text, format="%.4g"))
    if setting.kind is tuple:
        return parse_layers(container.text_input(label, ",".join(default), key=key, help=help_text))
    return container.text_input(label, default or "", key=key, help=help_text) or None


def parse_layers(text: str) -> tuple[str, ...]:
    """Layer names from a comma- or space-separated string (empty -> the extractor's defaults)."""
    parts = [t.strip() for t in (text or "").replace(",", " ").split()]
    return tuple(dict.fromkeys(t for t in parts if t))


# ----------------------------------------------------------------------------------------------
# Progress and formatting
# ----------------------------------------------------------------------------------------------


def stage_label(stage: str) -> str:
    """A readable label for a progress stage such as ``"loading:train"`` or ``"extracting:hflip"``."""
    from .types import PROGRESS_STAGES

    head, _, detail = stage.partition(":")
    label = PROGRESS_STAGES.get(head, head.replace("_", " "))
    return f"{label} ({detail})" if detail else label


class ProgressThrottle:
    """Adapts ``progress(stage, done, total)`` to a renderer, at most every ``min_interval`` seconds.

    A new stage and the last step of a stage are always rendered, so the display never lags behind
    a finished stage.

    Parameters
    ----------
    render : callable
        ``render(label, fraction, text)`` with ``fraction`` in [0, 1] and ``text`` like
        ``"Extracting features (id): 96 / 120"``.
    min_interval : float
        Seconds between two intermediate renders of the same stage.
    """

    def __init__(self, render: Callable[[str, float, str], None], min_interval: float = 0.15) -> None:
        self.render = render
        self.min_interval = min_interval
        self.stages: list[str] = []
        self._last_stage = ""
        self._last_time = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        new = stage != self._last_stage
        if new:
            self.stages.append(stage)
        if not (new or done >= total or now - self._last_time >= self.min_interval):
            return
        self._last_stage, self._last_time = stage, now
        label = stage_label(stage)
        frac = min(1.0, max(0.0, done / total)) if total > 0 else 1.0
        self.render(label, frac, f"{label}: {done} / {total}" if total > 0 else label)


def format_p(p: float) -> str:
    """A p-value for display: 3 significant digits, ``< 1e-4`` style below 0.0001."""
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.3g}" if p >= 1e-4 else "< 0.0001"


def format_alpha(a: float) -> str:
    """An alpha as a percentage: ``0.01 -> "1 %"``, ``0.0005 -> "0.05 %"``."""
    return f"{a * 100:g} %"


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

# inferno, sampled at 9 points: black (no difference) to pale yellow (differs by the window width)
_INFERNO = np.array(
    [
        [0, 0, 4],
        [31, 12, 72],
        [85, 15, 109],
        [136, 34, 106],
        [186, 54, 85],
        [227, 89, 51],
        [249, 140, 10],
        [249, 201, 50],
        [252, 255, 164],
    ],
    dtype=np.float64,
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_INFERNO)), _INFERNO[:, c]) for c in range(3)], 1
)
_LUT = np.round(_LUT).astype(np.uint8)


def window_to_uint8(arr: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Apply an intensity window to float intensities and map it to 8 bits for display.

    Parameters
    ----------
    arr : np.ndarray, shape (H, W)
        Float intensities (the library's slices are in [0, 1]).
    low, high : float
        Window; values <= low are black, >= high white.

    Returns
    -------
    np.ndarray, shape (H, W), uint8
    """
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"window_to_uint8 expects a 2D (H, W) array; got shape {a.shape}.")
    if not high > low:
        raise ValueError(f"The intensity window needs high > low; got low={low}, high={high}.")
    out = np.clip((a - low) / (high - low), 0.0, 1.0)
    return np.round(np.nan_to_num(out) * 255).astype(np.uint8)


def colourise_difference(diff: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Map an absolute-difference map to an inferno colour image.

    Parameters
    ----------
    diff : np.ndarray, shape (H, W)
        ``|a - b|`` on the image intensity scale.
    width : float
        Difference shown as the brightest colour (use the intensity window's width so that a
        narrower window magnifies differences exactly as it magnifies the images).

    Returns
    -------
    np.ndarray, shape (H, W, 3), uint8
    """
    if width <= 0:
        raise ValueError(f"difference width must be > 0; got {width}.")
    return _LUT[window_to_uint8(diff, 0.0, width)]


def blend(before: np.ndarray, after: np.ndarray, t: float) -> np.ndarray:
    """Cross-fade two images for a before/after comparison: ``(1 - t) * before + t * after``."""
    if before.shape != after.shape:
        raise ValueError(f"blend needs images of one shape; got {before.shape} and {after.shape}.")
    t = float(min(1.0, max(0.0, t)))
    return (1.0 - t) * np.asarray(before, np.float64) + t * np.asarray(after, np.float64)


def render_png(
    arr: np.ndarray,
    *,
    low: float = 0.0,
    high: float = 1.0,
    size: int = 256,
    resample: str = "nearest",
    colour_difference: bool = False,
) -> bytes:
    """Render a float slice as a PNG at a readable size.

    Parameters
    ----------
    arr : np.ndarray, shape (H, W)
        Float intensities (or an absolute-difference map when ``colour_difference``).
    low, high : float
        Intensity window (for a difference map, ``high - low`` is the colour scale's width).
    size : int
        Longer side of the output in pixels; the aspect ratio is kept.
    resample : str
        ``"nearest"`` (pixels stay visible) or ``"bilinear"``.
    colour_difference : bool
        Render with the inferno colour map from 0 to ``high - low``.

    Returns
    -------
    bytes
        PNG data.
    """
    from PIL import Image

    if colour_difference:
        im = Image.fromarray(colourise_difference(arr, high - low), mode="RGB")
    else:
        im = Image.fromarray(window_to_uint8(arr, low, high), mode="L")
    h, w = np.asarray(arr).shape[:2]
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    methods = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}
    if resample not in methods:
        raise ValueError(f"resample must be one of {sorted(methods)}; got {resample!r}.")
    if new != (w, h):
        im = im.resize(new, methods[resample])
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def histogram_figure(
    synthetic: np.ndarray,
    null: np.ndarray,
    threshold: float,
    *,
    null_kind: str = "null",
    alpha: float | None = None,
    flagged: np.ndarray | None = None,
    log_gap: bool = False,
    scale: str = "density",
    bins: int = 40,
) -> Any:
    """Histograms of the synthetic similarities against the null, honestly scaled, with the flag threshold.

    ``scale="density"``: each *set* is normalised once: the synthetic set's flagged and unflagged slices are
    stacked bars whose areas add up to 1 together (19 flagged slices of 77 cover a quarter of the synthetic
    area, never look like a group of their own), and the null is a step line of area 1. ``scale="log counts"``:
    raw counts on a log axis (the null and each synthetic part as they are), so a handful of copies stays
    visible beside a large null.

    Parameters
    ----------
    synthetic : np.ndarray, shape (m,)
        ``AuditResult.table["similarity"]``.
    null : np.ndarray, shape (n_null,)
        ``AuditResult.null_similarity``.
    threshold : float
        ``Calibration.threshold(alpha, fdr)``; not drawn when infinite.
    null_kind : str
        How the null was built (legend text).
    alpha : float, optional
        For the threshold's label.
    flagged : np.ndarray of bool, shape (m,), optional
        ``AuditResult.flags(alpha, fdr)``; flagged synthetic slices are drawn as their own (stacked) part.
    log_gap : bool
        Plot ``log10(1 - similarity)`` (floored at 1e-7) with the axis reversed, so that values piled
        up near 1 spread out; copies stay on the right. For similarities that are at most 1.
    scale : {"density", "log counts"}
    bins : int
        Number of bins over the range of both sets.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    if scale not in HISTOGRAM_SCALES:
        raise ValueError(f"scale must be one of {HISTOGRAM_SCALES}; got {scale!r}.")
    syn = np.asarray(synthetic, np.float64)
    nul = np.asarray(null, np.float64)
    label = f"threshold at α = {format_alpha(alpha)}" if alpha is not None else "threshold"
    if math.isfinite(threshold):
        label += f": {threshold:.4f}"
    if log_gap:

        def gap(x: np.ndarray) -> np.ndarray:
            return np.log10(np.clip(1.0 - x, 1e-7, None))

        syn, nul = gap(syn), gap(nul)
        threshold = float(gap(np.array([threshold]))[0]) if math.isfinite(threshold) else threshold
    both = np.concatenate([syn[np.isfinite(syn)], nul[np.isfinite(nul)]])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    edges = np.linspace(lo - 0.01 * span, hi + 0.01 * span, bins + 1)
    width = float(edges[1] - edges[0])
    centres = (edges[:-1] + edges[1:]) / 2
    m_all = max(1, int(np.isfinite(syn).sum()))
    n_null = max(1, int(np.isfinite(nul).sum()))
    density = scale == "density"

    def heights(x: np.ndarray, total: int) -> np.ndarray:
        c = np.histogram(x[np.isfinite(x)], edges)[0].astype(np.float64)
        return c / (total * width) if density else c

    fig = go.Figure()
    f = np.zeros(len(syn), bool) if flagged is None else np.asarray(flagged, bool)
    parts = [(~f, "synthetic, not flagged" if f.any() else "synthetic", "#3b75af")]
    if f.any():
        parts.append((f, "synthetic, flagged", "#d62728"))
    for mask, name, colour in parts:
        y = heights(syn[mask], m_all)
        fig.add_trace(
            go.Bar(
                x=centres,
                y=np.where(y > 0, y, np.nan) if not density else y,
                width=width,
                name=f"{name} (n={int(mask.sum())})",
                marker_color=colour,
                opacity=0.8,
            )
        )
    y0 = heights(nul, n_null)
    fig.add_trace(
        go.Scatter(
            x=np.r_[edges[0], centres, edges[-1]],
            y=np.r_[0.0, y0, 0.0] if density else np.r_[np.nan, np.where(y0 > 0, y0, np.nan), np.nan],
            mode="lines",
            line_shape="hvh",
            line={"color": "#4d4d4d", "width": 2},
            name=f"null ({null_kind}, n={len(nul)})",
        )
    )
    if math.isfinite(threshold):
        fig.add_vline(
            x=threshold,
            line_dash="dash",
            line_color="#d62728",
            line_width=2,
            annotation_text=label,
            annotation_position="top left",
        )
    fig.update_layout(
        barmode="stack",
        bargap=0,
        xaxis_title=(
            "log10(1 − similarity), reversed (right = more like a copy)"
            if log_gap
            else "similarity to the nearest training slice (higher = more like a copy)"
        ),
        xaxis={"autorange": "reversed"} if log_gap else {},
        yaxis_title=(
            "density (each set's area = 1; flagged + not flagged share the synthetic set's)"
            if density
            else "slices per bin (log scale)"
        ),
        yaxis={"type": "log"} if not density else {},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
        margin={"l": 10, "r": 10, "t": 60, "b": 10},
        height=380,
    )
    return fig


#: The histogram's honest scales: one normalisation per set, or counts on a log axis.
HISTOGRAM_SCALES: tuple[str, ...] = ("density", "log counts")


def layer_columns(table: pd.DataFrame, layers: Sequence[str]) -> list[str]:
    """The ``sim_<layer>`` columns of the score table, in the layers' order (those present)."""
    return [f"sim_{layer}" for layer in layers if f"sim_{layer}" in table]


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    ok = np.isfinite(s)
    if ok.sum() < 2 or y[ok].min() == y[ok].max():
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y[ok], s[ok]))


def ground_truth(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """``(known, is_copy)`` boolean masks from the ``label`` column, or None without both classes."""
    if "label" not in table:
        return None
    lab = table["label"].fillna("").astype(str).to_numpy()
    known = np.isin(lab, ["copy", "novel"])
    y = lab == "copy"
    if not known.any() or y[known].all() or not y[known].any():
        return None
    return known, y


def layer_summary(table: pd.DataFrame, layers: Sequence[str], flags: np.ndarray) -> pd.DataFrame:
    """Per feature layer, over the whole synthetic set: its similarity for flagged and unflagged slices, and the
    AUC of that layer alone against the ground truth where ``labels.csv`` exists.

    Returns
    -------
    pandas.DataFrame
        ``layer``, ``median_flagged``, ``median_not_flagged``, ``auc`` (NaN without labels; 1 = the layer
        alone separates copies from novel slices, 0.5 = chance), one row per layer, then one for the final
        ``similarity``.
    """
    flags = np.asarray(flags, bool)
    gt = ground_truth(table)
    rows = []
    for layer, col in [*((c[4:], c) for c in layer_columns(table, layers)), ("final (similarity)", "similarity")]:
        v = table[col].to_numpy(np.float64)
        auc = float("nan")
        if gt is not None:
            known, y = gt
            auc = _auc(y[known].astype(int), v[known])
        rows.append(
            {
                "layer": layer,
                "median_flagged": float(np.nanmedian(v[flags])) if flags.any() else float("nan"),
                "median_not_flagged": float(np.nanmedian(v[~flags])) if (~flags).any() else float("nan"),
                "auc": auc,
            }
        )
    return pd.DataFrame(rows)


def layer_figure(table: pd.DataFrame, layers: Sequence[str], flags: np.ndarray) -> Any:
    """Each layer's ``sim_<layer>`` distribution over the synthetic set, flagged against unflagged (box plots).

    The null's per-layer similarities are not kept by the audit (only its final score), so the comparison is
    within the synthetic set at the setting on screen.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    flags = np.asarray(flags, bool)
    cols = layer_columns(table, layers)
    fig = go.Figure()
    for mask, name, colour in ((~flags, "not flagged", "#3b75af"), (flags, "flagged", "#d62728")):
        if not mask.any():
            continue
        xs = np.concatenate([[c[4:]] * int(mask.sum()) for c in cols]) if cols else np.array([])
        ys = np.concatenate([table[c].to_numpy(np.float64)[mask] for c in cols]) if cols else np.array([])
        fig.add_trace(
            go.Box(
                x=xs,
                y=ys,
                name=f"{name} (n={int(mask.sum())})",
                marker_color=colour,
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                marker_size=4,
            )  # fmt: skip
        )
    fig.update_layout(
        boxmode="group",
        xaxis_title="feature layer (shallow → deep)",
        yaxis_title="similarity to the nearest training slice at this layer",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
        margin={"l": 10, "r": 10, "t": 60, "b": 10},
        height=380,
    )
    return fig


def consensus_figure(table: pd.DataFrame, n_layers: int, flags: np.ndarray) -> Any:
    """How many layers agree on the matched training subject: counts per value, flagged against unflagged.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    flags = np.asarray(flags, bool)
    cons = table["layer_consensus"].to_numpy(np.int64) if "layer_consensus" in table else np.zeros(len(table), int)
    values = np.arange(0, max(n_layers, int(cons.max(initial=0))) + 1)
    fig = go.Figure()
    for mask, name, colour in ((~flags, "not flagged", "#3b75af"), (flags, "flagged", "#d62728")):
        counts = np.array([int(((cons == v) & mask).sum()) for v in values])
        fig.add_trace(go.Bar(x=[f"{v}/{n_layers}" for v in values], y=counts, name=name, marker_color=colour))
    fig.update_layout(
        barmode="group",
        xaxis_title="layers whose nearest slice belongs to the matched training subject",
        yaxis_title="synthetic slices",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
        margin={"l": 10, "r": 10, "t": 60, "b": 10},
        height=300,
    )
    return fig


#: The scores compared on one ROC: (column, legend, sign): sign -1 when lower means more memorised.
ROC_SCORES: tuple[tuple[str, str, int], ...] = (
    ("similarity", "ours: registered similarity", 1),
    ("mi_z", "paper: MI z-score (same ranking as −ONI)", 1),
)


def roc_curves(table: pd.DataFrame, scores: Sequence[tuple[str, str, int]] = ROC_SCORES) -> list[dict[str, Any]]:
    """ROC curves of several per-slice scores against the ground truth, each where it is available.

    Returns
    -------
    list of dict
        ``name``, ``column``, ``fpr``, ``tpr``, ``auc``, ``n`` (slices with a label and a finite score); empty
        without ground truth.
    """
    gt = ground_truth(table)
    if gt is None:
        return []
    from sklearn.metrics import roc_auc_score, roc_curve

    known, y = gt
    out = []
    for col, name, sign in scores:
        if col not in table:
            continue
        s = sign * table[col].to_numpy(np.float64)
        ok = known & np.isfinite(s)
        if ok.sum() < 2 or y[ok].all() or not y[ok].any():
            continue
        fpr, tpr, _ = roc_curve(y[ok].astype(int), s[ok])
        out.append(
            {
                "name": name,
                "column": col,
                "fpr": fpr,
                "tpr": tpr,
                "auc": float(roc_auc_score(y[ok], s[ok])),
                "n": int(ok.sum()),
            }  # fmt: skip
        )
    return out


def roc_compare_figure(curves: Sequence[Mapping[str, Any]]) -> Any:
    """The curves of :func:`roc_curves` on one ROC plot.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line={"dash": "dot", "color": "#aaa"}))
    colours = ("#3b75af", "#ef6c00", "#2e7d32", "#6a1b9a")
    for k, c in enumerate(curves):
        fig.add_trace(
            go.Scatter(
                x=np.asarray(c["fpr"]),
                y=np.asarray(c["tpr"]),
                mode="lines",
                line_shape="hv",
                name=f"{c['name']} (AUC {c['auc']:.3f})",
                line={"color": colours[k % len(colours)], "width": 3},
            )
        )
    fig.update_layout(
        xaxis_title="false-positive rate (novel slices)",
        yaxis_title="true-positive rate (copies)",
        xaxis={"range": [-0.02, 1.02]},
        yaxis={"range": [-0.02, 1.02]},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
        margin={"l": 10, "r": 10, "t": 60, "b": 10},
        height=380,
    )
    return fig


def operating_point(confusion: Mapping[str, int]) -> tuple[float, float]:
    """The (false-positive rate, true-positive rate) of ``AuditResult.confusion_at(alpha)`` counts."""
    tp, fp, fn, tn = (int(confusion[k]) for k in ("tp", "fp", "fn", "tn"))
    fpr = fp / (fp + tn) if fp + tn else 0.0
    tpr = tp / (tp + fn) if tp + fn else 0.0
    return fpr, tpr


def roc_figure(roc: Mapping[str, Any], point: tuple[float, float] | None = None, *, alpha: float | None = None) -> Any:
    """The ROC curve of ``AuditResult.roc()`` with the current operating point.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line={"dash": "dot", "color": "#aaa"}))
    fig.add_trace(
        go.Scatter(
            x=np.asarray(roc["fpr"]),
            y=np.asarray(roc["tpr"]),
            mode="lines",
            name=f"ROC (AUC {roc['auc']:.3f})",
            line={"color": "#3b75af", "width": 3},
            line_shape="hv",
        )
    )
    if point is not None:
        name = f"flags at α = {format_alpha(alpha)}" if alpha is not None else "current threshold"
        fig.add_trace(
            go.Scatter(
                x=[point[0]],
                y=[point[1]],
                mode="markers",
                name=name,
                marker={"size": 14, "color": "#d62728", "symbol": "x"},
            )
        )
    fig.update_layout(
        xaxis_title="false-positive rate (novel slices flagged)",
        yaxis_title="true-positive rate (copies flagged)",
        xaxis={"range": [-0.02, 1.02]},
        yaxis={"range": [-0.02, 1.02]},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
        margin={"l": 10, "r": 10, "t": 60, "b": 10},
        height=380,
    )
    return fig


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _decision_of(latest: Mapping[str, Any], sha: str) -> str:
    r = latest.get(sha)
    return r.decision if r is not None else ""


def flagged_frame(
    table: pd.DataFrame,
    flags: np.ndarray,
    latest: Mapping[str, Any],
    n_layers: int,
    *,
    include_all: bool = False,
    train_labels: Callable[[int], str] | None = None,
    show_truth: bool = True,
) -> pd.DataFrame:
    """The flagged list: one row per flagged synthetic slice (or every slice), for display.

    Parameters
    ----------
    table : pandas.DataFrame
        ``AuditResult.table``.
    flags : np.ndarray of bool, shape (m,)
        ``AuditResult.flagged_at(alpha)``.
    latest : mapping of str to Review
        ``ReviewStore.latest(audit_id)`` (slice hash -> latest decision).
    n_layers : int
        Number of feature layers (for the consensus column ``k/L``).
    include_all : bool
        Every synthetic slice, not only the flagged ones.
    train_labels : callable, optional
        ``train_index -> label`` for the matched training slice (e.g. :meth:`AuditEntry.train_label`);
        default: the slice index in its source file.
    show_truth : bool
        Add the ground truth (``truth``) when the table has labels; the app hides it during review.

    Returns
    -------
    pandas.DataFrame
        Indexed by the row of ``table``, in the ranking every page follows (:func:`review_order`); columns
        ``rank`` (1 = most significant), ``synthetic``, ``similarity``, ``p_value``, ``mi``, ``mi_tail``
        (:func:`mi_tail`), ``consensus``, ``matched_subject``, ``matched_slice``, ``margin``, ``flagged``, ``decision``
        and ``truth`` when ground truth exists. Training file paths are left out on purpose: only
        pseudonymous subject IDs are shown.
    """
    flags = np.asarray(flags, bool)
    rows = table if include_all else table[flags]
    out = pd.DataFrame(index=rows.index)
    out["synthetic"] = [f"{p}#{i}" for p, i in zip(rows["synthetic_path"], rows["slice_index"], strict=True)]
    out["similarity"] = rows["similarity"].astype(float)
    out["p_value"] = rows["p_value"].astype(float)
    out["mi"] = rows["mi"].astype(float)
    out["mi_tail"] = mi_tail(rows["mi"].to_numpy(np.float64))
    cons = rows["layer_consensus"] if "layer_consensus" in rows else pd.Series(0, index=rows.index)
    out["consensus"] = [f"{int(c)}/{n_layers}" for c in cons]
    out["matched_subject"] = rows["nearest_train_subject"].astype(str)
    if train_labels is not None and "nearest_train_index" in rows:
        out["matched_slice"] = [train_labels(int(t)) if int(t) >= 0 else "" for t in rows["nearest_train_index"]]
        out["matched_slice"] = out["matched_slice"].astype(object)
    else:
        out["matched_slice"] = rows["nearest_train_slice"].astype(int)
    if "margin" in rows:
        out["margin"] = rows["margin"].astype(float)
    if include_all:
        out["flagged"] = flags
    out["decision"] = [_decision_of(latest, s) for s in rows["sha256"]]
    if show_truth and "label" in rows and rows["label"].notna().any():
        out["truth"] = rows["label"].fillna("").astype(str)
    # the one ranking every page follows (most significant first; similarity, and MI's fitted tail with it,
    # orders the slices whose p-values sit at the floor 1/(1 + n_null))
    order = review_order(table, np.ones(len(table), bool))
    rank = {row: k + 1 for k, row in enumerate(order)}
    out.insert(0, "rank", [rank[int(i)] for i in out.index])
    return out.sort_values("rank", kind="stable")


#: Upper end of :func:`mi_tail`: float64 cannot hold ``1 - mi`` below about 1e-16.
MI_TAIL_MAX: float = 16.0


def mi_tail(mi: np.ndarray) -> np.ndarray:
    """``−log10(1 − mi)``: MI's fitted tail on a scale that ranks, where p-values and MI itself saturate.

    The p-value cannot go below ``1/(1 + n_null)``, and MI (the null's CDF with a fitted exponential tail) shows
    as 1.000 for every copy; ``1 − mi`` is the fitted probability that an unseen real scan is at least as
    similar, so its −log10 keeps ordering copies far beyond the null (capped at :data:`MI_TAIL_MAX`).

    Parameters
    ----------
    mi : np.ndarray, shape (m,)
        ``AuditResult.table["mi"]`` in [0, 1].

    Returns
    -------
    np.ndarray of float64, shape (m,)
        In [0, MI_TAIL_MAX]; higher = more memorised.
    """
    tail = np.clip(1.0 - np.asarray(mi, np.float64), 10.0**-MI_TAIL_MAX, 1.0)
    return -np.log10(tail)


def thumbnail_uri(arr: np.ndarray, size: int = 56) -> str:
    """A small PNG of a float slice as a ``data:`` URI (for ``st.column_config.ImageColumn``), no file, no network.

    Parameters
    ----------
    arr : np.ndarray, shape (H, W)
        Float intensities in [0, 1].
    size : int
        Longer side in pixels.
    """
    import base64

    png = render_png(np.asarray(arr, np.float32), size=size, resample="bilinear")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def thumbnails(entry: AuditEntry, rows: Sequence[int], size: int = 56) -> tuple[list[str], list[str]]:
    """Thumbnails of synthetic slices and of their matched training slices (in the matched view), cached.

    Parameters
    ----------
    entry : AuditEntry
    rows : sequence of int
        Rows of ``entry.result.table``.
    size : int
        Longer side in pixels.

    Returns
    -------
    (list of str, list of str)
        ``data:`` URIs: the synthetic slice, and the matched training slice (``""`` when there is none).
    """
    from .views import View

    r = entry.result
    cache = entry.derived.setdefault(("thumbs", size), {})
    t = r.table
    has_flip = "align_flip" in t
    syn, train = [], []
    for row in rows:
        row = int(row)
        if row not in cache:
            s_uri = thumbnail_uri(np.asarray(r.synthetic[row].array), size)
            ti = int(t["nearest_train_index"].iat[row]) if "nearest_train_index" in t else -1
            t_uri = ""
            if ti >= 0:
                arr = np.asarray(r.train[ti].array)
                if has_flip:
                    try:
                        arr = View.parse(str(t["align_flip"].iat[row])).apply(arr)
                    except ValueError:
                        pass
                t_uri = thumbnail_uri(arr, size)
            cache[row] = (s_uri, t_uri)
        syn.append(cache[row][0])
        train.append(cache[row][1])
    return syn, train


def scores_with_decisions(table: pd.DataFrame, reviews: pd.DataFrame) -> pd.DataFrame:
    """``AuditResult.table`` with the latest reviewer decision per slice (``ReviewStore.to_frame``).

    Returns
    -------
    pandas.DataFrame
        The table's columns plus ``decision``, ``decision_comment``, ``reviewer``, ``decided_at``
        (empty where no decision exists).
    """
    out = table.copy()
    cols = {"decision": "decision", "comment": "decision_comment", "reviewer": "reviewer", "created_at": "decided_at"}
    by_sha = reviews.set_index("slice_sha256") if len(reviews) else None
    for src, dst in cols.items():
        if by_sha is None:
            out[dst] = ""
        else:
            out[dst] = [str(by_sha.at[s, src]) if s in by_sha.index else "" for s in out["sha256"]]
    return out


def derived(entry: AuditEntry, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """``build()`` once per audit and ``key`` (a figure or table at a setting), from ``entry.derived`` after that.

    ``key`` must hold everything the result depends on besides the audit (α, BH, the display options).
    """
    cache = entry.derived
    if key not in cache:
        cache[key] = build()
    return cache[key]


def subjects_at(entry: AuditEntry, alpha: float, fdr: bool) -> pd.DataFrame:
    """``subjects.csv`` at the setting on screen, from the audit's one Calibration, cached per audit and setting.

    See :func:`inspector.attribution.subjects_at` (the subject rule lives there only).
    """
    from .attribution import subjects_at as _subjects_at

    key = ("subjects", float(alpha), bool(fdr))
    cache = entry.derived
    if key not in cache:
        r = entry.result
        cache[key] = _subjects_at(
            r.subjects, r.table, r.calibration, alpha, fdr, evidence=getattr(r, "volume_evidence", None)
        )
    return cache[key]


def subject_review_frame(
    subjects: pd.DataFrame, table: pd.DataFrame, flags: np.ndarray, latest: Mapping[str, Any], decisions: Sequence[str]
) -> pd.DataFrame:
    """``AuditResult.subjects`` with flagged counts at the shown threshold and reviewer decision counts.

    Parameters
    ----------
    subjects : pandas.DataFrame
        ``AuditResult.subjects`` (one row per training subject).
    table : pandas.DataFrame
        ``AuditResult.table``.
    flags : np.ndarray of bool, shape (m,)
        ``AuditResult.flagged_at(alpha)`` at the threshold shown.
    latest : mapping of str to Review
        Latest decision per slice hash.
    decisions : sequence of str
        :data:`inspector.review.DECISIONS` (one count column each).

    Returns
    -------
    pandas.DataFrame
        ``subject_id``, ``n_train_slices``, ``n_synthetic_matched``, ``flagged_now``, ``reviewed``,
        one column per decision, ``max_similarity``, ``min_p_value``; sorted by ``flagged_now``.
    """
    flags = np.asarray(flags, bool)
    rows = table[flags]
    per: dict[str, dict[str, int]] = {}
    for subj, sha in zip(rows["nearest_train_subject"].astype(str), rows["sha256"], strict=True):
        d = per.setdefault(subj, {"flagged_now": 0, "reviewed": 0, **dict.fromkeys(decisions, 0)})
        d["flagged_now"] += 1
        dec = _decision_of(latest, sha)
        if dec:
            d["reviewed"] += 1
            if dec in d:
                d[dec] += 1
    out = subjects.copy()
    for col in ("flagged_now", "reviewed", *decisions):
        out[col] = [per.get(str(s), {}).get(col, 0) for s in out["subject_id"]]
    keep = ["subject_id", "n_train_slices", "n_synthetic_matched", "flagged_now", "reviewed", *decisions]
    keep += [c for c in ("max_similarity", "min_p_value") if c in out]
    out = out[[c for c in keep if c in out]]
    return out.sort_values(["flagged_now", "reviewed"], ascending=False, kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# Volumes: the synthetic volume beside its 3D-verified training volume
# ----------------------------------------------------------------------------------------------

#: The three orthogonal planes of the volume viewer (:meth:`inspector.result.VolumePair.plane`'s names):
#: axial is the audit's slices (along the slicing axis), coronal and sagittal cut across them.
VOLUME_PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
#: The panes of each plane: the :class:`~inspector.result.VolumePair` stack and its caption.
VOLUME_PANES: tuple[tuple[str, str], ...] = (
    ("synthetic", "Synthetic"),
    ("aligned", "Training (aligned)"),
    ("difference", "Difference"),
)
#: VolumePairs kept per audit (each holds three float32 stacks of (D, S, S): 35 MB for 180 slices of 128²).
VOLUME_PAIRS_KEPT = 4


def volume_unit_note(result: Any) -> str | None:
    """Why the audit has no volume review, in words; None when its volumes were verified in 3D (unit volume).

    Parameters
    ----------
    result : AuditResult

    Returns
    -------
    str or None
    """
    if getattr(result, "volume_evidence", None) is not None:
        return None
    how = (
        "To review whole synthetic volumes beside the training volumes they copy, aligned in 3D, set **Unit** "
        "(sidebar, Decision) to *volume* and run the audit again, or run `inspector scan --unit volume`."
    )
    cfg = result.config
    if cfg.mode == "paper":
        return (
            "This audit ran in paper mode, which scores slices only: no synthetic volume was matched or verified "
            f"in 3D. {how.replace('set **Unit**', 'choose the default mode, set **Unit**')}"
        )
    why = ""
    if cfg.unit == "auto":
        why = (
            " (the Unit setting *auto* chose slices: the synthetic set or the training set holds no volumes of "
            "several slices, e.g. 2D images)"
        )
    return (
        f"This audit scored slices only{why}: no synthetic volume was matched or verified in 3D. {how} "
        "The Overview page lists the per-volume combination of the slice scores."
    )


def _run_text(first: Any, last: Any) -> str:
    try:
        a, b = float(first), float(last)
    except (TypeError, ValueError):
        return ""
    if not (math.isfinite(a) and math.isfinite(b)):
        return ""
    return f"{int(a)}–{int(b)}"


def volume_truth(result: Any) -> dict[str, str]:
    """Ground truth per synthetic volume (``labels.csv`` of its slices: ``copy (rot5)``, ``novel``); {} without it.

    Returns
    -------
    dict of str to str
        Volume name (``volumes.csv``'s ``volume``) -> its slices' label(s) and augmentation(s).
    """
    t = result.table
    if "label" not in t or not t["label"].notna().any():
        return {}
    cal = result.calibration
    vi = np.asarray(cal.volume_index())
    out: dict[str, str] = {}
    for v, vid in enumerate(cal.volume_ids):
        mine = t.iloc[np.flatnonzero(vi == v)]
        labels = sorted({str(x) for x in mine["label"].dropna() if str(x)})
        augs = sorted({str(x) for x in mine.get("augmentation", pd.Series(dtype=str)).dropna()
                       if str(x) and str(x) != "none"})  # fmt: skip
        text = "/".join(labels)
        if augs and text:
            text += f" ({'/'.join(augs)})"
        out[str(vid)] = text
    return out


def volume_review_frame(volumes: pd.DataFrame, *, truth: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The Volumes page's table: one row per synthetic volume of ``AuditResult.volumes(alpha, fdr)``, flagged first.

    Nothing is recomputed: every number and the flag are the volumes table's (the audit's one Calibration).

    Parameters
    ----------
    volumes : pandas.DataFrame
        ``AuditResult.volumes(alpha, fdr)`` (with the volume evidence columns when the unit is volume).
    truth : mapping of str to str, optional
        :func:`volume_truth`; adds a ``truth`` column (the app shows it only when ground truth is revealed).

    Returns
    -------
    pandas.DataFrame
        Columns ``volume, n_slices, volume_similarity, p_value, flagged`` (bool), ``slices_flagged`` (``k/n``),
        ``training_volume, training_subject`` (the verified match, else the slices' majority match),
        ``coverage, slice_run`` (``first–last`` synthetic slice of the slice-order-consistent run),
        ``slice_consistency`` and ``truth`` when given; in the table's order (flagged, most significant first),
        index 0..n-1.
    """
    v = volumes.reset_index(drop=True)
    n = len(v)

    def col(name: str, default: Any = np.nan) -> pd.Series:
        return v[name] if name in v else pd.Series([default] * n, index=v.index)

    out = pd.DataFrame(index=v.index)
    out["volume"] = v["volume"].astype(str)
    out["n_slices"] = v["n_slices"].astype(int)
    out["volume_similarity"] = col("volume_similarity").astype(float)
    out["p_value"] = v["p_value"].astype(float)
    out["flagged"] = v["flagged"].astype(bool)
    out["slices_flagged"] = [f"{int(k)}/{int(m)}" for k, m in zip(col("n_slices_flagged", 0), v["n_slices"],
                                                                      strict=True)]  # fmt: skip
    verified = col("verified_train_volume", "").fillna("").astype(str)
    out["training_volume"] = verified.where(verified != "", v["nearest_train_volume"].astype(str))
    vsubj = col("verified_train_subject", "").fillna("").astype(str)
    out["training_subject"] = vsubj.where(vsubj != "", v["nearest_train_subject"].astype(str))
    out["coverage"] = col("coverage").astype(float)
    out["slice_run"] = [_run_text(a, b) for a, b in zip(col("run_first"), col("run_last"), strict=True)]
    out["slice_consistency"] = col("slice_consistency").astype(float)
    if truth is not None:
        out["truth"] = [truth.get(name, "") for name in out["volume"]]
    # the volumes table is flagged and most significant first already; a stable sort keeps that and guarantees it
    return out.sort_values("flagged", ascending=False, kind="stable").reset_index(drop=True)


def copied_subjects(volumes: pd.DataFrame) -> dict[str, list[str]]:
    """Training subjects copied by at least one flagged synthetic volume, and those volumes.

    Parameters
    ----------
    volumes : pandas.DataFrame
        ``AuditResult.volumes(alpha, fdr)``: its ``flagged`` and ``nearest_train_subject`` (the 3D-verified
        subject where a volume was verified).

    Returns
    -------
    dict of str to list of str
        Subject -> its flagged synthetic volumes in the table's order (most significant first); subjects with
        the most flagged volumes first (ties: the most significant volume first).
    """
    if volumes.empty:
        return {}
    flagged = volumes[volumes["flagged"].astype(bool)]
    index: dict[str, list[str]] = {}
    for subj, vol in zip(flagged["nearest_train_subject"].fillna("").astype(str), flagged["volume"].astype(str),
                         strict=True):  # fmt: skip
        if subj:
            index.setdefault(subj, []).append(vol)
    order = sorted(index, key=lambda s: -len(index[s]))  # stable: ties keep the first-seen (most significant) order
    return {s: index[s] for s in order}


def volume_pair_of(entry: AuditEntry, volume: str) -> Any:
    """``entry.result.volume_pair(volume)``, computed once per audit and volume (the last few are kept).

    Slider moves redraw planes of the cached stacks only; nothing of the audit is recomputed.

    Raises
    ------
    KeyError
        From :meth:`inspector.result.AuditResult.volume_pair`, with the reason (see :func:`open_volume`).
    """
    cache: dict[str, Any] = entry.derived.setdefault("volume_pairs", {})
    key = str(volume)
    if key in cache:
        cache[key] = cache.pop(key)  # most recently used last
        return cache[key]
    pair = entry.result.volume_pair(key)
    cache[key] = pair
    while len(cache) > VOLUME_PAIRS_KEPT:
        cache.pop(next(iter(cache)))
    return pair


def open_volume(entry: AuditEntry, volume: str) -> tuple[Any, str]:
    """The :class:`~inspector.result.VolumePair` of ``volume`` and ``""``, or ``None`` and why it has none (words).

    Never raises for a volume that cannot be shown (a slice-unit audit, a 2D image, a volume no training volume
    was verified against, an unknown name): the reason is returned for the page to show.
    """
    note = volume_unit_note(entry.result)
    if note is not None:
        return None, note
    try:
        return volume_pair_of(entry, volume), ""
    except KeyError as e:
        reason = str(e.args[0]) if e.args else str(e)
        reason = reason[:1].upper() + reason[1:]
        if "not verified" in reason:
            reason += " Its slices are still scored one by one: see the Flagged and Pair pages."
        return None, reason


def plane_length(pair: Any, which: str) -> int:
    """Positions of a plane's slider: the slices (axial), the rows (coronal) or the columns (sagittal)."""
    d, h, w = np.asarray(pair.synthetic).shape
    lengths = {"axial": d, "coronal": h, "sagittal": w}
    if which not in lengths:
        raise ValueError(f"plane must be one of {VOLUME_PLANES}; got {which!r}.")
    return int(lengths[which])


def through_plane_stretch(depth: int, size: int) -> int:
    """A display stretch of the slice axis in the coronal and sagittal planes, 1 to 4.

    The stacks keep one row per slice and the slices are resampled to ``size`` pixels in plane, so a volume
    of few thick slices looks flat; the through-plane spacing is not kept, so this is a display default only.
    """
    if depth <= 0 or size <= 0:
        return 1
    return int(min(4, max(1, size // depth)))


def volume_plane(pair: Any, which: str, position: int, image: str = "synthetic", *, stretch: int = 1) -> np.ndarray:
    """One plane of a :class:`~inspector.result.VolumePair` as it is drawn.

    Parameters
    ----------
    pair : VolumePair
    which : str
        ``axial`` (slice ``position``), ``coronal`` (row ``position``) or ``sagittal`` (column ``position``).
    position : int
        0-based, clipped to the stack.
    image : str
        ``synthetic``, ``aligned`` (the training volume resampled by the 3D transform) or ``difference``.
    stretch : int
        Rows per slice in the coronal and sagittal planes (:func:`through_plane_stretch`).

    Returns
    -------
    np.ndarray, shape (S, S) for axial, (D * stretch, S) otherwise
        The coronal and sagittal planes have the last slice at the top (the slice axis pointing up).
    """
    if which not in VOLUME_PLANES:
        raise ValueError(f"plane must be one of {VOLUME_PLANES}; got {which!r}.")
    if int(stretch) < 1:
        raise ValueError(f"stretch must be >= 1; got {stretch}.")
    plane = np.asarray(pair.plane(which, int(position), image))
    if which == "axial":
        return plane
    return np.repeat(plane[::-1], int(stretch), axis=0)


def plane_caption(label: str, which: str, position: int, n: int) -> str:
    """A pane's caption: ``"Synthetic · axial 13/38"`` (``position`` 0-based, shown 1-based)."""
    return f"{label} · {which} {int(position) + 1}/{int(n)}"


def axial_slice_evidence(result: Any, pair: Any, position: int, flags: np.ndarray) -> dict[str, Any]:
    """The slice-level evidence of the axial slice ``position`` of ``pair``: its row of the score table.

    Parameters
    ----------
    result : AuditResult
    pair : VolumePair
    position : int
        0-based axial position in the pair's stacks.
    flags : np.ndarray of bool, shape (m,)
        ``result.flags(alpha, fdr)`` at the setting on screen (the flag is never recomputed here).

    Returns
    -------
    dict
        ``row`` (of ``result.table``), ``slice`` (``<volume>#<slice index>``), ``slice_index``, ``similarity``,
        ``p_value``, ``flagged``, ``nearest_training`` (``<training volume> · slice <k>``),
        ``nearest_subject`` and ``on_verified_volume`` (the nearest training slice lies in the verified
        training volume).
    """
    rows = np.asarray(pair.rows)
    pos = int(np.clip(position, 0, len(rows) - 1))
    row = int(rows[pos])
    t = result.table.iloc[row]
    near_path = str(t.get("nearest_train_path", ""))
    near_slice = t.get("nearest_train_slice", None)
    near = near_path + (f" · slice {int(near_slice)}" if near_slice is not None and near_path else "")
    return {
        "row": row,
        "slice": f"{t['synthetic_path']}#{int(t['slice_index'])}",
        "slice_index": int(t["slice_index"]),
        "similarity": float(t["similarity"]),
        "p_value": float(t["p_value"]),
        "flagged": bool(np.asarray(flags, bool)[row]),
        "nearest_training": near,
        "nearest_subject": str(t.get("nearest_train_subject", "")),
        "on_verified_volume": bool(near_path) and near_path == str(pair.train_volume),
    }


def volume_facts(volumes: pd.DataFrame, volume: str) -> dict[str, Any]:
    """The volume-level numbers of one row of ``AuditResult.volumes(alpha, fdr)``, as plain values.

    Returns
    -------
    dict
        ``volume, n_slices, n_slices_flagged, p_value, flagged`` (bool), ``p_calibration``,
        ``volume_similarity, volume_ncc, coverage, slice_consistency`` (NaN when not verified),
        ``training_volume, training_subject, slice_run, run_slope, run_offset, n_candidate_volumes``.

    Raises
    ------
    KeyError
        ``volume`` is not in the table.
    """
    hit = volumes[volumes["volume"].astype(str) == str(volume)]
    if hit.empty:
        raise KeyError(f"{volume!r} is not a synthetic volume of this audit.")
    r = hit.iloc[0]

    def num(name: str) -> float:
        try:
            return float(r[name]) if name in r and r[name] is not None else float("nan")
        except (TypeError, ValueError):
            return float("nan")

    verified = str(r.get("verified_train_volume", "") or "")
    vsubj = str(r.get("verified_train_subject", "") or "")
    n_cand = num("n_candidate_volumes")
    return {
        "volume": str(r["volume"]),
        "n_slices": int(r["n_slices"]),
        "n_slices_flagged": int(r.get("n_slices_flagged", 0)),
        "p_value": float(r["p_value"]),
        "flagged": bool(r["flagged"]),
        "p_calibration": str(r.get("p_calibration", "")),
        "volume_similarity": num("volume_similarity"),
        "volume_ncc": num("volume_ncc"),
        "coverage": num("coverage"),
        "slice_consistency": num("slice_consistency"),
        "training_volume": verified or str(r.get("nearest_train_volume", "")),
        "training_subject": vsubj or str(r.get("nearest_train_subject", "")),
        "verified": bool(verified),
        "slice_run": _run_text(r.get("run_first"), r.get("run_last")),
        "run_slope": num("run_slope"),
        "run_offset": num("run_offset"),
        "n_candidate_volumes": int(n_cand) if math.isfinite(n_cand) else 0,
    }


def format_number(x: float, digits: int = 4) -> str:
    """``x`` with ``digits`` decimals, ``"n/a"`` when it is missing or not finite."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"

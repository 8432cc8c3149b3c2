"""The ``inspector`` command line: the audit pipeline headless, for CI of model releases.

Exit codes (a stable contract):

- ``0``: the audit ran (and, with ``--fail-on``, passed the gate);
- ``1``: the audit ran and failed the ``--fail-on`` gate;
- ``2``: bad input or usage, with a message on stderr: a missing path, no readable images, a bad option or one
  this machine cannot honour (``--device cuda`` without CUDA, ``mri-core`` without a checkpoint), ``--out``
  naming a file or lying inside an input, a malformed ``labels.csv``, too few training subjects, skipped training
  or holdout files without ``--allow-skipped`` (each named with its reason), a mixed audit folder;
- ``3``: an unexpected internal error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .calibration import GATES
from .review import SIGNOFF_DECISIONS

__all__ = ["CliProgress", "main", "build_parser"]

log = logging.getLogger("inspector")

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class CliProgress:
    """Renders ``progress(stage, done, total)`` callbacks on stderr with their counts, one stage at a time.

    Each stage (``"aligning:synthetic"``, labelled from :data:`inspector.types.PROGRESS_STAGES`) gets one tqdm
    bar with its counts (``Aligning candidates (synthetic): 40/77 slices``); a finished stage's bar is closed
    at once, so no bar sits at 100 % while the next stage works. Between two events a heartbeat (every
    ``heartbeat`` seconds, on a terminal only) refreshes the open bar's elapsed time and, once a stage has
    finished and the next has not reported yet, shows ``working (12 s since <stage>)``, so a long stage whose
    first event comes late (registration reports per chunk of queries) still shows that it runs. Off a
    terminal (CI logs) one line is written per stage when it starts and when it ends, with counts and seconds.

    Parameters
    ----------
    enabled : bool
        False renders nothing (``--quiet``).
    stream : file-like, optional
        Default ``sys.stderr``.
    heartbeat : float
        Seconds between two refreshes of the terminal display (0 turns the heartbeat off).
    """

    def __init__(self, enabled: bool = True, *, stream: Any = None, heartbeat: float = 1.0) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.heartbeat = heartbeat
        self.bar: Any = None
        self.stage: str | None = None
        self.finished: str | None = None
        self._t_stage = self._t_finished = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def label(stage: str) -> str:
        """``"aligning:synthetic"`` -> ``"Aligning candidates (synthetic)"``."""
        from .types import PROGRESS_STAGES

        head, _, detail = stage.partition(":")
        text = PROGRESS_STAGES.get(head, head.replace("_", " "))
        return f"{text} ({detail})" if detail else text

    @staticmethod
    def unit(stage: str) -> str:
        head = stage.partition(":")[0]
        return {"searching": "views", "training": "steps", "loading": "files"}.get(head, "slices")

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._render(stage, int(done), int(total))
        if self.tty and self.heartbeat > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="inspector-progress", daemon=True)
            self._thread.start()

    def _render(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if stage != self.stage:
            self._close_bar()
            self.stage, self._t_stage = stage, now
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=max(total, 1),
                    desc=self.label(stage),
                    unit=f" {self.unit(stage)}",
                    file=self.stream,
                    leave=True,
                    dynamic_ncols=True,
                )
            elif done < total:
                print(f"{self.label(stage)}: {done}/{total} {self.unit(stage)}", file=self.stream, flush=True)
        if self.bar is not None:
            self.bar.total = max(total, 1)
            self.bar.n = min(done, max(total, 1))
            self.bar.set_postfix_str("", refresh=False)
            self.bar.refresh()
        if total > 0 and done >= total:  # the stage is over: never leave its bar sitting at 100 %
            if not self.tty:
                print(
                    f"{self.label(stage)}: {done}/{total} {self.unit(stage)} in {now - self._t_stage:.1f} s",
                    file=self.stream,
                    flush=True,
                )
            self._close_bar()
            self.finished, self._t_finished = stage, now
            self.stage = None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._lock:
                if self.bar is not None:
                    self.bar.refresh()
                elif self.finished is not None:
                    waited = time.perf_counter() - self._t_finished
                    if waited >= self.heartbeat:
                        self.stream.write(f"\r  working ({waited:.0f} s since {self.label(self.finished)})\x1b[K")
                        self.stream.flush()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.tty and self.finished is not None:
            self.stream.write("\r\x1b[K")  # clear the heartbeat line

    def close(self) -> None:
        """Stop the heartbeat and close the open bar."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            self._close_bar()
            self.finished = None


#: The old name, kept for callers.
_TqdmProgress = CliProgress


def _parse_tuple(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`~inspector.config.AuditConfig` field, generated from :func:`inspector.config.settings`.

    Every option defaults to ``None`` so that :meth:`AuditConfig.create` falls back to the dataclass's default
    (shown in the help); booleans get ``--name/--no-name``; tuples are comma-separated.
    """
    from .config import SECTIONS, settings

    groups = {sec: parser.add_argument_group(f"{sec} settings") for sec in SECTIONS}
    for st in settings():
        g = groups[st.section]
        shown = ",".join(st.default) if st.kind is tuple else st.default
        help_text = f"{st.help} (default: {shown if shown not in ('', None) else 'none'})".replace("%", "%%")
        if st.kind is bool:
            g.add_argument(st.flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = _parse_tuple if st.kind is tuple else st.kind
        g.add_argument(
            st.flag,
            dest=st.name,
            type=kind,
            default=None,
            choices=st.choices,
            metavar=st.metavar or (None if st.choices else st.name.upper()),
            help=help_text,
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``inspector`` command (subcommands ``scan`` and ``report``)."""
    p = argparse.ArgumentParser(
        prog="inspector",
        description=(
            "MRI Memorization Inspector: tell whether a generative MRI model copied its training patients. "
            "Runs fully offline; nothing leaves this machine."
        ),
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "scan",
        help="score every synthetic slice against the training cohort and write scores.csv, summary.json, subjects.csv",
        description=(
            "Score every synthetic slice against the training cohort. Writes DIR/scores.csv (one row per synthetic "
            "slice), DIR/summary.json (dataset verdict, full config, versions, input hashes) and DIR/subjects.csv "
            "(per training subject). Inputs are folders (scanned recursively: NIfTI, DICOM, PNG/TIFF/JPEG, NPY/NPZ) "
            "or CSV manifests with columns path,subject_id[,label]."
        ),
    )
    s.add_argument("--train", required=True, metavar="PATH", help="training cohort T the model was trained on")
    s.add_argument("--synthetic", required=True, metavar="PATH", help="synthetic set G to be released")
    s.add_argument(
        "--holdout",
        metavar="PATH",
        help="optional real scans from the same source that the model never saw; gives the honest null s(H->T). "
        "Without it the null is leave-one-subject-out within T.",
    )
    add_config_options(s)
    s.add_argument("--cache-dir", metavar="DIR", help="cache for embeddings and trained encoders (default: user cache)")
    s.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    s.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: torch's choice). On a busy machine 1 is often much faster",
    )
    s.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="extract and match on a Dask cluster: 'local:N' (N worker processes on this machine, 127.0.0.1 only) "
        "or a scheduler's tcp://HOST:PORT (start one with 'dask scheduler', workers with 'dask worker ADDRESS' where "
        "this package is installed). The same results as without it; patient data goes to the workers",
    )
    s.add_argument(
        "--fail-on",
        choices=GATES,
        default="never",
        help="CI gate: 'flagged' exits 1 when any slice is flagged beyond what alpha explains (the lower end of "
        "the 95%% interval of the flagged fraction exceeds alpha) or --max-flagged is exceeded; 'verdict' exits 1 "
        "when the dataset verdict says copying; 'never' (default) always exits 0 after a successful scan",
    )
    s.add_argument(
        "--max-flagged",
        type=int,
        default=None,
        metavar="N",
        help="with --fail-on flagged: fail when more than N slices are flagged (default: use the interval rule)",
    )
    s.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    s.add_argument(
        "--quiet",
        action="store_true",
        help="only errors on stderr: no progress, no warnings (they stay in summary.json and the verdict); the "
        "verdict and the written paths still go to stdout",
    )

    r = sub.add_parser(
        "report",
        help="write the self-contained HTML release report of an audit folder",
        description="Write one self-contained HTML file (images embedded, opens offline) for a privacy officer.",
    )
    r.add_argument("--audit", required=True, metavar="DIR", help="a folder written by 'inspector scan'")
    r.add_argument(
        "--reviews",
        metavar="DB",
        help="review database (default: DIR/reviews.sqlite3, the one the app records decisions in for this audit)",
    )
    r.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="the HTML file to write; its summary NAME.summary.json (validated against "
        "inspector/schemas/summary.schema.json) is written beside it",
    )
    r.add_argument(
        "--alpha",
        type=float,
        default=None,
        metavar="A",
        help="the per-slice false-positive rate every flag, count and verdict of the report is taken at "
        "(default: the audit's own); stated in the report",
    )
    r.add_argument(
        "--fdr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Benjamini-Hochberg control at --alpha (default: the audit's own setting); stated in the report",
    )
    r.add_argument("--quiet", action="store_true", help="only errors on stderr; the results still go to stdout")
    sg = r.add_argument_group(
        "sign-off",
        "record a release decision (stored append-only in the review database and shown in the report); "
        "--signer, --role and --decision go together",
    )
    sg.add_argument("--signer", metavar="NAME", help="who signs off (a staff name)")
    sg.add_argument("--role", metavar="ROLE", help="the signer's role, e.g. 'privacy officer'")
    sg.add_argument(
        "--decision",
        choices=SIGNOFF_DECISIONS,
        help="the release decision",
    )
    sg.add_argument(
        "--reason",
        metavar="TEXT",
        help="why; required when flagged pairs have no reviewer decision, and for a release when the setting "
        "cannot flag a copy, the verdict says memorised or reviewers judged pairs copies (refused otherwise)",
    )
    sg.add_argument("--date", metavar="YYYY-MM-DD", help="date of the decision (default: today, UTC)")
    return p


def _scan(args: argparse.Namespace) -> int:
    from .config import AuditConfig, ConfigError, settings
    from .folder import check_output_folder, save_audit
    from .io import CohortNotFoundError
    from .pipeline import audit

    # everything that needs no data first: a bad option never costs a load
    try:
        cfg = AuditConfig.create(**{st.name: getattr(args, st.name) for st in settings()})
    except ConfigError as e:
        raise ValueError(f"bad option {e.flag}: {e}") from e
    except ValueError as e:
        raise ValueError(f"bad option: {e}") from e
    if args.max_flagged is not None and args.max_flagged < 0:
        raise ValueError(f"bad option --max-flagged: must be >= 0; got {args.max_flagged}.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1; got {args.threads}.")
    inputs = {"train": args.train, "synthetic": args.synthetic, "holdout": args.holdout}
    for name, path in inputs.items():
        if path is not None and not Path(path).expanduser().exists():
            raise CohortNotFoundError(
                f"--{name} {Path(path).expanduser()} does not exist. Expected a folder of images, a CSV manifest "
                "with columns path,subject_id[,label], or a single image file."
            )
    out = check_output_folder(args.out, inputs)
    try:
        cfg.preflight()
    except ConfigError as e:
        raise ValueError(f"bad option {e.flag}: {e}") from e
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    cluster = None
    if args.cluster:
        from .cluster import ClusterUnavailableError, connect

        try:  # before any data is read: an unreachable scheduler is found at once
            cluster = connect(args.cluster)
        except ClusterUnavailableError as e:
            raise ValueError(f"--cluster {args.cluster}: {e}") from e
        except ValueError as e:
            raise ValueError(f"bad option --cluster: {e}") from e
    progress = CliProgress(enabled=not args.quiet)
    try:
        result = audit(
            args.train,
            args.synthetic,
            holdout=args.holdout,
            config=cfg,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
            progress=progress,
            cluster=cluster,
        )
    finally:
        progress.close()
        if cluster is not None:
            cluster.close()
    save_audit(result, out)
    gaps = result.missing_evidence
    for name, files in gaps.items():
        # named on stderr even under --quiet: a file the audit ran without (an unaudited synthetic file, or a
        # training/holdout file under --allow-skipped) is missing evidence and never passes silently
        if not files:
            continue
        what = "not audited" if name == "synthetic" else "missing evidence (--allow-skipped)"
        hidden = "" if cfg.show_paths else " (pseudonymous labels; --show-paths shows the file names)"
        print(f"warning: {len(files)} {name} file(s) skipped, {what}{hidden}:", file=sys.stderr)
        for sk in files:
            print(f"  - {sk.path}: {sk.reason}", file=sys.stderr)
    print(result.verdict_text)
    print(f"wrote {out / 'scores.csv'}, {out / 'summary.json'}, {out / 'subjects.csv'}")
    failed, why = result.calibration.gate(args.fail_on, max_flagged=args.max_flagged)
    if args.fail_on != "never" and not result.evidence_complete and not cfg.allow_skipped:
        n = len(gaps["train"]) + len(gaps["holdout"])
        failed, why = True, f"missing evidence: {n} training/holdout file(s) were skipped (see above)"
    if failed:
        print(f"GATE FAILED (--fail-on {args.fail_on}): {why}", file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    import json

    from .report import summary_path_for, write_report
    from .review import SignOff

    signoff = None
    given = {"--signer": args.signer, "--role": args.role, "--decision": args.decision}
    if any(v is not None for v in (*given.values(), args.reason, args.date)):
        missing = [k for k, v in given.items() if not v]
        if missing:
            raise ValueError(
                f"a sign-off needs --signer, --role and --decision together; missing {', '.join(missing)}."
            )
        signoff = SignOff(args.signer, args.role, args.decision, date=args.date or "", reason=args.reason or "")
    if args.alpha is not None and not 0 < args.alpha < 1:
        raise ValueError(f"bad option --alpha: must lie in (0, 1); got {args.alpha}.")
    path = write_report(args.audit, args.out, reviews=args.reviews, signoff=signoff, alpha=args.alpha, fdr=args.fdr)
    spath = summary_path_for(path)
    summary = json.loads(spath.read_text(encoding="utf-8"))
    rv, v = summary["reviews"], summary["verdict"]
    rule = "Benjamini-Hochberg at alpha" if v.get("fdr") else "alpha"
    print(summary["verdict_text"])
    print(f"setting: {rule} = {v['alpha']:g}; null: {v['null_kind']} of {v['n_null']} slices")
    print(f"{rv['n_reviewed']} of {rv['n_flagged']} flagged pairs reviewed")
    for c in summary.get("checklist", []):
        if not c["ok"]:
            print(f"not met: {c['name']}: {c['detail']}")
    if summary.get("signoff"):
        so = summary["signoff"]
        print(f"signed off: {so['decision']} by {so['signer']} ({so['role']}) on {so['date']}")
    print(f"wrote {path} (sha256 {summary['report']['sha256']}) and {spath}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``inspector`` console script. Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = bool(getattr(args, "quiet", False))
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not quiet:
        return _run(parser, args)
    # --quiet: only errors on stderr (the library's warnings stay in summary.json and the verdict)
    import warnings

    lib = logging.getLogger("inspector")
    before = lib.level
    lib.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(parser, args)
    finally:
        lib.setLevel(before)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.command == "scan":
            return _scan(args)
        if args.command == "report":
            return _report(args)
    except (FileNotFoundError, ValueError, NotADirectoryError, PermissionError) as e:
        print(f"inspector {args.command}: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last resort: a message, not a traceback, and a distinct code
        log.debug("internal error", exc_info=True)
        print(f"inspector {args.command}: internal error: {type(e).__name__}: {e} (rerun with -vv)", file=sys.stderr)
        return EXIT_INTERNAL
    parser.error(f"unknown command {args.command!r}")
    return EXIT_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

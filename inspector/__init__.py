"""MRI Memorization Inspector: did a generative MRI model copy its training patients?

The public API is imported lazily so that ``inspector --help`` and light tools do not pay for
importing torch and faiss. No submodule shares its name with an exported function or class, so importing
a submodule never shadows an exported name (``inspector.audit`` is always the function).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Slice": "inspector.types",
    "Cohort": "inspector.types",
    "SkippedFile": "inspector.types",
    "load_cohort": "inspector.io",
    "LoadConfig": "inspector.io",
    "PreprocessConfig": "inspector.preprocess",
    "extract": "inspector.features",
    "Features": "inspector.features",
    "get_extractor": "inspector.models",
    "available_extractors": "inspector.models",
    "audit": "inspector.pipeline",
    "AuditConfig": "inspector.config",
    "AuditResult": "inspector.result",
    "VolumePair": "inspector.result",
    "register_volumes": "inspector.volumes",
    "VolumeAlignment": "inspector.volumes",
    "Dar3D": "inspector.dar3d",
    "Calibration": "inspector.calibration",
    "Verdict": "inspector.calibration",
    "gate": "inspector.calibration",
    "View": "inspector.views",
    "save_audit": "inspector.folder",
    "load_audit_folder": "inspector.folder",
    "write_report": "inspector.report",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'inspector' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

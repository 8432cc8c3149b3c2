"""MRI Memorization Inspector: did a generative MRI model copy its training patients?

The public API is imported lazily so that ``inspector --help`` and light tools do not pay for
importing torch and faiss.
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
    "audit": "inspector.audit",
    "AuditConfig": "inspector.audit",
    "AuditResult": "inspector.audit",
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

"""Where things live: every path the suite uses is anchored here, at the repository root.

Reads the environment variables ``CITYLIB_OUTPUTS`` (where generated results go, default
``<repo>/outputs``) and ``CITYLIB_SHARED`` (the folder holding ``models/ade20k``,
default ``<repo>/../shared``). Writes nothing.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
PARAMETERS = ROOT / "parameters"
WORLDS = Path(__file__).resolve().parents[1] / "world" / "worlds"


def outputs(override: str | os.PathLike | None = None) -> Path:
    """The outputs folder: ``override`` if given, else ``$CITYLIB_OUTPUTS``, else ``<repo>/outputs``."""
    if override:
        return resolve(override)
    return resolve(os.environ.get("CITYLIB_OUTPUTS", ROOT / "outputs"))


def shared() -> Path:
    """The folder of shared models and samples (``$CITYLIB_SHARED`` or ``<repo>/../shared``)."""
    return Path(os.environ.get("CITYLIB_SHARED", ROOT.parent / "shared")).resolve()


def ade20k_model_dir() -> Path:
    """Folder with the ADE20K TFLite model and ``labels.txt`` (``$CITYLIB_ADE20K`` overrides)."""
    return Path(os.environ.get("CITYLIB_ADE20K", shared() / "models" / "ade20k")).resolve()


def resolve(path: str | os.PathLike, base: Path | None = None) -> Path:
    """An absolute path; a relative one is taken against ``base`` (default: the repo root)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ((base or ROOT) / p).resolve()

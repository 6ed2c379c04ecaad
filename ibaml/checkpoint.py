"""Crash-safe checkpoints: one file holding everything a run needs to continue.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (so that it loads with
``torch.load(..., weights_only=True)``)::

    {"format": FORMAT_VERSION, "config": {...}, "step": int, ...anything else the caller adds}

It is written atomically: the bytes go to a temporary file in the same folder, which is
flushed and ``fsync``-ed and then renamed over the target (``os.replace`` is atomic on POSIX
and Windows), and the folder itself is ``fsync``-ed. A crash at any moment leaves either the
old checkpoint or the new one, never a torn file.

:func:`load_checkpoint` checks the format and, when given the current configuration, that the
keys that fix the shape of the run agree, and raises :class:`CheckpointError` with one line
naming the file and what is wrong otherwise.

Example
-------
>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "last.pt")
>>> _ = save_checkpoint(path, {"step": 3, "config": {"method": "imaml"}, "theta": torch.zeros(2)})
>>> load_checkpoint(path, config={"method": "imaml"})["step"]
3
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import torch

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, of another format, or from an incompatible configuration."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Union[str, Path], state: Mapping[str, Any]) -> Path:
    """Write ``state`` (plus ``"format"``) to ``path`` atomically: temporary file in the same
    folder, flush, ``fsync``, ``os.replace``, ``fsync`` of the folder. Returns the path."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(state)
    payload["format"] = FORMAT_VERSION
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def config_mismatches(saved: Mapping[str, Any], current: Mapping[str, Any],
                      keys: Optional[Iterable[str]] = None) -> Dict[str, tuple]:
    """``{key: (saved, current)}`` for the keys (default: those in both) whose values differ."""
    names = list(keys) if keys is not None else [k for k in current if k in saved]
    return {k: (saved.get(k), current.get(k)) for k in names if saved.get(k) != current.get(k)}


def load_checkpoint(path: Union[str, Path], config: Optional[Mapping[str, Any]] = None,
                    keys: Optional[Iterable[str]] = None, map_location=None) -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    With ``config``, the saved ``state["config"]`` must agree with it on ``keys`` (default: every
    key the two share); a difference raises :class:`CheckpointError` naming the keys and values.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint file there")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {first}") from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path}: not an ibaml checkpoint (no 'format' entry)")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state['format']!r}, this version reads {FORMAT_VERSION}")
    if config is not None:
        bad = config_mismatches(state.get("config", {}), config, keys)
        if bad:
            what = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in bad.items())
            raise CheckpointError(f"{path}: checkpoint from an incompatible configuration ({what})")
    return state

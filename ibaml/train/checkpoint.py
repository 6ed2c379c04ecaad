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

:func:`rng_state` and :func:`restore_rng_state` capture and restore every random source of a
run (torch's global CPU and CUDA generators and named ``torch.Generator`` / samplers with
``get_state``/``set_state``), so that a resumed run draws exactly what the uninterrupted one
would have drawn. A crash between the temporary file and the rename leaves the temporary
file behind; :func:`remove_stale_temporaries` clears it when the (single) writer restarts.

Example
-------
>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "last.pt")
>>> _ = save_checkpoint(path, {"step": 3, "config": {"method": "imaml"}, "theta": torch.zeros(2)})
>>> load_checkpoint(path, config={"method": "imaml"})["step"]
3
>>> gen = torch.Generator().manual_seed(0)
>>> saved = rng_state(tasks=gen); a = torch.rand(2, generator=gen)
>>> restore_rng_state(saved, tasks=gen); torch.equal(a, torch.rand(2, generator=gen))
True
"""

from __future__ import annotations

import glob
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist

FORMAT_VERSION = 1
_UMASK = os.umask(0o022)
os.umask(_UMASK)


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
        if hasattr(os, "fchmod"):  # mkstemp makes the file private (0600); a checkpoint gets the usual mode
            os.fchmod(fd, 0o666 & ~_UMASK)
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
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut one has no central directory
            first = "not a complete torch.save archive"
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


def load_on_main(path: Union[str, Path], group=None, *, missing_ok: bool = False, src: int = 0,
                 **options) -> Optional[Dict[str, Any]]:
    """:func:`load_checkpoint` read by rank ``src`` alone and broadcast to every rank of the
    ``torch.distributed`` ``group`` (``None``: this process reads it itself), so that ranks
    without the folder (no shared file system) get the same state. Every rank ends the same
    way: the state; ``None`` where there is no file and ``missing_ok``; or the same
    :class:`CheckpointError`. ``options`` go to :func:`load_checkpoint`.

    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> load_on_main(os.path.join(folder, "last.pt"), missing_ok=True) is None
    True
    """
    def read():
        if missing_ok and not Path(path).is_file():
            return None
        return load_checkpoint(path, **options)

    if group is None:
        return read()
    outcome: list = [None]
    if dist.get_rank() == src:
        try:
            outcome = [("state", read())]
        except CheckpointError as e:
            outcome = [("error", str(e))]
    dist.broadcast_object_list(outcome, src=src, group=group)
    kind, value = outcome[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


def _temporary_pattern(path: Path) -> str:
    return str(path.parent / f".{glob.escape(path.name)}.*.tmp")


def remove_stale_temporaries(path: Union[str, Path]) -> int:
    """Delete temporary files that an interrupted :func:`save_checkpoint` to ``path`` left
    behind (``.NAME.*.tmp`` beside it); returns how many. Call it only where no other
    process is writing ``path`` at the same time."""
    path = Path(path)
    removed = 0
    for tmp in glob.glob(_temporary_pattern(path)):
        try:
            os.unlink(tmp)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def rng_state(**sources) -> Dict[str, Any]:
    """Snapshot of every random source of a run::

        {"torch": torch.get_rng_state(),
         "cuda": torch.cuda.get_rng_state_all()      # only when CUDA is initialised
         "sources": {name: source.get_state()}}       # torch.Generator, EpisodeSampler, ...

    ``sources`` are named objects with ``get_state()`` / ``set_state(state)``."""
    for name, src in sources.items():
        if not (hasattr(src, "get_state") and hasattr(src, "set_state")):
            raise TypeError(f"rng source {name!r} must have get_state() and set_state(), got {type(src).__name__}")
    state = {"torch": torch.get_rng_state(), "sources": {n: src.get_state() for n, src in sources.items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], **sources) -> None:
    """Put back a snapshot from :func:`rng_state` into torch's global generators and into the
    named ``sources`` (each must be in the snapshot: :class:`CheckpointError` otherwise)."""
    saved = state.get("sources", {})
    missing = [n for n in sources if n not in saved]
    if missing:
        raise CheckpointError(f"checkpoint has no random state for {missing} (it has {sorted(saved)})")
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = list(state["cuda"])[: torch.cuda.device_count()]
        for device, s in enumerate(states):
            torch.cuda.set_rng_state(s, device)
    for name, src in sources.items():
        src.set_state(saved[name])

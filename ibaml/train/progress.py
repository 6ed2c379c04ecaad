"""Progress of long loops (meta-training, chunked evaluation) that reads well where it lands.

On a terminal (or in a notebook) it is a tqdm bar, redrawn at most once a second. When the
output is not a terminal (a log file, a pipe) a bar is a poor fit: tqdm keeps its counter on
the side between redraws and writes carriage-return fragments, so a log holds one long line.
There the progress goes out as plain lines instead (:class:`ProgressLines`): one every
``every_percent`` of the loop and at least one every ``interval`` seconds, each with the
counter, the percentage, the elapsed time, the rate, the time left and the postfix (the loss,
where the loop sets one), and a last line when the loop ends::

    meta-train: 15/300 (5%), 0:03 elapsed, 4.88 it/s, ETA 0:58, loss=0.731
    ...
    meta-train: 300/300 (100%), 1:01 elapsed, 4.92 it/s, done, loss=0.112

A transient loop (``leave=False``, such as the chunks of an evaluation) writes only the lines
that its ``interval`` calls for, and a last one if it wrote any, so that short loops stay out
of the log.

Example
-------
>>> sum(progress_bar(range(3), progress=False))
3
>>> import io
>>> log = io.StringIO()
>>> for _ in ProgressLines(range(4), desc="loop", every_percent=50, file=log, clock=iter(range(100)).__next__):
...     pass
>>> print(log.getvalue(), end="")
loop: 2/4 (50%), 0:02 elapsed, 1.00 it/s, ETA 0:02
loop: 4/4 (100%), 0:05 elapsed, 0.80 it/s, done
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Iterable, Optional

from tqdm.auto import tqdm

__all__ = ["progress_bar", "ProgressLines", "is_terminal"]


def is_terminal(stream) -> bool:
    """Whether ``stream`` is a terminal or a notebook's output (a bar redrawn in place reads well)."""
    if type(stream).__module__.startswith("ipykernel"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def progress_bar(iterable, progress: bool, **kwargs):
    """Progress over ``iterable``, on ``sys.stdout``: nothing unless ``progress``; a tqdm bar
    (``mininterval`` 1 s) on a terminal or in a notebook; otherwise :class:`ProgressLines`.
    ``kwargs`` are tqdm's (``desc``, ``total``, ``initial``, ``leave``, ...)."""
    if not progress:
        return tqdm(iterable, disable=True, **kwargs)
    if is_terminal(sys.stdout):
        return tqdm(iterable, file=sys.stdout, mininterval=1.0, dynamic_ncols=True, **kwargs)
    return ProgressLines(iterable, file=sys.stdout, **kwargs)


def _clock_time(seconds: float) -> str:
    """``M:SS`` or ``H:MM:SS``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class ProgressLines:
    """Progress as plain lines, for output that is not a terminal; the part of tqdm's interface
    that the loops use (iteration, :meth:`update`, :meth:`set_postfix`, :meth:`close`).

    Args:
        iterable: the loop's iterable (or ``None``, counting by :meth:`update`).
        desc: the name at the start of each line.
        total: the number of steps (default ``len(iterable)``); without one, lines say only the
            counter and come by time.
        initial: the step the loop starts from (a resumed run); rates and the time left count
            the steps made here.
        leave: write the last line (``False``: only if an earlier line was written).
        every_percent: a line each time the counter passes a multiple of this share of ``total``.
        interval: a line at least every ``interval`` seconds.
        file: where the lines go (default ``sys.stdout`` at the time of writing), flushed each time.
        clock: seconds, monotonic (default :func:`time.monotonic`).
    """

    def __init__(self, iterable: Optional[Iterable] = None, desc: Optional[str] = None,
                 total: Optional[int] = None, initial: int = 0, leave: bool = True,
                 every_percent: float = 5.0, interval: float = 60.0, file=None,
                 clock: Callable[[], float] = time.monotonic, **_tqdm_options):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = initial + len(iterable)
        if not every_percent > 0 or not interval > 0:
            raise ValueError(f"every_percent and interval must be positive, got {every_percent!r}, {interval!r}")
        self.iterable, self.desc, self.total, self.leave = iterable, desc or "", total, leave
        self.n = self.initial = int(initial)
        self.interval, self.file, self.clock = float(interval), file, clock
        self.step = max(1, math.ceil(total * every_percent / 100)) if total else None
        self.next_mark = (self.n // self.step + 1) * self.step if self.step else None
        self.postfix: dict = {}
        self.start = self.last_line = clock()
        self.lines = 0
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __len__(self):
        return self.total if self.total is not None else len(self.iterable)

    def update(self, n: int = 1) -> None:
        """Count ``n`` steps; write a line if a mark or the interval has been passed."""
        self.n += n
        now = self.clock()
        due = now - self.last_line >= self.interval
        if self.step and self.n >= self.next_mark:
            self.next_mark = (self.n // self.step + 1) * self.step
            due = due or self.leave
        if due and not (self.total and self.n >= self.total):   # the last line is close()'s
            self._write(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        """The ``key=value`` pairs at the end of the next lines (``refresh`` is tqdm's; unused)."""
        self.postfix = {**dict(ordered_dict or {}), **kwargs}

    def set_description(self, desc: Optional[str] = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def close(self) -> None:
        """Write the last line (once)."""
        if self.closed:
            return
        self.closed = True
        if self.leave or self.lines:
            self._write(self.clock(), last=True)

    def line(self, now: float, last: bool = False) -> str:
        """The progress line at time ``now``."""
        elapsed = now - self.start
        done = self.n - self.initial
        rate = done / elapsed if done and elapsed > 0 else None
        if self.total:
            parts = [f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)"]
        else:
            parts = [f"{self.n}"]
        parts.append(f"{_clock_time(elapsed)} elapsed")
        if rate is not None:
            parts.append(f"{rate:.2f} it/s" if rate >= 0.1 else f"{1 / rate:.1f} s/it")
        if last:
            parts.append("done" if self.total is None or self.n >= self.total else "stopped")
        elif rate is not None and self.total:
            parts.append(f"ETA {_clock_time((self.total - self.n) / rate)}")
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _write(self, now: float, last: bool = False) -> None:
        stream = self.file if self.file is not None else sys.stdout
        stream.write(self.line(now, last) + "\n")
        stream.flush()
        self.lines += 1
        self.last_line = now

"""Progress bars for long loops (meta-training, chunked evaluation): tqdm that redraws at most
once a second on a terminal and once a minute when the output is a log file, so that a job's
log holds a line a minute rather than one per step.

Example
-------
>>> sum(progress_bar(range(3), progress=False))
3
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(iterable, progress: bool, **kwargs):
    """``tqdm(iterable, **kwargs)``, disabled unless ``progress``; ``mininterval`` 1 s on a
    terminal, 60 s otherwise."""
    tty = hasattr(sys.stdout, "isatty") and sys.stdout.isatty()
    return tqdm(iterable, disable=not progress, file=sys.stdout, mininterval=1.0 if tty else 60.0,
                dynamic_ncols=tty, **kwargs)

"""Command-line plumbing shared by the example scripts: which options were given explicitly,
a resumed run's saved options merged under them, and range checks reported as one argparse
error each.

Resuming a run from the command that started it works in three steps:

1. :func:`given_options` tells the options typed on the command line from argparse's defaults;
2. the checkpoint is read with the given options that shape the trajectory as the
   configuration it must match (:func:`ibaml.checkpoint.load_checkpoint`);
3. :func:`merge_saved_options` fills every option *not* given from the saved configuration.

Example
-------
>>> import argparse
>>> p = argparse.ArgumentParser()
>>> _ = p.add_argument("--ways", type=int, default=5)
>>> _ = p.add_argument("--seed", type=int, default=0)
>>> given = given_options(p, ["--seed", "3"])
>>> given
{'seed': 3}
>>> args = merge_saved_options(p.parse_args(["--seed", "3"]), {"ways": 20, "seed": 1}, given)
>>> args.ways, args.seed
(20, 3)
>>> check_ranges(p, args, minimum={"ways": 2})   # passes: 20 >= 2
"""

from __future__ import annotations

import argparse
import math
from typing import Iterable, Mapping, Optional, Sequence

__all__ = ["given_options", "merge_saved_options", "check_ranges", "TAIL_CHOICES", "tail_family"]

#: the command-line names of the predictive families of ``fit_noise_prior(..., tails=...)``
TAIL_CHOICES = ("lognormal", "student_t", "none")


def tail_family(choice: str) -> Optional[str]:
    """A :data:`TAIL_CHOICES` name as ``fit_noise_prior`` takes it: ``"none"`` (the Gaussian) →
    ``None``, the others unchanged."""
    return None if choice == "none" else choice


def option_name(attribute: str) -> str:
    """``"meta_iters"`` → ``"--meta-iters"``."""
    return "--" + attribute.replace("_", "-")


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict:
    """The options given in ``argv`` with their parsed values, without the defaults.

    argparse leaves alone an attribute the namespace already holds, so every option starts as
    a marker object and only those that ``argv`` sets lose it."""
    marker = object()
    namespace = argparse.Namespace(**{name: marker for name in vars(parser.parse_args([]))})
    return {k: v for k, v in vars(parser.parse_args(argv, namespace=namespace)).items() if v is not marker}


def merge_saved_options(args: argparse.Namespace, saved: Mapping, given: Mapping,
                        keep: Iterable[str] = ("resume", "out", "overwrite")) -> argparse.Namespace:
    """``args`` with every option that is neither in ``given`` nor in ``keep`` replaced by its
    value in ``saved`` (a resumed run's configuration); options ``saved`` does not know stay."""
    merged, keep = dict(vars(args)), set(keep)
    for key, value in saved.items():
        if key in merged and key not in given and key not in keep:
            merged[key] = value
    return argparse.Namespace(**merged)


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace, *,
                 minimum: Mapping[str, int] = (), positive: Iterable[str] = ()) -> None:
    """Stop with ``parser.error`` (one line, exit status 2) at the first option out of range:
    ``minimum`` maps attribute → smallest allowed value (``--ways must be at least 2, got 1``),
    ``positive`` lists options that must be finite and ``> 0``. Options whose value is ``None``
    (not set, a preset decides) pass."""
    for name, low in dict(minimum).items():
        value = getattr(args, name)
        if value is not None and value < low:
            kind = "at least 1" if low == 1 else ("0 or more" if low == 0 else f"at least {low}")
            parser.error(f"{option_name(name)} must be {kind}, got {value}")
    for name in positive:
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            parser.error(f"{option_name(name)} must be a positive number, got {value}")

"""Command-line plumbing shared by the example scripts: the options of a meta-training run
(:func:`add_run_options`, checked by :func:`check_run_options`) and of an image dataset
(:func:`add_image_data_options`, read by :func:`load_image_data`), which options were given
explicitly, a resumed run's saved options merged under them (:func:`parse_resumable`), and
range checks reported as one argparse error each.

Resuming a run from the command that started it works in three steps:

1. :func:`given_options` tells the options typed on the command line from argparse's defaults;
2. the checkpoint is read with the given options that shape the trajectory as the
   configuration it must match (:func:`ibaml.train.checkpoint.load_checkpoint`);
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
import contextlib
import math
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch

from ibaml.data.omniglot import parse_split_sizes
from ibaml.data.splits import DATASETS, FIXTURE_KINDS, load_splits, write_fixture
from ibaml.train.checkpoint import load_checkpoint
from ibaml.train.distributed import launch_world_size, launched_in_parallel
from ibaml.train.nonfinite import NONFINITE_POLICIES
from ibaml.train.training import LAST, holds_run

__all__ = ["add_run_options", "check_run_options", "RUN_MAY_CHANGE", "add_image_data_options",
           "check_image_data_options", "load_image_data", "IMAGE_DATA_MAY_CHANGE", "parse_resumable", "given_options",
           "merge_saved_options", "check_ranges", "exit_on", "TAIL_CHOICES", "tail_family"]

#: run options that may differ between a run and its resumption: they do not shape the trajectory
RUN_MAY_CHANGE = ("meta_iters", "checkpoint_every", "read_every", "out", "resume", "overwrite", "no_progress",
                  "threads")
#: the smallest value of each run option that has one
_RUN_MINIMUM = {"meta_iters": 1, "meta_batch": 1, "cg_steps": 1, "threads": 1, "checkpoint_every": 0, "read_every": 0}

#: the command-line names of the predictive families of ``fit_noise_prior(..., tails=...)``
TAIL_CHOICES = ("lognormal", "student_t", "none")


def tail_family(choice: str) -> Optional[str]:
    """A :data:`TAIL_CHOICES` name as ``fit_noise_prior`` takes it: ``"none"`` (the Gaussian) →
    ``None``, the others unchanged."""
    return None if choice == "none" else choice


def add_run_options(parser, *, meta_iters: int, meta_batch: int, checkpoint_every: int = 0,
                    nonfinite: bool = False, distributed: bool = False) -> None:
    """Add the options of a meta-training run to ``parser`` (an ``ArgumentParser`` or one of its
    groups), with the script's defaults for the loop length, the meta-batch and the checkpoint
    interval: ``--meta-iters --meta-batch --meta-lr --cg-steps --cg-damping --checkpoint-every
    --read-every --resume --overwrite --device --dtype --seed --threads --out --no-progress``,
    ``--nonfinite`` with ``nonfinite=True`` and ``--distributed`` (data-parallel under
    ``torchrun``) with ``distributed=True``. They go to :func:`ibaml.train.training.fit` and
    :func:`ibaml.build_learner`; :func:`check_run_options` checks them."""
    add = parser.add_argument
    add("--meta-iters", type=int, default=meta_iters, help="meta-iterations")
    add("--meta-batch", type=int, default=meta_batch, help="tasks per meta-iteration")
    add("--meta-lr", type=float, default=1e-3, help="meta learning rate")
    add("--cg-steps", type=int, default=20, help="conjugate-gradient iterations of the implicit gradient")
    add("--cg-damping", type=float, default=0.0, help="damping added to the Hessian in the conjugate gradient")
    add("--checkpoint-every", type=int, default=checkpoint_every, metavar="N",
        help="also write last.pt every N meta-iterations (0: only at the end, where it is always written)")
    add("--read-every", type=int, default=0, metavar="N",
        help="read the training statistics on the host every N meta-iterations (default: 1 on the CPU, "
             "ibaml.train.training.GPU_READ_EVERY on a GPU, which then never waits between reads)")
    add("--resume", default=None, metavar="DIR",
        help="continue the run saved in DIR (a run killed before its first checkpoint starts from scratch)")
    add("--overwrite", action="store_true", help="replace the run that the output folder already holds")
    add("--device", default="cpu")
    add("--dtype", default="float32", choices=("float32", "float64"))
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=None, help="torch CPU threads")
    add("--out", default=None, metavar="DIR", help="output folder (default: the --resume folder, else one under runs/)")
    add("--no-progress", action="store_true", help="no progress bars")
    if nonfinite:
        add("--nonfinite", default="skip", choices=NONFINITE_POLICIES,
            help="a task with a non-finite inner solution, CG residual or meta-gradient: skip it and count it "
                 "(default), or stop with an error")
    if distributed:
        add("--distributed", action="store_true", help="data-parallel meta-training under torchrun")


def check_run_options(parser: argparse.ArgumentParser, args: argparse.Namespace, default_out: str,
                      runs: Sequence[str] = ("",)) -> None:
    """Check the options of :func:`add_run_options` and settle ``args.out`` (the ``--resume``
    folder, else ``default_out``). Stops with ``parser.error`` when an option is out of range,
    ``--device cuda`` has no CUDA, ``--distributed`` runs outside ``torchrun`` or with fewer
    tasks than processes, or the output folder already holds one of ``runs`` (its
    subfolders, ``""`` for the folder itself) while neither ``--resume`` into it nor
    ``--overwrite`` was given: a new run never replaces an earlier one silently."""
    check_ranges(parser, args, minimum=_RUN_MINIMUM, positive=("meta_lr",))
    if args.cg_damping < 0:
        parser.error(f"--cg-damping must be 0 or more, got {args.cg_damping}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} given but CUDA is not available on this machine")
    if hasattr(args, "distributed"):   # under torchrun a run is data-parallel, with or without the flag
        if args.distributed and not launched_in_parallel():
            parser.error(f"--distributed needs the torchrun environment: torchrun --nproc_per_node N {parser.prog} ...")
        args.distributed = launched_in_parallel()   # torchrun, or srun with several tasks
        if args.distributed and args.meta_batch < launch_world_size():
            parser.error(f"--meta-batch {args.meta_batch} is smaller than the {launch_world_size()} processes")
    args.out = args.out or args.resume or default_out
    continues = args.resume is not None and Path(args.resume).resolve() == Path(args.out).resolve()
    held = [run for run in runs if holds_run(Path(args.out) / run)]
    if held and not (continues or args.overwrite):
        which = f" of {', '.join(held)}" if any(held) else ""
        parser.error(f"{args.out} already holds a run{which}: continue it with --resume {args.out} "
                     f"or replace it with --overwrite")


#: image-data options that may differ between a run and its resumption (where the files are, how they are read)
IMAGE_DATA_MAY_CHANGE = ("data_root", "format", "workers", "split_file")


def add_image_data_options(parser) -> None:
    """Add the options of :func:`load_image_data` to ``parser`` (or a group): ``--dataset
    --data-root --format --fixture --fixture-kind --image-size --rotations --split-sizes
    --split-file --data-seed --workers``; :func:`check_image_data_options` checks them."""
    add = parser.add_argument
    add("--dataset", default="miniimagenet", choices=DATASETS)
    add("--data-root", default=None, help="dataset folder (not needed with --fixture)")
    add("--format", default="auto", choices=("auto", "pickle", "csv", "folder"),
        help="miniImageNet file layout (default: detected)")
    add("--fixture", action="store_true",
        help="write a synthetic dataset (in --format, pickle for auto) to a temporary folder and use it")
    add("--fixture-kind", default="stripes", choices=FIXTURE_KINDS,
        help="miniImageNet --fixture: tiny stripes (a smoke test) or the stroke-character benchmark")
    add("--image-size", type=int, default=None,
        help="resize images to this side once after loading (default: 84 miniImageNet, 28 Omniglot)")
    add("--rotations", action=argparse.BooleanOptionalAction, default=True,
        help="Omniglot: characters rotated by 90/180/270 degrees are new classes")
    add("--split-sizes", default="1100,100",
        help="Omniglot train,val characters (counts, or fractions such as 0.6,0.2); test is the rest")
    add("--split-file", default=None, help="Omniglot class split file (default DATA_ROOT/ibaml_split.json)")
    add("--data-seed", type=int, default=0,
        help="seed of the generated fixture and of a random class split, apart from --seed (the training's)")
    add("--workers", type=int, default=4, help="threads decoding image files")


def check_image_data_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop with ``parser.error`` on image-data options that cannot work together."""
    check_ranges(parser, args, minimum={"image_size": 1, "workers": 0})
    if args.fixture_kind != "stripes" and args.dataset != "miniimagenet":
        parser.error(f"--fixture-kind {args.fixture_kind} is a miniImageNet layout; it does not apply to "
                     f"--dataset {args.dataset}")
    if not args.fixture and args.data_root is None:
        parser.error("--data-root DIR is required (or --fixture for a synthetic smoke run)")
    try:
        parse_split_sizes(args.split_sizes)
    except ValueError as exc:
        parser.error(str(exc))


def load_image_data(args: argparse.Namespace, device=None) -> dict:
    """``{"train", "val", "test"}`` → :class:`ibaml.data.ImageClassDataset` (``uint8`` on
    ``device``) as the options of :func:`add_image_data_options` (and ``ways``, ``shots``,
    ``query``) ask, from ``--data-seed``: :func:`ibaml.data.load_splits` of ``--data-root``, or of a fixture
    (:func:`ibaml.data.write_fixture`, Omniglot characters split half / quarter / quarter)
    written to a temporary folder that is gone when this returns."""
    with tempfile.TemporaryDirectory(prefix="ibaml-fixture-") as tmp:
        fixture_format = "pickle" if args.format == "auto" else args.format
        root = write_fixture(tmp, args.dataset, ways=args.ways, shots=args.shots, query=args.query,
                             format=fixture_format, kind=args.fixture_kind, rotations=args.rotations,
                             seed=args.data_seed) if args.fixture else Path(args.data_root)
        return load_splits(root, args.dataset, format=args.format, image_size=args.image_size,
                           rotations=args.rotations, split_file=args.split_file, seed=args.data_seed, device=device,
                           split_sizes=(0.5, 0.25) if args.fixture else parse_split_sizes(args.split_sizes),
                           num_workers=args.workers)


def parse_resumable(parser: argparse.ArgumentParser, argv: Sequence[str] | None, may_change: Iterable[str]):
    """``(args, checkpoint)``: ``argv`` parsed; with ``--resume DIR`` where ``DIR/last.pt``
    exists, that checkpoint is read (``checkpoint``, else ``None``), the options given that are
    not in ``may_change`` must equal its saved configuration
    (:class:`ibaml.train.checkpoint.CheckpointError` otherwise), and the options not given take their
    saved values (:func:`merge_saved_options`)."""
    args = parser.parse_args(argv)
    if args.resume is None or not (Path(args.resume) / LAST).is_file():
        return args, None
    given, may_change = given_options(parser, argv), set(may_change)
    checkpoint = load_checkpoint(Path(args.resume) / LAST, config={k: v for k, v in given.items() if k not in may_change},
                                 map_location="cpu")
    return merge_saved_options(args, checkpoint.get("config", {}), given), checkpoint


@contextlib.contextmanager
def exit_on(*errors: type):
    """Within the block, an exception of one of the ``errors`` types (a bad dataset file, a
    checkpoint of another run, ...) ends the program with its message as one line on stderr,
    ``error: ...``, and exit status 2, as argparse reports a bad option; others propagate."""
    try:
        yield
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


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

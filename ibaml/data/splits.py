"""The train, validation and test classes of an image dataset for a run: read from disk
(:func:`load_splits`), or written first as a synthetic fixture sized for the tasks
(:func:`write_fixture`), so that a script can run end to end without the real data.

Example
-------
>>> import tempfile, torch
>>> with tempfile.TemporaryDirectory() as tmp:
...     root = write_fixture(tmp, "miniimagenet", ways=3, shots=1, query=2)
...     splits = load_splits(root, "miniimagenet", image_size=32)
>>> {s: d.num_classes for s, d in splits.items()}, splits["train"].image_shape
({'train': 6, 'val': 3, 'test': 3}, (3, 32, 32))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Union


from .episodes import ImageClassDataset
from .fixtures import write_miniimagenet_fixture, write_omniglot_fixture, write_stroke_fixture
from .miniimagenet import load_miniimagenet_splits
from .omniglot import load_omniglot

__all__ = ["DATASETS", "NATIVE_SIZE", "FIXTURE_KINDS", "write_fixture", "load_splits"]

#: the datasets :func:`load_splits` reads, each with the side of its images as published
NATIVE_SIZE = {"miniimagenet": 84, "omniglot": 28}
DATASETS = tuple(NATIVE_SIZE)
#: miniImageNet fixtures: ``"stripes"`` (tiny and easy, a smoke test) or ``"strokes"`` (the
#: procedural character benchmark of :func:`ibaml.data.fixtures.write_stroke_fixture`)
FIXTURE_KINDS = ("stripes", "strokes")


def _check_dataset(dataset: str) -> None:
    if dataset not in NATIVE_SIZE:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def write_fixture(root: Union[str, Path], dataset: str = "miniimagenet", *, ways: int, shots: int, query: int,
                  format: str = "pickle", kind: str = "stripes", rotations: bool = True, seed: int = 0) -> Path:
    """Write a synthetic ``dataset`` under ``root`` with enough classes and images per class for
    ``ways``-way tasks of ``shots + query`` images per class (at least 5), and return its folder.

    miniImageNet (in ``format``, ``"pickle"``, ``"csv"`` or ``"folder"``): ``kind="stripes"``
    writes ``(max(6, 2·ways), max(3, ways), max(3, ways))`` classes, ``kind="strokes"`` the
    64 / 16 / 20 classes of the stroke benchmark with at least 30 images each. Omniglot: two
    alphabets of at least 12 characters in all, enough for ``ways`` classes among a quarter of
    them (``rotations`` counts each rotation as a class)."""
    _check_dataset(dataset)
    if kind not in FIXTURE_KINDS:
        raise ValueError(f"kind must be one of {FIXTURE_KINDS}, got {kind!r}")
    per_class = max(5, shots + query)
    if dataset == "omniglot":
        if kind != "stripes":
            raise ValueError(f"kind={kind!r} is a miniImageNet fixture; Omniglot has one kind, 'stripes'")
        need = math.ceil(ways / 4) if rotations else ways
        chars = max(12, 4 * need)
        return write_omniglot_fixture(root, n_alphabets=2, chars_per_alphabet=math.ceil(chars / 2),
                                      images_per_char=per_class, seed=seed)
    if kind == "strokes":
        return write_stroke_fixture(root, format, images_per_class=max(30, per_class), seed=seed)
    classes = (max(6, 2 * ways), max(3, ways), max(3, ways))
    return write_miniimagenet_fixture(root, format, classes, per_class, seed=seed)


def load_splits(root: Union[str, Path], dataset: str = "miniimagenet", *, format: str = "auto",
                image_size: Optional[int] = None, rotations: bool = True, split_file=None,
                split_sizes: Sequence = (1100, 100), seed: int = 0, device=None,
                num_workers: int = 0) -> Dict[str, ImageClassDataset]:
    """``{"train", "val", "test"}`` → :class:`ImageClassDataset` (``uint8`` images on ``device``)
    of ``dataset`` at ``root``.

    miniImageNet is read in ``format`` (``"auto"`` detects it,
    :func:`ibaml.data.load_miniimagenet_splits`) and resized to ``image_size`` if given;
    Omniglot (:func:`ibaml.data.load_omniglot`) is read at ``image_size`` (default 28) with
    ``rotations``, ``split_file``, ``split_sizes`` and ``seed`` deciding its class split."""
    _check_dataset(dataset)
    if dataset == "omniglot":
        return {s: load_omniglot(root, s, rotations=rotations, image_size=image_size or NATIVE_SIZE["omniglot"],
                                 split_file=split_file, split_sizes=split_sizes, seed=seed, device=device,
                                 num_workers=num_workers)
                for s in ("train", "val", "test")}
    splits = load_miniimagenet_splits(root, format=format, device=device, num_workers=num_workers)
    return {s: d.resized(image_size) for s, d in splits.items()} if image_size else splits

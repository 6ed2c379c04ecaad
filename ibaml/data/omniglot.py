"""Omniglot loader: ``<root>/images_background/<alphabet>/<character>/*.png`` and
``<root>/images_evaluation/...`` (either or both), every character a class.

The characters of both folders are pooled and split into train / val / test classes by a
seeded permutation (by default 1100 / 100 / the rest). The split is written to a JSON file
(default ``<root>/ibaml_split.json``) the first time and read back afterwards, so every run
sees the same classes; delete the file to draw a new split. Images are converted to
grayscale and resized to ``image_size × image_size`` (Lanczos), stored ``uint8 [N, 1, H, W]``.
With ``rotations=True`` every character also appears rotated by 90°, 180° and 270°, each
rotation its own class (rotations are taken after the split, so they stay in the same split).

Example
-------
>>> from ibaml.data.fixtures import write_omniglot_fixture
>>> import tempfile
>>> root = write_omniglot_fixture(tempfile.mkdtemp())
>>> data = load_omniglot(root, "train", split_sizes=(0.5, 0.25), rotations=True)
>>> data.images.shape, data.num_classes
(torch.Size([96, 1, 28, 28]), 24)
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .episodes import DatasetError, ImageClassDataset
from .image_files import read_images

BACKGROUND, EVALUATION = "images_background", "images_evaluation"
SPLIT_FILE = "ibaml_split.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
           "test": "test"}


def list_characters(root: Union[str, Path]) -> Dict[str, List[Path]]:
    """``"<folder>/<alphabet>/<character>"`` → sorted image files, for every character folder
    under ``images_background`` and ``images_evaluation`` (sorted by key).

    Example
    -------
    >>> list(list_characters(omniglot_root))[:1]   # on the full set: 'images_background/Alphabet_of_the_Magi/character01'
    ['images_background/Alphabet_01/character01']
    """
    root = Path(root)
    folders = [root / f for f in (BACKGROUND, EVALUATION) if (root / f).is_dir()]
    if not folders:
        raise DatasetError(f"Omniglot: no {BACKGROUND}/ or {EVALUATION}/ folder under {root}")
    chars: Dict[str, List[Path]] = {}
    for folder in folders:
        for alphabet in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for char in sorted(d for d in alphabet.iterdir() if d.is_dir() and not d.name.startswith(".")):
                files = sorted(p for p in char.iterdir() if p.is_file() and not p.name.startswith(".")
                               and p.suffix.lower() in IMAGE_EXTENSIONS)
                if not files:
                    raise DatasetError(f"Omniglot: {char}: no image files")
                chars[f"{folder.name}/{alphabet.name}/{char.name}"] = files
    if not chars:
        raise DatasetError(f"Omniglot: no <alphabet>/<character>/ folders under {', '.join(map(str, folders))}")
    return chars


def _sizes(split_sizes: Sequence, total: int) -> Tuple[int, int]:
    if len(split_sizes) not in (2, 3):
        raise ValueError(f"split_sizes must be (train, val) or (train, val, test), got {split_sizes!r}")
    n_train, n_val = split_sizes[0], split_sizes[1]
    fractions = [isinstance(v, float) for v in split_sizes[:2]]
    if all(fractions):
        if not (0 < n_train and 0 <= n_val and n_train + n_val < 1):
            raise ValueError(f"split fractions (train, val) must be positive and sum below 1, got {split_sizes!r}")
        n_train, n_val = max(1, round(n_train * total)), round(n_val * total)
    elif any(fractions) or not all(isinstance(v, int) for v in (n_train, n_val)):
        raise ValueError(f"split_sizes must be two counts (ints) or two fractions (floats), got {split_sizes!r}")
    if n_train < 1 or n_val < 0 or n_train + n_val >= total:
        raise DatasetError(f"Omniglot: split_sizes {tuple(split_sizes)} leave no test characters out of {total} "
                           "on disk (pass fractions, e.g. split_sizes=(0.6, 0.2), for small datasets)")
    return n_train, n_val


def parse_split_sizes(text: str) -> Tuple:
    """A command-line split ``"train,val"`` as :func:`load_omniglot` takes it: two counts or two
    fractions in ``(0, 1)``; anything else raises ``ValueError``.

    Example
    -------
    >>> parse_split_sizes("1100,100"), parse_split_sizes("0.6,0.2")
    ((1100, 100), (0.6, 0.2))
    """
    parts = [s.strip() for s in str(text).split(",")]
    if len(parts) == 2 and all(s.isdigit() for s in parts):
        return tuple(int(s) for s in parts)
    try:
        values = tuple(float(s) for s in parts)
    except ValueError:
        values = ()
    if len(values) != 2 or not all(0 < v < 1 for v in values):
        raise ValueError(f"--split-sizes must be two counts (1100,100) or two fractions (0.6,0.2), got {text!r}")
    return values


def make_split(characters: Sequence[str], split_sizes: Sequence = (1100, 100), seed: int = 0) -> Dict[str, List[str]]:
    """A seeded train / val / test partition of ``characters``: a ``torch.randperm`` with
    ``seed`` over the sorted names, cut at ``split_sizes`` (counts, or fractions of the total).

    Example
    -------
    >>> s = make_split([f"c{i}" for i in range(10)], (0.6, 0.2))
    >>> [len(s[k]) for k in ("train", "val", "test")]
    [6, 2, 2]
    """
    names = sorted(characters)
    n_train, n_val = _sizes(split_sizes, len(names))
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(int(seed))).tolist()
    shuffled = [names[i] for i in order]
    return {"train": sorted(shuffled[:n_train]), "val": sorted(shuffled[n_train:n_train + n_val]),
            "test": sorted(shuffled[n_train + n_val:])}


def _write_json_atomic(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def omniglot_split(root: Union[str, Path], split_file: Optional[Union[str, Path]] = None,
                   split_sizes: Sequence = (1100, 100), seed: int = 0) -> Dict[str, List[str]]:
    """The class split of the Omniglot characters under ``root``: read from ``split_file``
    (default ``<root>/ibaml_split.json``) if it exists, otherwise drawn with
    :func:`make_split` and written there (atomically). A stored split that names characters
    missing on disk raises :class:`DatasetError`; one drawn with other ``split_sizes`` /
    ``seed`` than requested is still used, with a warning.

    Example
    -------
    On the full set the default ``split_sizes=(1100, 100)`` gives 1100 / 100 / 423 characters;
    ``omniglot_root`` is a small synthetic copy of 12 characters, split by fractions:

    >>> split = omniglot_split(omniglot_root, split_sizes=(0.5, 0.25))
    >>> {s: len(chars) for s, chars in split.items()}
    {'train': 6, 'val': 3, 'test': 3}
    """
    root = Path(root)
    path = Path(split_file) if split_file is not None else root / SPLIT_FILE
    on_disk = list_characters(root)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            split = {k: list(map(str, stored[k])) for k in ("train", "val", "test")}
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"Omniglot: split file {path}: unreadable ({' '.join(str(exc).split())}); "
                               "delete it to draw a new split") from None
        missing = [c for k in split for c in split[k] if c not in on_disk]
        if missing:
            raise DatasetError(f"Omniglot: split file {path} lists {len(missing)} characters not under {root} "
                               f"(first: {missing[0]}); delete it to draw a new split")
        if stored.get("seed") != seed or stored.get("split_sizes") != list(split_sizes):
            warnings.warn(f"Omniglot: using the split stored in {path} (seed={stored.get('seed')}, "
                          f"split_sizes={stored.get('split_sizes')}), not seed={seed}, split_sizes={list(split_sizes)}",
                          stacklevel=2)
        return split
    split = make_split(list(on_disk), split_sizes, seed)
    try:
        _write_json_atomic(path, {"seed": seed, "split_sizes": list(split_sizes), **split})
    except OSError as exc:
        raise DatasetError(f"Omniglot: cannot write split file {path} ({exc.strerror}); pass split_file= "
                           "a writable path") from None
    return split


def load_omniglot(root: Union[str, Path], split: str = "train", rotations: bool = False,
                  image_size: int = 28, split_file: Optional[Union[str, Path]] = None,
                  split_sizes: Sequence = (1100, 100), seed: int = 0,
                  device: Optional[Union[str, torch.device]] = None, num_workers: int = 0) -> ImageClassDataset:
    """Load the characters of one Omniglot split as an :class:`ImageClassDataset`
    (``images uint8 [N, 1, image_size, image_size]``).

    Args:
        root: folder holding ``images_background/`` and/or ``images_evaluation/``.
        split: ``"train"``, ``"val"`` (or ``"validation"``) or ``"test"``.
        rotations: add each character rotated by 90°, 180°, 270° as three more classes
            (class ``k + r·K`` is class ``k`` rotated by ``r·90°``; names end in ``"/rot90"``…).
        image_size: side of the resized grayscale images.
        split_file, split_sizes, seed: see :func:`omniglot_split` (``split_sizes`` are
            ``(train, val)`` counts, or fractions such as ``(0.6, 0.2)``; test is the rest).
        device: where to keep the images (still ``uint8``).
        num_workers: threads decoding image files.

    Example
    -------
    On the full set (``split_sizes=(1100, 100)``) the training split has 1100 characters, 4400
    classes with rotations; on the small synthetic copy ``omniglot_root``:

    >>> train = load_omniglot(omniglot_root, "train", rotations=True, split_sizes=(0.5, 0.25))
    >>> train.num_classes, train.images.shape
    (24, torch.Size([120, 1, 28, 28]))
    """
    key = str(split).lower()
    if key not in _SPLITS:
        raise ValueError(f"split must be 'train', 'val' (or 'validation') or 'test', got {split!r}")
    split = _SPLITS[key]
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    root = Path(root)
    chars = omniglot_split(root, split_file=split_file, split_sizes=split_sizes, seed=seed)[split]
    if not chars:
        raise DatasetError(f"Omniglot: the {split} split has no characters")
    on_disk = list_characters(root)
    files: List[Path] = []
    labels: List[int] = []
    for k, c in enumerate(chars):
        files += on_disk[c]
        labels += [k] * len(on_disk[c])
    images = read_images(files, "L", resize=(image_size, image_size), what="Omniglot: image",
                         num_workers=num_workers)
    labels_t = torch.tensor(labels, dtype=torch.long)
    names = list(chars)
    if rotations:
        K = len(chars)
        images = torch.cat([torch.rot90(images, r, dims=(2, 3)) for r in range(4)])
        labels_t = torch.cat([labels_t + r * K for r in range(4)])
        names = names + [f"{c}/rot{90 * r}" for r in (1, 2, 3) for c in chars]
    return ImageClassDataset(images, labels_t, names, name=f"Omniglot/{split}", device=device)


__all__ = ["load_omniglot", "omniglot_split", "make_split", "parse_split_sizes", "list_characters", "SPLIT_FILE"]

"""Small synthetic datasets written in the real miniImageNet and Omniglot file layouts, for
tests, examples and notebooks (no download needed).

Images depend on their class, so a classifier can learn something: a miniImageNet class has
its own colour and stripe pattern (orientation and frequency) plus per-image noise and shift;
an Omniglot character is a fixed set of strokes drawn with per-image jitter.

Example
-------
>>> import tempfile
>>> from ibaml.data import load_miniimagenet
>>> root = write_miniimagenet_fixture(tempfile.mkdtemp(), "csv", n_classes_per_split=(4, 2, 2))
>>> load_miniimagenet(root, "train").num_classes
4
"""

from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path
from typing import Sequence, Union

import numpy as np

SIZE = 84


def _class_image(rng: np.random.Generator, class_id: int, size: int = SIZE) -> np.ndarray:
    """One ``uint8 [size, size, 3]`` image of class ``class_id``."""
    style = np.random.default_rng(10_000 + class_id)
    colour = style.uniform(40, 215, size=3)
    angle = style.uniform(0, math.pi)
    freq = style.uniform(0.08, 0.4)
    contrast = style.uniform(30, 70)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    phase = rng.uniform(0, 2 * math.pi)
    wave = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    img = colour[None, None, :] + contrast * wave[:, :, None] + rng.normal(0, 12, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_miniimagenet_fixture(root: Union[str, Path], format: str, n_classes_per_split: Sequence[int] = (6, 3, 3),
                               images_per_class: int = 5, seed: int = 0) -> Path:
    """Write a tiny miniImageNet in ``format`` (``"pickle"``, ``"csv"`` or ``"folder"``) under
    ``root`` and return ``root``; ``n_classes_per_split`` classes for train / val / test, each
    with ``images_per_class`` 84×84 RGB images. Class names look like ImageNet ids
    (``n9000000k``); csv files point at JPEGs in ``images/``, folders hold PNGs.

    Example
    -------
    >>> import tempfile
    >>> root = write_miniimagenet_fixture(tempfile.mkdtemp(), "folder")
    >>> sorted(p.name for p in root.iterdir())
    ['test', 'train', 'val']
    """
    from PIL import Image

    if format not in ("pickle", "csv", "folder"):
        raise ValueError(f"format must be 'pickle', 'csv' or 'folder', got {format!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    first = 0
    for split, n_classes, pkl_name in zip(("train", "val", "test"), n_classes_per_split,
                                         ("train", "validation", "test")):
        names = [f"n{90000000 + first + k:08d}" for k in range(n_classes)]
        images = {name: [_class_image(rng, first + k) for _ in range(images_per_class)]
                  for k, name in enumerate(names)}
        first += n_classes
        if format == "pickle":
            data = np.stack([im for name in names for im in images[name]])
            class_dict = {name: list(range(k * images_per_class, (k + 1) * images_per_class))
                          for k, name in enumerate(names)}
            with open(root / f"mini-imagenet-cache-{pkl_name}.pkl", "wb") as f:
                pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=pickle.HIGHEST_PROTOCOL)
        elif format == "csv":
            (root / "images").mkdir(exist_ok=True)
            with open(root / f"{split}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["filename", "label"])
                for name in names:
                    for i, im in enumerate(images[name]):
                        filename = f"{name}{i + 1:08d}.jpg"
                        Image.fromarray(im).save(root / "images" / filename, quality=95)
                        writer.writerow([filename, name])
        else:
            for name in names:
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i, im in enumerate(images[name]):
                    Image.fromarray(im).save(folder / f"{name}_{i + 1:04d}.png")
    return root


def _character_strokes(char_id: int):
    style = np.random.default_rng(20_000 + char_id)
    n = int(style.integers(2, 5))
    return [style.uniform(15, 90, size=(int(style.integers(2, 4)), 2)) for _ in range(n)]


def write_omniglot_fixture(root: Union[str, Path], n_alphabets: int = 2, chars_per_alphabet: int = 6,
                           images_per_char: int = 4, seed: int = 0) -> Path:
    """Write a tiny Omniglot under ``root`` and return ``root``: ``n_alphabets`` alphabets
    (the first half in ``images_background/``, the rest in ``images_evaluation/``), each with
    ``chars_per_alphabet`` characters of ``images_per_char`` 105×105 black-on-white PNGs.

    Example
    -------
    >>> import tempfile
    >>> root = write_omniglot_fixture(tempfile.mkdtemp())
    >>> len(list(root.glob("images_*/*/*/*.png")))
    48
    """
    from PIL import Image, ImageDraw

    root = Path(root)
    rng = np.random.default_rng(seed)
    n_background = max(1, math.ceil(n_alphabets / 2)) if n_alphabets > 1 else 1
    char_id = 0
    for a in range(n_alphabets):
        folder = root / ("images_background" if a < n_background else "images_evaluation") / f"Alphabet_{a + 1:02d}"
        for c in range(chars_per_alphabet):
            strokes = _character_strokes(char_id)
            char_dir = folder / f"character{c + 1:02d}"
            char_dir.mkdir(parents=True, exist_ok=True)
            for i in range(images_per_char):
                img = Image.new("L", (105, 105), 255)
                draw = ImageDraw.Draw(img)
                shift = rng.normal(0, 2.0, size=2)
                for stroke in strokes:
                    points = stroke + shift + rng.normal(0, 1.5, size=stroke.shape)
                    draw.line([tuple(p) for p in points], fill=0, width=int(rng.integers(3, 6)))
                img.convert("1").save(char_dir / f"{char_id + 1:04d}_{i + 1:02d}.png")
            char_id += 1
    return root


__all__ = ["write_miniimagenet_fixture", "write_omniglot_fixture"]

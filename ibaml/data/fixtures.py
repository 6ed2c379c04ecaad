"""Small synthetic datasets written in the real miniImageNet and Omniglot file layouts, for
tests, examples and notebooks (no download needed).

Images depend on their class, so a classifier can learn something: a miniImageNet class has
its own colour and stripe pattern (orientation and frequency) plus per-image noise and shift;
an Omniglot character is a fixed set of strokes drawn with per-image jitter. Both are easy.
:func:`write_stroke_fixture` writes a harder few-shot benchmark in the miniImageNet layouts
(64 / 16 / 20 classes of stroke characters under random affine distortions, random colours and
noise) that a Conv4 learns slowly, to compare methods without a download.

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
SPLITS = ("train", "val", "test")
_PICKLE_NAMES = {"train": "train", "val": "validation", "test": "test"}


def _check_format(format: str) -> None:
    if format not in ("pickle", "csv", "folder"):
        raise ValueError(f"format must be 'pickle', 'csv' or 'folder', got {format!r}")


def _write_split(root: Path, format: str, split: str, images: dict) -> None:
    """Write one split (``images``: class name → list of ``uint8 [84, 84, 3]`` arrays, every
    class with the same count) in a miniImageNet layout: ``mini-imagenet-cache-<split>.pkl``;
    ``<split>.csv`` naming JPEGs in ``images/``; or PNGs in ``<split>/<class>/``."""
    from PIL import Image

    names = list(images)
    if format == "pickle":
        data = np.stack([im for name in names for im in images[name]])
        class_dict, start = {}, 0
        for name in names:
            class_dict[name] = list(range(start, start + len(images[name])))
            start += len(images[name])
        with open(root / f"mini-imagenet-cache-{_PICKLE_NAMES[split]}.pkl", "wb") as f:
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
    _check_format(format)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    first = 0
    for split, n_classes in zip(SPLITS, n_classes_per_split):
        names = [f"n{90000000 + first + k:08d}" for k in range(n_classes)]
        images = {name: [_class_image(rng, first + k) for _ in range(images_per_class)]
                  for k, name in enumerate(names)}
        first += n_classes
        _write_split(root, format, split, images)
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


# ---------------------------------------------------------------------------------- strokes
def _bezier_matrix(n: int) -> np.ndarray:
    """``[n, 4]`` cubic Bernstein weights at ``n`` evenly spaced parameters in ``[0, 1]``."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    return np.hstack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3])


_BEZIER = _bezier_matrix(16)


def _random_strokes(rng: np.random.Generator, n: int, extent: float) -> np.ndarray:
    """``[n, 4, 2]`` cubic Bezier control points in the character frame ``[-1, 1]²``: each
    stroke starts anywhere within ``extent`` and walks to its next control points by steps of
    random direction, so that strokes are arcs, hooks, loops and near-straight bars."""
    pts = np.empty((n, 4, 2))
    pts[:, 0] = rng.uniform(-extent, extent, size=(n, 2))
    heading = rng.uniform(0, 2 * math.pi, size=n)
    for j in range(1, 4):
        heading = heading + rng.normal(0, 1.0, size=n)
        step = rng.uniform(0.25, 0.7, size=n)
        pts[:, j] = np.clip(pts[:, j - 1] + step[:, None] * np.stack([np.cos(heading), np.sin(heading)], 1),
                            -extent, extent)
    return pts


def _stroke_image(rng: np.random.Generator, strokes: np.ndarray, knobs: dict, size: int = SIZE,
                  supersample: int = 2) -> np.ndarray:
    """One ``uint8 [size, size, 3]`` drawing of the character ``strokes`` (``[n, 4, 2]``) with
    this image's own jitter, affine distortion, thickness, clutter, colours and noise."""
    from PIL import Image, ImageDraw

    pts = strokes + rng.normal(0, knobs["point_jitter"], size=strokes.shape)
    n_clutter = int(rng.integers(knobs["clutter"][0], knobs["clutter"][1] + 1))
    if n_clutter:
        pts = np.concatenate([pts, _random_strokes(rng, n_clutter, 0.9)])
    angle = math.radians(rng.uniform(-knobs["rotation"], knobs["rotation"]))
    scale = rng.uniform(*knobs["scale"]) * np.exp(rng.normal(0, knobs["aspect"], size=2) * [1, -1])
    shear = rng.uniform(-knobs["shear"], knobs["shear"])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    affine = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(scale)
    shift = rng.uniform(-knobs["translation"], knobs["translation"], size=2)
    pts = pts @ affine.T + shift  # a Bezier curve's affine image is the curve of the mapped control points

    big = size * supersample
    half = big / 2.0
    curves = np.einsum("tk,skd->std", _BEZIER, pts) * (0.42 * big) + half
    widths = np.rint(rng.uniform(*knobs["thickness"], size=len(curves)) * supersample).astype(int)
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for curve, width in zip(curves.tolist(), widths.tolist()):
        draw.line([tuple(p) for p in curve], fill=255, width=max(1, width), joint="curve")
    mask = np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32)[:, :, None] * np.float32(1 / 255)

    lo, hi = knobs["contrast"]
    background = rng.uniform(0, 255, size=3)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-12
    foreground = background + rng.uniform(lo, hi) * math.sqrt(3) * direction
    foreground = np.where((foreground < 0) | (foreground > 255), 2 * background - foreground, foreground)
    noise = rng.standard_normal(size=(size, size, 3), dtype=np.float32) * np.float32(knobs["noise"])
    img = (background + mask * (foreground - background)).astype(np.float32) + noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_stroke_fixture(root: Union[str, Path], format: str = "pickle",
                         n_classes_per_split: Sequence[int] = (64, 16, 20), images_per_class: int = 30,
                         seed: int = 0, strokes: Sequence[int] = (2, 5), point_jitter: float = 0.08,
                         rotation: float = 20.0, scale: Sequence[float] = (0.75, 1.15), aspect: float = 0.1,
                         shear: float = 0.25, translation: float = 0.15, thickness: Sequence[float] = (2.0, 6.0),
                         clutter: Sequence[int] = (0, 1), contrast: Sequence[float] = (50.0, 150.0),
                         noise: float = 12.0) -> Path:
    """Write a procedurally generated few-shot benchmark in a miniImageNet layout (``format``:
    ``"pickle"``, ``"csv"`` or ``"folder"``, as :func:`write_miniimagenet_fixture`) under
    ``root`` and return ``root``: ``n_classes_per_split`` classes for train / val / test,
    each with ``images_per_class`` 84×84 RGB images. Class names are ``n8xxxxxxx`` ids.

    The classes are Omniglot-like characters, so that only the shape tells them apart:

    1. *Character.* Class ``c`` is ``strokes[0]``–``strokes[1]`` (inclusive) cubic Bezier
       strokes, drawn from a generator seeded with ``(seed, c)``: each stroke starts at a
       uniform point of the character frame ``[-0.8, 0.8]²`` and its three further control
       points follow by steps of 0.25–0.7 in a direction that turns by a normal(0, 1 rad)
       angle per step (arcs, hooks, loops, bars).
    2. *Instance.* Every image moves each control point by normal noise of standard deviation
       ``point_jitter`` (frame units; the frame's half-width is 1), adds ``clutter[0]``–
       ``clutter[1]`` random strokes that belong to no class, and maps all points by one
       random affine map: rotation uniform in ``±rotation`` degrees, shear uniform in
       ``±shear``, scale uniform in ``scale`` times a per-axis factor ``exp(±normal(0,
       aspect))``, translation uniform in ``±translation`` (frame units). Each stroke's width
       is uniform in ``thickness`` pixels (of the 84-pixel image).
    3. *Rendering.* Strokes are drawn at twice the resolution and box-filtered down to 84×84
       (anti-aliased); background and ink are random RGB colours ``contrast`` apart (a
       uniform distance in ``contrast``, per image), and every pixel gets normal noise of
       standard deviation ``noise``. Colour thus carries no class information.

    Everything is drawn from generators seeded by ``seed`` and the class index, so the same
    arguments give the same files, and a class's character does not depend on how many
    images or other classes are written. The defaults (64 / 16 / 20 classes of 30 images)
    take a few seconds to write as pickle and are calibrated so that a Conv4 learns them
    slowly: see ``docs/results/image_benchmark/``. Larger ``point_jitter``, ``rotation``,
    ``shear``, ``translation`` or ``clutter`` and smaller ``contrast`` make it harder.

    Example
    -------
    >>> import tempfile
    >>> from ibaml.data import load_miniimagenet
    >>> root = write_stroke_fixture(tempfile.mkdtemp(), "pickle", (5, 2, 2), images_per_class=4, seed=1)
    >>> test = load_miniimagenet(root, "test")
    >>> test.num_classes, tuple(test.images.shape)
    (2, (8, 3, 84, 84))
    """
    _check_format(format)
    if len(n_classes_per_split) != 3 or min(n_classes_per_split) < 1:
        raise ValueError(f"n_classes_per_split must be three positive counts, got {tuple(n_classes_per_split)}")
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be at least 1, got {images_per_class}")
    if not 1 <= strokes[0] <= strokes[1]:
        raise ValueError(f"strokes must be (min, max) with 1 <= min <= max, got {tuple(strokes)}")
    if not 0 <= clutter[0] <= clutter[1]:
        raise ValueError(f"clutter must be (min, max) with 0 <= min <= max, got {tuple(clutter)}")
    knobs = {"point_jitter": float(point_jitter), "rotation": float(rotation), "scale": tuple(scale),
             "aspect": float(aspect), "shear": float(shear), "translation": float(translation),
             "thickness": tuple(thickness), "clutter": (int(clutter[0]), int(clutter[1])),
             "contrast": tuple(contrast), "noise": float(noise)}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    first = 0
    for split, n_classes in zip(SPLITS, n_classes_per_split):
        images = {}
        for c in range(first, first + n_classes):
            style = np.random.default_rng([seed, 1, c])
            character = _random_strokes(style, int(style.integers(strokes[0], strokes[1] + 1)), 0.8)
            rng = np.random.default_rng([seed, 2, c])
            images[f"n{80000000 + c:08d}"] = [_stroke_image(rng, character, knobs) for _ in range(images_per_class)]
        first += n_classes
        _write_split(root, format, split, images)
    return root


__all__ = ["write_miniimagenet_fixture", "write_omniglot_fixture", "write_stroke_fixture"]

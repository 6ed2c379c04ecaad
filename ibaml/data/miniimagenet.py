"""miniImageNet loaders (the Ravi & Larochelle split: 64 / 16 / 20 classes, 600 images of
84×84 RGB per class), read from local files in one of three layouts:

- ``pickle``: ``mini-imagenet-cache-{train,validation,test}.pkl``, each a dict with
  ``image_data`` (``uint8`` array ``[N, 84, 84, 3]``) and ``class_dict`` (class name → list
  of row indices). Read with a restricted unpickler that only rebuilds numpy arrays.
- ``csv``: ``{train,val,test}.csv`` with the header ``filename,label`` and an ``images/``
  folder holding the files.
- ``folder``: ``{train,val,test}/<class>/*.{jpg,jpeg,png}``.

Classes are whatever the files hold (sorted by name); nothing is downloaded.

Example
-------
``miniimagenet_root`` is a folder in any of the three layouts; on the full set the training
split holds ``torch.Size([38400, 3, 84, 84])``, 64 classes (here a small synthetic copy,
:func:`ibaml.data.write_fixture`, of 6 / 3 / 3 classes with 5 images each):

>>> train = load_miniimagenet(miniimagenet_root, "train")
>>> train.images.shape, train.images.dtype, train.num_classes
(torch.Size([30, 3, 84, 84]), torch.uint8, 6)
"""

from __future__ import annotations

import csv
import io  # noqa: F401  (used by the examples)
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from .episodes import DatasetError, ImageClassDataset
from .image_files import read_images

IMAGE_SIZE = 84
FORMATS = ("pickle", "csv", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
           "test": "test"}
_PICKLE_NAMES = {"train": "train", "val": "validation", "test": "test"}


def _split_name(split: str) -> str:
    key = str(split).lower()
    if key not in _SPLITS:
        raise ValueError(f"split must be 'train', 'val' (or 'validation') or 'test', got {split!r}")
    return _SPLITS[key]


def pickle_path(root: Union[str, Path], split: str) -> Path:
    """``<root>/mini-imagenet-cache-{train,validation,test}.pkl``."""
    return Path(root) / f"mini-imagenet-cache-{_PICKLE_NAMES[_split_name(split)]}.pkl"


def detect_format(root: Union[str, Path]) -> str:
    """The layout of the miniImageNet files under ``root``: ``"pickle"``, ``"csv"`` or
    ``"folder"`` (checked in that order); :class:`DatasetError` if none is found.

    Example
    -------
    >>> detect_format(miniimagenet_root)
    'folder'
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"miniImageNet: root {root} is not a directory")
    if any(pickle_path(root, s).is_file() for s in ("train", "val", "test")):
        return "pickle"
    if any((root / f"{s}.csv").is_file() for s in ("train", "val", "test")):
        return "csv"
    if any((root / s).is_dir() for s in ("train", "val", "validation", "test")):
        return "folder"
    raise DatasetError(f"miniImageNet: no dataset under {root} (looked for mini-imagenet-cache-*.pkl, "
                       "{train,val,test}.csv with images/, or {train,val,test}/<class>/ folders)")


# ---------------------------------------------------------------------------------- pickle
def _numpy_globals() -> Dict[tuple, object]:
    import numpy as np

    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    import _codecs

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               # protocol < 3 pickles store bytes as _codecs.encode(latin-1 text)
               ("_codecs", "encode"): _codecs.encode}
    # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core; protocol 5 uses _frombuffer
    for core in ("numpy.core", "numpy._core"):
        allowed[(core + ".multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(core + ".multiarray", "scalar")] = multiarray.scalar
        allowed[(core + ".numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that rebuilds numpy arrays, dicts, lists, strings and numbers
    only: any other global (``os.system``, ``builtins.eval``, …) raises
    :class:`DatasetError` ``"refusing to unpickle <module.name> from <file>"``.

    Example
    -------
    >>> import numpy as np
    >>> data = pickle.dumps({"a": np.zeros(2, np.uint8)})
    >>> RestrictedUnpickler(io.BytesIO(data)).load()["a"].tolist()
    [0, 0]
    """

    def __init__(self, file, source: str = "<bytes>", **kwargs):
        kwargs.setdefault("encoding", "latin1")
        super().__init__(file, **kwargs)
        self.source = source
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DatasetError(f"refusing to unpickle {module}.{name} from {self.source}") from None


def load_pickle(path: Union[str, Path]):
    """Load a pickle file with :class:`RestrictedUnpickler`; damaged files raise
    :class:`DatasetError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"miniImageNet: {path}: file missing")
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, source=str(path)).load()
    except DatasetError:
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise DatasetError(f"miniImageNet: {path}: not a readable pickle ({detail})") from None


def _from_pickle(root: Path, split: str, device) -> ImageClassDataset:
    import numpy as np

    path = pickle_path(root, split)
    data = load_pickle(path)
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f"miniImageNet: {path}: expected a dict with 'image_data' and 'class_dict', got {keys}")
    images, class_dict = data["image_data"], data["class_dict"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        desc = f"{images.dtype} array {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DatasetError(f"miniImageNet: {path}: image_data must be a uint8 array [N, {IMAGE_SIZE}, "
                           f"{IMAGE_SIZE}, 3], got {desc}")
    if not isinstance(class_dict, dict) or not class_dict:
        raise DatasetError(f"miniImageNet: {path}: class_dict must be a non-empty dict of class name -> indices")
    N = images.shape[0]
    names = sorted(class_dict, key=str)
    labels = torch.full((N,), -1, dtype=torch.long)
    for k, name in enumerate(names):
        try:
            rows = torch.as_tensor(np.asarray(class_dict[name], dtype=np.int64).reshape(-1))
        except (TypeError, ValueError):
            raise DatasetError(f"miniImageNet: {path}: class_dict[{name!r}] is not a list of integers") from None
        if rows.numel() == 0:
            raise DatasetError(f"miniImageNet: {path}: class {name!r} has no images")
        if int(rows.min()) < 0 or int(rows.max()) >= N:
            raise DatasetError(f"miniImageNet: {path}: class {name!r} indexes rows "
                               f"{int(rows.min())}..{int(rows.max())}, but image_data has {N} rows")
        if bool((labels[rows] >= 0).any()):
            raise DatasetError(f"miniImageNet: {path}: class {name!r} shares images with another class")
        labels[rows] = k
    pixels = torch.from_numpy(images)
    keep = labels >= 0
    if not bool(keep.all()):
        pixels, labels = pixels[keep], labels[keep]
    pixels = pixels.permute(0, 3, 1, 2).contiguous()
    return ImageClassDataset(pixels, labels, [str(n) for n in names], name=f"miniImageNet/{split}", device=device)


# ---------------------------------------------------------------------------------- csv
def _from_csv(root: Path, split: str, device, num_workers: int) -> ImageClassDataset:
    path = root / f"{split}.csv"
    if not path.is_file():
        raise DatasetError(f"miniImageNet: {path}: file missing")
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise DatasetError(f"miniImageNet: {image_dir}: image folder missing (needed by {path.name})")
    with open(path, newline="") as f:
        text = f.read()
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip().lower() for c in rows[0]] != ["filename", "label"]:
        raise DatasetError(f"miniImageNet: {path}: expected the header 'filename,label', "
                           f"got {','.join(rows[0]) if rows else 'an empty file'!r}")
    files, class_of = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(f"miniImageNet: {path}: line {line}: expected 'filename,label', got {','.join(row)!r}")
        files.append(image_dir / row[0].strip())
        class_of.append(row[1].strip())
    if not files:
        raise DatasetError(f"miniImageNet: {path}: no images listed")
    if not text.endswith(("\n", "\r")) and class_of.count(class_of[-1]) == 1 and len(set(class_of)) > 1:
        # a file cut inside its last label leaves a one-image class of a clipped name
        raise DatasetError(f"miniImageNet: {path}: line {len(rows)}: label {class_of[-1]!r} appears nowhere else and "
                           f"the file ends without a line break: it looks truncated")
    names = sorted(set(class_of))
    index = {n: k for k, n in enumerate(names)}
    labels = torch.tensor([index[c] for c in class_of], dtype=torch.long)
    images = read_images(files, "RGB", size=(IMAGE_SIZE, IMAGE_SIZE), what="miniImageNet: image",
                         num_workers=num_workers)
    return ImageClassDataset(images, labels, names, name=f"miniImageNet/{split}", device=device)


# ---------------------------------------------------------------------------------- folder
def _from_folder(root: Path, split: str, device, num_workers: int) -> ImageClassDataset:
    candidates = [root / split] + ([root / "validation"] if split == "val" else [])
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise DatasetError(f"miniImageNet: {candidates[0]}: split folder missing")
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"miniImageNet: {folder}: no class folders")
    files: List[Path] = []
    labels: List[int] = []
    for k, d in enumerate(class_dirs):
        found = sorted(p for p in d.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise DatasetError(f"miniImageNet: {d}: no .jpg/.jpeg/.png images")
        files += found
        labels += [k] * len(found)
    images = read_images(files, "RGB", size=(IMAGE_SIZE, IMAGE_SIZE), what="miniImageNet: image",
                         num_workers=num_workers)
    return ImageClassDataset(images, torch.tensor(labels), [d.name for d in class_dirs],
                             name=f"miniImageNet/{split}", device=device)


def load_miniimagenet(root: Union[str, Path], split: str = "train", format: str = "auto",
                      device: Optional[Union[str, torch.device]] = None, num_workers: int = 0) -> ImageClassDataset:
    """Load one miniImageNet split from local files as an :class:`ImageClassDataset`
    (``images uint8 [N, 3, 84, 84]``, ``labels [N]`` in ``0..K−1`` for the ``K`` classes on
    disk, sorted by name).

    Args:
        root: the dataset folder.
        split: ``"train"``, ``"val"`` (or ``"validation"``) or ``"test"``.
        format: ``"auto"`` (see :func:`detect_format`), ``"pickle"``, ``"csv"`` or ``"folder"``.
        device: where to keep the images (still ``uint8``).
        num_workers: threads decoding image files (csv and folder layouts).

    Raises:
        DatasetError: a missing, undecodable or wrongly sized file (one line naming it), or a
            pickle that refers to anything but numpy arrays.

    Example
    -------
    >>> from ibaml.data.fixtures import write_miniimagenet_fixture
    >>> import tempfile
    >>> root = write_miniimagenet_fixture(tempfile.mkdtemp(), "pickle")
    >>> load_miniimagenet(root, "val").images.shape
    torch.Size([15, 3, 84, 84])
    """
    split = _split_name(split)
    root = Path(root)
    if format == "auto":
        format = detect_format(root)
    if format == "pickle":
        return _from_pickle(root, split, device)
    if format == "csv":
        return _from_csv(root, split, device, num_workers)
    if format == "folder":
        return _from_folder(root, split, device, num_workers)
    raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")


def load_miniimagenet_splits(root: Union[str, Path], format: str = "auto",
                             device: Optional[Union[str, torch.device]] = None,
                             num_workers: int = 0) -> Dict[str, ImageClassDataset]:
    """``{"train", "val", "test"}`` → :class:`ImageClassDataset` (see :func:`load_miniimagenet`).

    Example
    -------
    >>> splits = load_miniimagenet_splits(miniimagenet_root)   # the full set: [64, 16, 20]
    >>> [splits[s].num_classes for s in ("train", "val", "test")]
    [6, 3, 3]
    """
    if format == "auto":
        format = detect_format(root)
    return {s: load_miniimagenet(root, s, format=format, device=device, num_workers=num_workers)
            for s in ("train", "val", "test")}


__all__ = ["load_miniimagenet", "load_miniimagenet_splits", "detect_format", "RestrictedUnpickler", "load_pickle",
           "pickle_path", "IMAGE_SIZE"]

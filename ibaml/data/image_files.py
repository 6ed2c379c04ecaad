"""Image files decoded into ``uint8`` tensors: one file (:func:`read_image`) or many in
threads (:func:`read_images`), with every failure a one-line :class:`DatasetError` naming the
file. The loaders of :mod:`ibaml.data.miniimagenet` and :mod:`ibaml.data.omniglot` read through
these.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .episodes import DatasetError


def read_image(path, mode: str, size: Optional[Tuple[int, int]] = None,
                resize: Optional[Tuple[int, int]] = None, what: str = "image") -> Tensor:
    """Decode one image file with Pillow into a ``uint8`` tensor ``[C, H, W]``.

    ``mode`` is a Pillow mode (``"RGB"``, ``"L"``); ``size=(W, H)`` requires that size
    (no resizing), ``resize=(W, H)`` resizes with Lanczos filtering. A missing, unreadable or
    wrongly sized file raises :class:`DatasetError` naming the file.

    Example
    -------
    >>> path = miniimagenet_root / "train" / "n90000000" / "n90000000_0001.png"
    >>> read_image(path, "RGB", size=(84, 84)).shape
    torch.Size([3, 84, 84])
    >>> read_image(path, "L", resize=(28, 28)).shape
    torch.Size([1, 28, 28])
    """
    import numpy as np

    try:
        from PIL import Image, UnidentifiedImageError  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading image files needs Pillow: pip install pillow") from exc
    try:
        with Image.open(path) as img:
            img.load()
            if size is not None and img.size != tuple(size):
                raise DatasetError(f"{what} {path}: size {img.size[0]}x{img.size[1]}, expected "
                                   f"{size[0]}x{size[1]}")
            img = img.convert(mode)
            if resize is not None and img.size != tuple(resize):
                img = img.resize(tuple(resize), Image.LANCZOS)
            array = np.asarray(img, dtype=np.uint8)
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{what} {path}: file missing") from None
    except Exception as exc:  # Pillow raises several types for damaged files
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise DatasetError(f"{what} {path}: cannot decode ({detail})") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def read_images(paths: Sequence, mode: str, size=None, resize=None, what: str = "image",
                num_workers: int = 0) -> Tensor:
    """Decode many files (see :func:`read_image`) into one ``uint8`` tensor ``[N, C, H, W]``;
    ``num_workers > 0`` decodes in that many threads. The first bad file in ``paths`` order
    raises :class:`DatasetError`."""
    def one(p):
        return read_image(p, mode, size=size, resize=resize, what=what)

    paths = list(paths)
    if not paths:
        raise DatasetError(f"{what}: no image files")
    pool = None
    if num_workers and num_workers > 0 and len(paths) > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(num_workers)
    try:
        decoded = pool.map(one, paths) if pool is not None else map(one, paths)
        out = None
        for i, t in enumerate(decoded):
            if out is None:
                out = torch.empty((len(paths),) + tuple(t.shape), dtype=torch.uint8)
            elif t.shape != out.shape[1:]:
                raise DatasetError(f"{what} {paths[i]}: shape {tuple(t.shape)} differs from "
                                   f"{tuple(out.shape[1:])} of {paths[0]}")
            out[i] = t
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return out

"""Image-classification datasets held in memory and the episodic (N-way K-shot) sampler.

An :class:`ImageClassDataset` keeps every image of a split as one ``uint8`` tensor
``images [N, C, H, W]`` with integer ``labels [N]`` in ``0..K−1``. The
:class:`EpisodeSampler` draws a batch of ``T`` tasks at once with tensor gathers:

- classes per task: the first ``ways`` entries of ``argsort(rand(T, K))`` (a uniform random
  subset in random order; position ``j`` in the subset becomes task label ``j``);
- images per class: a padded table ``table [K, M]`` of the image indices of every class
  (``M`` = largest class, ``counts [K]``); for each ``(task, way)`` the ``shots + query``
  smallest of ``rand(M)`` over the valid positions ``< counts`` give distinct images;
- pixels: ``x = (images[idx] / 255 − mean) / std`` per channel.

Example
-------
>>> images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
>>> data = ImageClassDataset(images, torch.arange(20) % 4, ["a", "b", "c", "d"])
>>> batch = EpisodeSampler(data, ways=3, shots=1, query=2, seed=0).sample(5)
>>> batch.support_x.shape, batch.query_y.shape
(torch.Size([5, 3, 3, 8, 8]), torch.Size([5, 6]))
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .tasks import TaskBatch

#: Per-channel mean and standard deviation of ImageNet pixels in ``[0, 1]`` (RGB).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(ValueError):
    """A dataset on disk or in memory is missing, unreadable or has the wrong shape; the
    message is one line naming the file (or argument) and what is wrong.

    Example
    -------
    >>> raise DatasetError("miniImageNet: /data/train.csv: missing")
    Traceback (most recent call last):
        ...
    ibaml.data.episodes.DatasetError: miniImageNet: /data/train.csv: missing
    """


class ImageClassDataset:
    """Images of one split with their class labels, kept as ``uint8``.

    Args:
        images: ``uint8`` tensor ``[N, C, H, W]``.
        labels: integer tensor ``[N]`` with values in ``0..len(class_names)−1``; every class
            must have at least one image.
        class_names: one name per class (label ``k`` is ``class_names[k]``).
        name: a short description used in messages (e.g. ``"miniImageNet/train"``).
        device: where to keep ``images`` and ``labels`` (default: where they are).

    Attributes:
        class_counts: ``[K]`` number of images per class (on the CPU).
        index_table: ``[K, M]`` image indices of each class, padded with ``-1`` (on the CPU).

    Example
    -------
    >>> data = ImageClassDataset(torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 0, 1, 1, 2, 2]), ["x", "y", "z"])
    >>> data.num_classes, data.class_counts.tolist()
    (3, [2, 2, 2])
    """

    def __init__(self, images: Tensor, labels: Tensor, class_names: Sequence[str], name: str = "dataset",
                 device: Optional[Union[str, torch.device]] = None):
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            desc = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise DatasetError(f"{name}: images must be a uint8 tensor [N, C, H, W], got {desc}")
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != images.shape[:1]:
            raise DatasetError(f"{name}: labels must be an integer tensor of shape [{images.shape[0]}], got "
                               f"{labels.dtype} of shape {tuple(labels.shape)}")
        labels = labels.long()
        class_names = [str(c) for c in class_names]
        K = len(class_names)
        if K == 0 or images.shape[0] == 0:
            raise DatasetError(f"{name}: no images")
        if int(labels.min()) < 0 or int(labels.max()) >= K:
            raise DatasetError(f"{name}: labels must lie in 0..{K - 1} (one per class name), "
                               f"got range {int(labels.min())}..{int(labels.max())}")
        counts = torch.bincount(labels.cpu(), minlength=K)
        if bool((counts == 0).any()):
            empty = class_names[int(torch.nonzero(counts == 0)[0])]
            raise DatasetError(f"{name}: class {empty!r} has no images")
        if device is not None:
            images, labels = images.to(device), labels.to(device)
        self.images = images
        self.labels = labels
        self.class_names: List[str] = class_names
        self.name = name
        self.class_counts = counts
        # padded index table: sort by label (stable), then scatter into [K, M]
        order = torch.sort(labels.cpu(), stable=True).indices
        starts = torch.cumsum(counts, 0) - counts
        sorted_labels = labels.cpu()[order]
        position = torch.arange(len(order)) - starts[sorted_labels]
        table = torch.full((K, int(counts.max())), -1, dtype=torch.long)
        table[sorted_labels, position] = order
        self.index_table = table
        self._stats: Optional[Tuple[Tensor, Tensor]] = None

    # ------------------------------------------------------------------ basic facts
    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def class_indices(self, k: int) -> Tensor:
        """Indices (into ``images``) of the images of class ``k``."""
        return self.index_table[k, : int(self.class_counts[k])]

    def __repr__(self) -> str:
        C, H, W = self.image_shape
        return (f"ImageClassDataset({self.name!r}, images={len(self)}x{C}x{H}x{W} uint8, "
                f"classes={self.num_classes}, per class {int(self.class_counts.min())}..{int(self.class_counts.max())}, "
                f"device={self.device})")

    def to(self, device: Union[str, torch.device]) -> "ImageClassDataset":
        """The same dataset with ``images`` and ``labels`` on ``device`` (still ``uint8``)."""
        out = ImageClassDataset.__new__(ImageClassDataset)
        out.__dict__.update(self.__dict__)
        out.images, out.labels = self.images.to(device), self.labels.to(device)
        return out

    def resized(self, size: int, chunk: int = 1024) -> "ImageClassDataset":
        """The same dataset with every image resized to ``size × size`` and kept ``uint8``:
        ``round(clamp(interpolate(x, bilinear, antialias), 0, 255))``, computed in chunks of
        ``chunk`` images on the dataset's device (labels, class names and index table are
        shared). Returns ``self`` when the images already have that size.

        Example
        -------
        >>> d = ImageClassDataset(torch.full((2, 3, 84, 84), 7, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
        >>> small = d.resized(32)
        >>> small.images.shape, small.images.dtype, int(small.images.max())
        (torch.Size([2, 3, 32, 32]), torch.uint8, 7)
        """
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        C, H, W = self.image_shape
        if (H, W) == (size, size):
            return self
        images = torch.empty((len(self), C, size, size), dtype=torch.uint8, device=self.device)
        for i in range(0, len(self), chunk):
            block = torch.nn.functional.interpolate(self.images[i:i + chunk].float(), size=(size, size),
                                                    mode="bilinear", antialias=True, align_corners=False)
            images[i:i + chunk] = block.round_().clamp_(0, 255).to(torch.uint8)
        out = self.to(self.device)
        out.images, out._stats = images, None
        return out

    def channel_stats(self, chunk: int = 4096) -> Tuple[Tensor, Tensor]:
        """Per-channel mean and standard deviation of the pixels scaled to ``[0, 1]``
        (``float64 [C]`` each, on the CPU), computed exactly from per-channel histograms
        accumulated in chunks of images; cached.

        Example
        -------
        >>> d = ImageClassDataset(torch.full((2, 3, 2, 2), 255, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
        >>> d.channel_stats()[0].tolist()
        [1.0, 1.0, 1.0]
        """
        if self._stats is None:
            # exact: a 256-bin histogram per channel, then moments of the pixel values
            C = self.images.shape[1]
            hist = torch.zeros(C, 256, dtype=torch.float64)
            for i in range(0, len(self), chunk):
                block = self.images[i:i + chunk]
                for c in range(C):
                    hist[c] += torch.bincount(block[:, c].reshape(-1), minlength=256).cpu().double()
            values = torch.arange(256, dtype=torch.float64) / 255.0
            n = hist.sum(1)
            mean = (hist * values).sum(1) / n
            var = (hist * (values - mean[:, None]).square()).sum(1) / n
            self._stats = (mean, var.sqrt().clamp_min(1e-6))
        return self._stats


def _channel_vector(value, C: int, what: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.expand(C)
    if t.numel() != C:
        raise ValueError(f"{what} must have one value per channel ({C}), got {t.numel()}")
    return t.clone()


class EpisodeSampler:
    """Draws batches of ``ways``-way ``shots``-shot classification tasks from a dataset.

    Every task picks ``ways`` distinct classes uniformly, then ``shots + query`` distinct images
    from each; labels are the positions ``0..ways−1`` of the classes within the task. Support
    and query sets are ordered by label (``[way 0 × shots, way 1 × shots, …]``).

    Args:
        dataset: an :class:`ImageClassDataset`.
        ways, shots, query: classes per task, support images per class, query images per class.
        generator: a CPU ``torch.Generator`` (shared state); or
        seed: the seed of a fresh generator (default: a nondeterministic seed).
        mean, std: per-channel normalisation constants for pixels in ``[0, 1]`` (a number or
            one value per channel); ``None`` computes them from ``dataset``
            (:meth:`ImageClassDataset.channel_stats`; pass the training split's values when
            sampling validation or test tasks), ``"imagenet"`` uses :data:`IMAGENET_MEAN` /
            :data:`IMAGENET_STD`. ``normalize=False`` returns ``x / 255``.
        dtype: floating dtype of ``support_x`` / ``query_x``.

    ``sample(T)`` returns a :class:`TaskBatch` with ``support_x [T, ways·shots, C, H, W]``,
    ``support_y [T, ways·shots]`` (long), ``query_x [T, ways·query, C, H, W]``,
    ``query_y [T, ways·query]`` and ``info["classes"] [T, ways]`` (dataset class of each label).

    Example
    -------
    >>> images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    >>> data = ImageClassDataset(images, torch.arange(40) % 8, [str(k) for k in range(8)])
    >>> sampler = EpisodeSampler(data, ways=5, shots=1, query=3, seed=0)
    >>> batch = sampler.sample(4)
    >>> batch.support_y[0].tolist(), batch.query_x.shape
    ([0, 1, 2, 3, 4], torch.Size([4, 15, 3, 8, 8]))
    """

    @classmethod
    def for_splits(cls, splits: Dict[str, "ImageClassDataset"], ways: int, shots: int, query: int, *,
                   seed: Optional[int] = None, dtype: torch.dtype = torch.float32) -> Dict[str, "EpisodeSampler"]:
        """``{split: sampler}`` for every split of ``splits`` (``"train"`` among them), each with
        a generator of its own from ``seed``, all normalised with the training split's channel
        statistics (:meth:`ImageClassDataset.channel_stats`)."""
        mean, std = splits["train"].channel_stats()
        return {name: cls(data, ways, shots, query, seed=seed, mean=mean, std=std, dtype=dtype)
                for name, data in splits.items()}

    def __init__(self, dataset: ImageClassDataset, ways: int, shots: int, query: int,
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                 mean=None, std=None, normalize: bool = True, dtype: torch.dtype = torch.float32):
        for arg, value, low in (("ways", ways, 1), ("shots", shots, 1), ("query", query, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{arg} must be an integer >= {low}, got {value!r}")
        if not isinstance(dataset, ImageClassDataset):
            raise TypeError(f"dataset must be an ImageClassDataset, got {type(dataset).__name__}")
        if ways > dataset.num_classes:
            raise DatasetError(f"{dataset.name}: ways={ways} exceeds the number of classes ({dataset.num_classes})")
        smallest = int(dataset.class_counts.min())
        if shots + query > smallest:
            k = int(dataset.class_counts.argmin())
            raise DatasetError(f"{dataset.name}: shots + query = {shots} + {query} = {shots + query} exceeds the "
                               f"{smallest} images of the smallest class ({dataset.class_names[k]!r})")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed))
        self.dataset = dataset
        self.ways, self.shots, self.query = ways, shots, query
        self.generator = generator
        self.dtype = dtype
        self.normalize = normalize
        C = dataset.image_shape[0]
        if isinstance(mean, str) or isinstance(std, str):
            if not (mean == "imagenet" and std in (None, "imagenet")):
                raise ValueError(f"named statistics: only mean='imagenet' is known, got mean={mean!r}, std={std!r}")
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        if mean is None or std is None:
            d_mean, d_std = dataset.channel_stats()
            mean = d_mean if mean is None else mean
            std = d_std if std is None else std
        self.mean = _channel_vector(mean, C, "mean")
        self.std = _channel_vector(std, C, "std")
        if bool((self.std <= 0).any()):
            raise ValueError(f"std must be positive, got {self.std.tolist()}")

    def get_state(self) -> Tensor:
        """RNG state of the sampler (for checkpoints); restore with :meth:`set_state`."""
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    def sample_indices(self, num_tasks: int) -> Tuple[Tensor, Tensor]:
        """Dataset classes ``[T, ways]`` and image indices ``[T, ways, shots + query]`` (CPU)."""
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        data, g = self.dataset, self.generator
        K, M = data.index_table.shape
        n = self.shots + self.query
        classes = torch.rand(num_tasks, K, generator=g).argsort(dim=-1)[:, : self.ways]       # [T, W]
        counts = data.class_counts[classes]                                                    # [T, W]
        keys = torch.rand(num_tasks, self.ways, M, generator=g)
        keys = keys.masked_fill(torch.arange(M) >= counts[..., None], 2.0)                     # padding last
        position = keys.topk(n, dim=-1, largest=False).indices                                 # [T, W, n]
        index = data.index_table[classes[..., None], position]
        return classes, index

    def sample(self, num_tasks: int, device: Optional[Union[str, torch.device]] = None,
               dtype: Optional[torch.dtype] = None) -> TaskBatch:
        """A :class:`TaskBatch` of ``num_tasks`` tasks on ``device`` (default: the dataset's)."""
        classes, index = self.sample_indices(num_tasks)
        data = self.dataset
        device = data.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        T, W, s, q = num_tasks, self.ways, self.shots, self.query
        C, H, Wd = data.image_shape
        if self.normalize:  # (x/255 − mean)/std = x·scale − shift, two passes over the pixels
            scale = (1.0 / (255.0 * self.std)).to(device=device, dtype=dtype).view(C, 1, 1)
            shift = (self.mean / self.std).to(device=device, dtype=dtype).view(C, 1, 1)

        def pixels(idx: Tensor) -> Tensor:
            x = data.images[idx.reshape(-1).to(data.device)].to(device).to(dtype)  # move as uint8
            x = x.mul_(scale).sub_(shift) if self.normalize else x.div_(255.0)
            return x.view(T, idx.shape[1] * idx.shape[2], C, H, Wd)

        labels = torch.arange(W, device=device)
        return TaskBatch(
            support_x=pixels(index[:, :, :s]),
            support_y=labels.repeat_interleave(s).expand(T, -1).contiguous(),
            query_x=pixels(index[:, :, s:]),
            query_y=labels.repeat_interleave(q).expand(T, -1).contiguous(),
            info={"classes": classes.to(device)},
        )

"""The procedurally generated stroke benchmark (``write_stroke_fixture``): valid files in every
miniImageNet layout, deterministic, and classes that differ by shape."""

import pickle

import numpy as np
import pytest
import torch

from ibaml.data import load_miniimagenet, load_miniimagenet_splits
from ibaml.data.fixtures import write_stroke_fixture
from ibaml.data.miniimagenet import detect_format
from ibaml.experiments.cli import load_image_data

CLASSES = (4, 2, 3)
PER_CLASS = 6


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return {fmt: write_stroke_fixture(tmp_path_factory.mktemp(fmt), fmt, CLASSES, PER_CLASS, seed=3)
            for fmt in ("pickle", "csv", "folder")}


@pytest.mark.parametrize("fmt", ["pickle", "csv", "folder"])
def test_each_format_loads(roots, fmt):
    assert detect_format(roots[fmt]) == fmt
    splits = load_miniimagenet_splits(roots[fmt], format=fmt)
    names = []
    for split, n in zip(("train", "val", "test"), CLASSES):
        data = splits[split]
        assert data.images.dtype == torch.uint8 and data.images.shape == (n * PER_CLASS, 3, 84, 84)
        assert data.num_classes == n and data.class_counts.tolist() == [PER_CLASS] * n
        assert all(name.startswith("n8") for name in data.class_names)
        names += data.class_names
    assert len(set(names)) == sum(CLASSES)  # no class in two splits


def test_formats_hold_the_same_images(roots):
    a = load_miniimagenet(roots["pickle"], "train")
    b = load_miniimagenet(roots["folder"], "train")
    c = load_miniimagenet(roots["csv"], "train")
    assert a.class_names == b.class_names == c.class_names
    assert torch.equal(a.images, b.images)  # PNG is lossless
    # JPEG approximately: its loss is mostly the pixel noise, so compare 4x4 block means
    blocks = [torch.nn.functional.avg_pool2d(d.images.float(), 4) for d in (a, c)]
    assert (blocks[0] - blocks[1]).abs().mean() < 3


def test_deterministic_and_seeded(tmp_path, roots):
    again = write_stroke_fixture(tmp_path / "again", "pickle", CLASSES, PER_CLASS, seed=3)
    other = write_stroke_fixture(tmp_path / "other", "pickle", CLASSES, PER_CLASS, seed=4)
    for name in ("train", "validation", "test"):
        file = f"mini-imagenet-cache-{name}.pkl"
        assert (again / file).read_bytes() == (roots["pickle"] / file).read_bytes()
    with open(roots["pickle"] / "mini-imagenet-cache-test.pkl", "rb") as f:
        first = pickle.load(f)["image_data"]
    with open(other / "mini-imagenet-cache-test.pkl", "rb") as f:
        assert not np.array_equal(pickle.load(f)["image_data"], first)


def test_a_class_does_not_depend_on_the_image_count(tmp_path, roots):
    """Class ``c``'s character comes from ``(seed, c)``: more images extend a class, fewer
    training classes do not change the others' characters."""
    more = load_miniimagenet(write_stroke_fixture(tmp_path, "pickle", CLASSES, PER_CLASS + 2, seed=3), "test")
    base = load_miniimagenet(roots["pickle"], "test")
    for k in range(base.num_classes):
        assert torch.equal(more.images[more.class_indices(k)][:PER_CLASS], base.images[base.class_indices(k)])


def test_classes_differ_by_shape(tmp_path):
    """Mean images of two halves of one class are closer to each other than to other classes'
    means. Colours are random per image, so the means are of ink masks (each pixel's distance to
    the image's background colour, read off a corner, normalised per image)."""
    n_classes, per_class = 8, 20
    root = write_stroke_fixture(tmp_path, "pickle", (n_classes, 1, 1), per_class, seed=0)
    data = load_miniimagenet(root, "train")
    x = data.images.double()
    background = x[:, :, :3, :3].flatten(2).median(2).values[:, :, None, None]
    ink = (x - background).norm(dim=1)
    ink = (ink / ink.flatten(1).amax(1)[:, None, None]).flatten(1)
    halves = torch.stack([torch.stack([ink[data.class_indices(k)][h::2].mean(0) for k in range(n_classes)])
                          for h in (0, 1)])  # [2, classes, pixels]
    dist = torch.cdist(halves[0], halves[1])  # [classes, classes]: half 0 of row, half 1 of column
    within = dist.diagonal()
    between = dist[~torch.eye(n_classes, dtype=torch.bool)].view(n_classes, n_classes - 1)
    assert (within < between.amin(1)).all()
    assert within.mean() < 0.75 * between.mean()


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="format"):
        write_stroke_fixture(tmp_path, "zip", CLASSES, 2)
    with pytest.raises(ValueError, match="n_classes_per_split"):
        write_stroke_fixture(tmp_path, "pickle", (2, 0, 1), 2)
    with pytest.raises(ValueError, match="strokes"):
        write_stroke_fixture(tmp_path, "pickle", CLASSES, 2, strokes=(3, 2))
    with pytest.raises(ValueError, match="images_per_class"):
        write_stroke_fixture(tmp_path, "pickle", CLASSES, 0)


def _example():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "miniimagenet.py"
    spec = importlib.util.spec_from_file_location("miniimagenet_example_strokes", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_fixture_kind_strokes(capsys):
    example = _example()
    args, _ = example.parse_args(["--fixture", "--fixture-kind", "strokes", "--image-size", "16", "--shots", "1",
                                  "--query", "3", "--workers", "0"])
    splits = load_image_data(args, torch.device("cpu"))
    assert {s: d.num_classes for s, d in splits.items()} == {"train": 64, "val": 16, "test": 20}
    assert splits["train"].image_shape == (3, 16, 16) and splits["test"].class_counts.tolist() == [30] * 20
    assert all(name.startswith("n8") for name in splits["val"].class_names)
    with pytest.raises(SystemExit):
        example.parse_args(["--fixture", "--fixture-kind", "strokes", "--dataset", "omniglot"])
    assert "--fixture-kind strokes is a miniImageNet layout" in capsys.readouterr().err

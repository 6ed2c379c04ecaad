"""miniImageNet and Omniglot loaders on small fixtures in the real file layouts, and the
episodic sampler."""

import io
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ibaml.data import (DatasetError, EpisodeSampler, ImageClassDataset, TaskBatch, load_miniimagenet,
                        load_miniimagenet_splits, load_omniglot, omniglot_split, write_miniimagenet_fixture,
                        write_omniglot_fixture)
from ibaml.data.miniimagenet import RestrictedUnpickler, detect_format

CLASSES = (6, 3, 3)
PER_CLASS = 5


@pytest.fixture(scope="module")
def mini_roots(tmp_path_factory):
    return {fmt: write_miniimagenet_fixture(tmp_path_factory.mktemp(fmt), fmt, CLASSES, PER_CLASS, seed=0)
            for fmt in ("pickle", "csv", "folder")}


@pytest.fixture(scope="module")
def mini_train(mini_roots):
    return load_miniimagenet(mini_roots["pickle"], "train")


# ------------------------------------------------------------------ miniImageNet
@pytest.mark.parametrize("fmt", ["pickle", "csv", "folder"])
def test_miniimagenet_detects_and_loads_each_format(mini_roots, fmt):
    root = mini_roots[fmt]
    assert detect_format(root) == fmt
    splits = load_miniimagenet_splits(root)
    for split, n in zip(("train", "val", "test"), CLASSES):
        data = splits[split]
        assert isinstance(data, ImageClassDataset)
        assert data.images.dtype == torch.uint8 and data.images.shape == (n * PER_CLASS, 3, 84, 84)
        assert data.labels.dtype == torch.long
        assert sorted(data.labels.unique().tolist()) == list(range(n))
        assert data.num_classes == n and data.class_counts.tolist() == [PER_CLASS] * n
        assert all(name.startswith("n9") for name in data.class_names)
        for k in range(n):
            assert (data.labels[data.class_indices(k)] == k).all()
    assert load_miniimagenet(root, "validation", format=fmt).class_names == splits["val"].class_names


def test_miniimagenet_formats_agree(mini_roots):
    """The same synthetic images in every layout (JPEG only approximately)."""
    a = load_miniimagenet(mini_roots["pickle"], "test")
    b = load_miniimagenet(mini_roots["folder"], "test", num_workers=2)
    c = load_miniimagenet(mini_roots["csv"], "test")
    assert a.class_names == b.class_names == c.class_names
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert (a.images.float() - c.images.float()).abs().mean() < 8


def test_miniimagenet_device_and_bad_arguments(mini_roots, tmp_path):
    data = load_miniimagenet(mini_roots["pickle"], "val", device="cpu")
    assert data.device.type == "cpu" and data.to("cpu").images.dtype == torch.uint8
    with pytest.raises(ValueError, match="split"):
        load_miniimagenet(mini_roots["pickle"], "dev")
    with pytest.raises(ValueError, match="format"):
        load_miniimagenet(mini_roots["pickle"], "train", format="hdf5")
    with pytest.raises(DatasetError, match="no dataset under"):
        detect_format(tmp_path)


def test_miniimagenet_missing_files(mini_roots, tmp_path):
    with pytest.raises(DatasetError, match=r"mini-imagenet-cache-test\.pkl: file missing"):
        load_miniimagenet(tmp_path, "test", format="pickle")
    root = write_miniimagenet_fixture(tmp_path / "csv", "csv", (2, 2, 2), 3)
    victim = root / "images" / "n9000000000000001.jpg"
    os.remove(victim)
    with pytest.raises(DatasetError) as err:
        load_miniimagenet(root, "train")
    assert str(victim) in str(err.value) and "missing" in str(err.value) and "\n" not in str(err.value)


def test_miniimagenet_corrupt_image(tmp_path):
    root = write_miniimagenet_fixture(tmp_path, "folder", (2, 2, 2), 3)
    victim = sorted((root / "val").glob("*/*.png"))[1]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(DatasetError) as err:
        load_miniimagenet(root, "val")
    msg = str(err.value)
    assert str(victim) in msg and "cannot decode" in msg and "\n" not in msg


def test_miniimagenet_wrong_image_size(tmp_path):
    root = write_miniimagenet_fixture(tmp_path, "csv", (2, 2, 2), 3)
    victim = root / "images" / "n9000000300000002.jpg"
    Image.new("RGB", (100, 84)).save(victim)
    with pytest.raises(DatasetError, match=r"n9000000300000002\.jpg: size 100x84, expected 84x84"):
        load_miniimagenet(root, "val")


def test_miniimagenet_bad_csv_header(tmp_path):
    root = write_miniimagenet_fixture(tmp_path, "csv", (2, 2, 2), 3)
    (root / "test.csv").write_text("file,class\nx.jpg,n1\n")
    with pytest.raises(DatasetError, match=r"test\.csv: expected the header 'filename,label'"):
        load_miniimagenet(root, "test")


def test_miniimagenet_csv_errors(tmp_path):
    root = write_miniimagenet_fixture(tmp_path, "csv", (2, 2, 2), 3)
    # a row naming an image that was never written
    with open(root / "train.csv", "a") as f:
        f.write("ghost.jpg,n90000000\n")
    with pytest.raises(DatasetError) as err:
        load_miniimagenet(root, "train")
    assert str(root / "images" / "ghost.jpg") in str(err.value) and "file missing" in str(err.value)
    (root / "val.csv").write_text("filename,label\na.jpg,n1,extra\n")
    with pytest.raises(DatasetError, match=r"val\.csv: line 2: expected 'filename,label', got 'a.jpg,n1,extra'"):
        load_miniimagenet(root, "val")
    (root / "test.csv").unlink()
    with pytest.raises(DatasetError, match=r"test\.csv: file missing"):
        load_miniimagenet(root, "test", format="csv")
    (root / "images").rename(root / "pictures")
    with pytest.raises(DatasetError, match=r"images: image folder missing \(needed by train\.csv\)"):
        load_miniimagenet(root, "train")


def test_miniimagenet_folder_errors(tmp_path):
    root = write_miniimagenet_fixture(tmp_path, "folder", (2, 2, 2), 3)
    victim = sorted((root / "train").glob("*/*.png"))[2]
    Image.new("RGB", (84, 90)).save(victim)  # misshapen: 84 wide, 90 high
    with pytest.raises(DatasetError) as err:
        load_miniimagenet(root, "train")
    assert str(victim) in str(err.value) and "size 84x90, expected 84x84" in str(err.value)
    empty = sorted((root / "val").iterdir())[1]
    for p in empty.iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=rf"{empty.name}: no \.jpg/\.jpeg/\.png images"):
        load_miniimagenet(root, "val")
    import shutil

    shutil.rmtree(root / "test")
    with pytest.raises(DatasetError, match=r"test: split folder missing"):
        load_miniimagenet(root, "test")


def test_resized_dataset_stays_uint8(mini_train):
    small = mini_train.resized(32)
    assert small.images.shape == (len(mini_train), 3, 32, 32) and small.images.dtype == torch.uint8
    assert torch.equal(small.labels, mini_train.labels) and small.class_names == mini_train.class_names
    assert mini_train.resized(84) is mini_train and mini_train.images.shape[-1] == 84
    # close to averaging the pixels of each region (the images are smooth stripes plus noise)
    area = torch.nn.functional.interpolate(mini_train.images.float(), size=(32, 32), mode="area")
    assert (small.images.float() - area).abs().mean() < 6
    torch.testing.assert_close(small.channel_stats()[0], mini_train.channel_stats()[0], atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="size must be a positive integer"):
        mini_train.resized(0)


def test_miniimagenet_misshapen_pickle(tmp_path):
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    with open(path, "wb") as f:
        pickle.dump({"image_data": np.zeros((4, 84, 84), np.uint8), "class_dict": {"a": [0, 1, 2, 3]}}, f)
    with pytest.raises(DatasetError, match=r"cache-train\.pkl: image_data must be a uint8 array \[N, 84, 84, 3\], "
                                           r"got uint8 array \(4, 84, 84\)"):
        load_miniimagenet(tmp_path, "train")
    with open(path, "wb") as f:
        pickle.dump({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": [0, 5]}}, f)
    with pytest.raises(DatasetError, match="indexes rows 0..5, but image_data has 2 rows"):
        load_miniimagenet(tmp_path, "train")
    path.write_bytes(b"\x80\x05 truncated")
    with pytest.raises(DatasetError, match="not a readable pickle"):
        load_miniimagenet(tmp_path, "train")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    with open(path, "wb") as f:
        pickle.dump({"image_data": _Exploit(), "class_dict": {}}, f)
    with pytest.raises(DatasetError) as err:
        load_miniimagenet(tmp_path, "train")
    msg = str(err.value)
    assert msg.startswith("refusing to unpickle ") and ".system from " in msg and str(path) in msg
    for evil in (b"cbuiltins\neval\n(S'1'\ntR.", b"cnumpy\nload\n(S'x'\ntR."):
        with pytest.raises(DatasetError, match="refusing to unpickle (builtins.eval|numpy.load)"):
            RestrictedUnpickler(io.BytesIO(evil)).load()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_numpy_pickles(protocol):
    data = {"image_data": np.arange(2 * 84 * 84 * 3, dtype=np.uint8).reshape(2, 84, 84, 3),
            "class_dict": {"n1": [0], "n2": [np.int64(1)]}}
    raw = pickle.dumps(data, protocol=protocol)
    variants = [raw] + ([raw.replace(b"numpy._core", b"numpy.core")] if protocol == 2 else [])  # numpy 1.x names
    for blob in variants:
        back = RestrictedUnpickler(io.BytesIO(blob)).load()
        assert np.array_equal(back["image_data"], data["image_data"]) and back["class_dict"]["n2"] == [1]


# ------------------------------------------------------------------ Omniglot
@pytest.fixture(scope="module")
def omni_root(tmp_path_factory):
    return write_omniglot_fixture(tmp_path_factory.mktemp("omniglot"), n_alphabets=2, chars_per_alphabet=6,
                                  images_per_char=4, seed=0)


def test_omniglot_layout_split_file_written_and_reused(omni_root, tmp_path):
    split_file = tmp_path / "split.json"
    sizes = (0.5, 0.25)
    train = load_omniglot(omni_root, "train", split_file=split_file, split_sizes=sizes)
    assert split_file.is_file()
    stored = json.loads(split_file.read_text())
    assert [len(stored[k]) for k in ("train", "val", "test")] == [6, 3, 3]
    assert set(stored["train"]) | set(stored["val"]) | set(stored["test"]) == {
        f"{d}/Alphabet_{a:02d}/character{c:02d}" for a, d in ((1, "images_background"), (2, "images_evaluation"))
        for c in range(1, 7)}
    assert train.class_names == stored["train"]
    assert train.images.dtype == torch.uint8 and train.images.shape == (24, 1, 28, 28)
    assert train.class_counts.tolist() == [4] * 6
    # the file is reused: a different seed gives the same classes (with a warning)
    with pytest.warns(UserWarning, match="using the split stored"):
        again = load_omniglot(omni_root, "train", split_file=split_file, split_sizes=sizes, seed=123)
    assert again.class_names == train.class_names and torch.equal(again.images, train.images)
    # deterministic: a fresh file with the same seed gives the same split, another seed another one
    assert omniglot_split(omni_root, tmp_path / "b.json", sizes, seed=0) == {k: stored[k] for k in ("train", "val", "test")}
    assert omniglot_split(omni_root, tmp_path / "c.json", sizes, seed=1) != omniglot_split(omni_root, tmp_path / "d.json",
                                                                                             sizes, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        val = load_omniglot(omni_root, "validation", split_file=split_file, split_sizes=sizes)
    assert val.num_classes == 3 and not set(val.class_names) & set(train.class_names)


def test_omniglot_default_split_file_and_counts(omni_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(omni_root, root)
    test = load_omniglot(root, "test", split_sizes=(8, 2), image_size=20)
    assert (root / "ibaml_split.json").is_file()
    assert test.num_classes == 2 and test.images.shape == (8, 1, 20, 20)
    with pytest.raises(DatasetError, match="leave no test characters out of 12"):
        omniglot_split(root, tmp_path / "x.json", (1100, 100))


def test_omniglot_rotations_are_new_classes(omni_root, tmp_path):
    split_file = tmp_path / "split.json"
    plain = load_omniglot(omni_root, "train", split_file=split_file, split_sizes=(0.5, 0.25))
    rot = load_omniglot(omni_root, "train", split_file=split_file, split_sizes=(0.5, 0.25), rotations=True)
    K = plain.num_classes
    assert rot.num_classes == 4 * K and len(rot) == 4 * len(plain)
    assert rot.class_names[K] == plain.class_names[0] + "/rot90"
    for r in range(4):
        idx = rot.class_indices(r * K + 2)
        torch.testing.assert_close(rot.images[idx], torch.rot90(plain.images[plain.class_indices(2)], r, dims=(2, 3)))


def test_omniglot_errors(omni_root, tmp_path):
    with pytest.raises(DatasetError, match="no images_background/ or images_evaluation/ folder"):
        load_omniglot(tmp_path, "train")
    root = write_omniglot_fixture(tmp_path / "bad", 1, 3, 2)
    victim = root / "images_background" / "Alphabet_01" / "character02" / "0002_01.png"
    victim.write_bytes(b"garbage")
    with pytest.raises(DatasetError) as err:
        for split in ("train", "val", "test"):
            load_omniglot(root, split, split_sizes=(1, 1))
    assert str(victim) in str(err.value) and "cannot decode" in str(err.value)
    (root / "ibaml_split.json").write_text(json.dumps({"train": ["images_background/Nope/c1"], "val": [], "test": []}))
    with pytest.raises(DatasetError, match="lists 1 characters not under"):
        load_omniglot(root, "train")


# ------------------------------------------------------------------ episodes
def test_sampler_shapes_labels_and_normalisation(mini_train):
    sampler = EpisodeSampler(mini_train, ways=5, shots=2, query=3, seed=0)
    batch = sampler.sample(4)
    assert isinstance(batch, TaskBatch)
    assert batch.support_x.shape == (4, 10, 3, 84, 84) and batch.query_x.shape == (4, 15, 3, 84, 84)
    assert batch.support_x.dtype == torch.float32
    assert batch.support_y.dtype == torch.long and batch.support_y.shape == (4, 10)
    assert batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert batch.query_y.min() == 0 and batch.query_y.max() == 4
    classes = batch.info["classes"]
    assert classes.shape == (4, 5)
    assert all(len(set(row.tolist())) == 5 for row in classes)  # distinct classes per task
    # every image belongs to the class its label names, and no image is used twice in a task
    mean, std = mini_train.channel_stats()
    pixels = (batch.support_x.double() * std.view(3, 1, 1) + mean.view(3, 1, 1)) * 255
    flat = mini_train.images.double().flatten(1)
    for t in range(4):
        hits = torch.cdist(pixels[t].flatten(1), flat).argmin(dim=1)
        assert (mini_train.labels[hits] == classes[t][batch.support_y[t]]).all()
        assert len(set(hits.tolist())) == 10
    whole = EpisodeSampler(mini_train, ways=6, shots=2, query=3, seed=0).sample(20)
    x = torch.cat([whole.support_x, whole.query_x], 1).double()
    assert x.mean(dim=(0, 1, 3, 4)).abs().max() < 0.2 and (x.std(dim=(0, 1, 3, 4)) - 1).abs().max() < 0.2


def test_sampler_determinism_and_options(mini_train):
    a = EpisodeSampler(mini_train, 3, 1, 2, seed=7).sample(5)
    b = EpisodeSampler(mini_train, 3, 1, 2, generator=torch.Generator().manual_seed(7)).sample(5)
    c = EpisodeSampler(mini_train, 3, 1, 2, seed=8).sample(5)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.support_x, c.support_x)
    s = EpisodeSampler(mini_train, 3, 1, 2, seed=7)
    state = s.get_state()
    first = s.sample(2)
    s.set_state(state)
    assert torch.equal(s.sample(2).support_x, first.support_x)
    raw = EpisodeSampler(mini_train, 3, 1, 1, seed=0, normalize=False, dtype=torch.float64).sample(2)
    assert raw.support_x.dtype == torch.float64 and 0 <= raw.support_x.min() and raw.support_x.max() <= 1
    named = EpisodeSampler(mini_train, 3, 1, 1, seed=0, mean="imagenet").sample(2)
    assert torch.allclose(named.support_x[:, :, 0] * 0.229 + 0.485, raw.support_x[:, :, 0].float(), atol=1e-5)
    # every class and every image of a class comes up under repeated sampling
    many = EpisodeSampler(mini_train, 6, 5, 0, seed=1).sample(3)
    assert many.query_x.shape == (3, 0, 3, 84, 84)
    assert sorted(many.info["classes"][0].tolist()) == list(range(6))


def test_sampler_on_omniglot_with_rotations(omni_root, tmp_path):
    data = load_omniglot(omni_root, "train", rotations=True, split_file=tmp_path / "s.json", split_sizes=(0.5, 0.25))
    batch = EpisodeSampler(data, ways=20, shots=1, query=3, seed=0).sample(2, device="cpu")
    assert batch.support_x.shape == (2, 20, 1, 28, 28) and batch.query_y.shape == (2, 60)


def test_sampler_errors(mini_train):
    with pytest.raises(DatasetError, match=r"ways=7 exceeds the number of classes \(6\)"):
        EpisodeSampler(mini_train, ways=7, shots=1, query=1)
    with pytest.raises(DatasetError, match=r"shots \+ query = 3 \+ 3 = 6 exceeds the 5 images of the smallest class"):
        EpisodeSampler(mini_train, ways=5, shots=3, query=3)
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        EpisodeSampler(mini_train, ways=5, shots=0, query=3)
    with pytest.raises(ValueError, match="mean must have one value per channel"):
        EpisodeSampler(mini_train, 5, 1, 1, mean=(0.5, 0.5), std=1.0)
    with pytest.raises(DatasetError, match="class 'b' has no images"):
        ImageClassDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), ["a", "b", "c"])
    with pytest.raises(DatasetError, match="images must be a uint8 tensor"):
        ImageClassDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), ["a", "b"])

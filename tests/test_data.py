"""Data modules: real loaders, the seeded validation split, augmentation, clear errors."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from nas.data.augment import random_crop_flip, to_network_input
from nas.data.datamodule import TensorImageDataModule
from nas.data.folders import imagefolder
from nas.data.sources import DataError, cifar10, digits, svhn
from nas.train.run import load_training_data, make_datamodule
from tests.conftest import CIFAR_JPG, HANG_S, compose_cfg, subprocess_env


def test_validation_split_is_disjoint_and_seeded():
    a_train, a_val = TensorImageDataModule.split_indices(50_000, 5000, seed=0)
    b_train, b_val = TensorImageDataModule.split_indices(50_000, 5000, seed=0)
    _c_train, c_val = TensorImageDataModule.split_indices(50_000, 5000, seed=1)
    assert len(a_val) == 5000 and len(a_train) == 45_000
    assert not set(a_train.tolist()) & set(a_val.tolist())
    assert torch.equal(a_val, b_val) and torch.equal(a_train, b_train)
    assert not torch.equal(a_val, c_val)
    _, frac_val = TensorImageDataModule.split_indices(1000, 0.2, seed=0)
    assert len(frac_val) == 200
    with pytest.raises(DataError, match="val_size"):
        TensorImageDataModule.split_indices(100, 100, seed=0)


def test_datamodule_keeps_val_out_of_training():
    cfg = compose_cfg("data=digits")
    dm = make_datamodule(cfg, load_training_data(cfg), resolution=16)
    train_rows = {tuple(r.flatten().tolist()) for r in dm.train_split.x}
    val_rows = [tuple(r.flatten().tolist()) for r in dm.val_split.x]
    # digits has a few duplicate images; at most those may coincide.
    assert sum(r in train_rows for r in val_rows) < 0.05 * len(val_rows)
    assert len(dm.train_split.y) + len(dm.val_split.y) == 1438
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32  # digits recommends batch 32
    assert y.dtype == torch.int64
    assert len(dm.train_dataloader()) == 1150 * 4 // 32  # digits repeats its tiny training split 4x per epoch
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 288
    assert dm.test_split is not None and len(dm.test_split.y) == 359


def test_train_batches_reshuffle_each_epoch_reproducibly():
    cfg = compose_cfg("data=digits", "data.repeat=1")
    splits = load_training_data(cfg)
    first = [b[1] for b in make_datamodule(cfg, splits, 16).train_dataloader()]
    dm = make_datamodule(cfg, splits, 16)
    loader = dm.train_dataloader()
    epoch0, epoch1 = [b[1] for b in loader], [b[1] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, epoch0, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1, strict=True))


def test_limit_train_images_takes_an_equal_share_of_every_class(tmp_path):
    """Folders list files class by class: a limit must not keep the first classes only (both storages)."""
    from nas.data.datamodule import balanced_subset
    from tests.conftest import write_image_folder

    root = write_image_folder(tmp_path / "imgs", per_class=12, size=8)
    for storage in ("memory", "stream"):
        cfg = compose_cfg("data=imagefolder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
                          f"data.storage={storage}", "data.workers=0", "data.val_size=4",
                          "train.limit_train_images=8")  # fmt: skip
        dm = make_datamodule(cfg, load_training_data(cfg), 8)
        assert torch.bincount(dm.train_split.y, minlength=2).tolist() == [4, 4], storage
        assert len(dm.val_split.y) == 4  # validation keeps every class too, untouched by the limit
    # A class with fewer images gives all it has and the others share the rest; seeded, sorted, no repeats.
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 10)
    index = torch.arange(100, 122)
    chosen = balanced_subset(index, labels, 12, seed=0)
    assert torch.bincount(labels[chosen - 100]).tolist() == [5, 2, 5]
    assert torch.equal(chosen, chosen.sort().values) and len(set(chosen.tolist())) == 12
    assert torch.equal(chosen, balanced_subset(index, labels, 12, seed=0))
    assert not torch.equal(chosen, balanced_subset(index, labels, 12, seed=1))
    assert torch.equal(balanced_subset(index, labels, 50, seed=0), index)  # more than there are: all
    with pytest.raises(DataError, match=r"train\.limit_train_images=0 must be a whole number >= 1"):
        balanced_subset(index, labels, 0, seed=0)


def test_random_crop_flip_is_a_per_image_shifted_window():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(8 * 8, dtype=torch.uint8).view(1, 1, 8, 8).repeat(64, 2, 1, 1) + 1
    out = random_crop_flip(x, pad=2, hflip=False, generator=gen)
    assert out.shape == x.shape
    # Each crop equals the zero-padded image at some offset in [0, 4]^2, and offsets differ across images.
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
        ]
        assert found
        offsets.add(found[0])
    assert len(offsets) > 5
    flipped = random_crop_flip(x, pad=0, hflip=True, generator=gen)
    n_flipped = sum(torch.equal(flipped[i], x[i].flip(-1)) for i in range(len(x)))
    assert 10 < n_flipped < 54


def test_network_input_normalises_resizes_and_expands_gray():
    x = torch.full((4, 1, 8, 8), 255, dtype=torch.uint8)
    out = to_network_input(x, torch.tensor([0.5]).view(1, 1, 1, 1), torch.tensor([0.25]).view(1, 1, 1, 1), 32)
    assert out.shape == (4, 3, 32, 32)
    torch.testing.assert_close(out, torch.full_like(out, 2.0))


def test_digits_is_offline_and_complete():
    s = digits()
    assert s.train_x.shape[1:] == (1, 8, 8) and s.train_x.dtype == torch.uint8
    assert len(s.train_y) + len(s.test_y) == 1797
    assert int(s.train_x.max()) == 255
    assert sorted(set(s.train_y.tolist())) == list(range(10))


@pytest.mark.parametrize("loader", [cifar10, svhn])
def test_missing_dataset_offline_names_set_root_and_fixes(tmp_path, loader):
    with pytest.raises(DataError) as err:
        loader(tmp_path / "nowhere", download=False)
    msg = str(err.value)
    assert "not found in" in msg and str(tmp_path / "nowhere") in msg
    assert "data.root=" in msg and "data=digits" in msg


def test_missing_dataset_download_failure_is_clear(tmp_path):
    # No network here: the download fails and the message says so, instead of a URLError traceback.
    with pytest.raises(DataError, match=r"CIFAR-10 not found in .* downloading it failed"):
        cifar10(tmp_path, download=True)


def test_train_cli_missing_data_exits_cleanly(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nas.train",
            "arch=reference:mobilenet_v3_small",
            f"data.root={tmp_path}",
            "data.download=false",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),
        timeout=HANG_S,
    )
    assert proc.returncode == 2
    assert "error: data set CIFAR-10 not found in" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_imagefolder_single_folder_layout_and_cache(tmp_path):
    from torchvision.transforms.functional import to_pil_image

    written = []
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            written.append(torch.randint(0, 255, (3, 12, 12), dtype=torch.uint8))
            to_pil_image(written[-1]).save(tmp_path / "imgs" / cls / f"{i}.png")
    cache = tmp_path / "cache"
    s = imagefolder(tmp_path / "imgs", cache_dir=cache)
    assert s.train_x.shape == (6, 3, 12, 12) and s.test_x is None
    assert torch.equal(s.train_x, torch.stack(written))  # PNG is lossless: the pixels come back exactly
    assert s.classes == ["cat", "dog"] and s.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(list(cache.glob("*.pt"))) == 1
    again = imagefolder(tmp_path / "imgs", cache_dir=cache)
    assert torch.equal(again.train_x, s.train_x)
    resized = imagefolder(tmp_path / "imgs", image_size=8, cache_dir=cache)
    assert resized.train_x.shape == (6, 3, 8, 8)
    assert len(list(cache.glob("*.pt"))) == 2
    # A file replaced in the folder: the cache is not used, the new pixels are read.
    time.sleep(0.01)  # a later modification time even on coarse clocks
    changed = torch.zeros(3, 12, 12, dtype=torch.uint8)
    to_pil_image(changed).save(tmp_path / "imgs" / "dog" / "1.png")
    fresh = imagefolder(tmp_path / "imgs", cache_dir=cache)
    assert torch.equal(fresh.train_x[4], changed) and torch.equal(fresh.train_x[:4], s.train_x[:4])
    with pytest.raises(DataError, match="does not exist"):
        imagefolder(tmp_path / "missing", cache_dir=cache)


def test_imagenet_layout_uses_val_as_the_held_out_split(tmp_path):
    from tests.conftest import write_image_folder

    root = write_image_folder(tmp_path / "imgs", per_class=3)
    with_test = imagefolder(root, cache_dir=tmp_path / "cache")
    (root / "test").rename(root / "val")
    with_val = imagefolder(root, cache_dir=tmp_path / "cache")
    assert with_val.test_x is not None and torch.equal(with_val.test_x, with_test.test_x)
    assert with_val.test_y.tolist() == with_test.test_y.tolist()


def test_a_corrupt_image_stops_with_its_path(tmp_path):
    from tests.conftest import write_image_folder

    root = write_image_folder(tmp_path / "imgs", per_class=3)
    broken = root / "train" / "dog" / "1.png"
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated copy
    with pytest.raises(DataError, match=r"cannot decode .*train/dog/1\.png: .* Replace or remove the file"):
        imagefolder(root, cache_dir=tmp_path / "cache")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ImageFolder skips other extensions
    broken.unlink()
    assert imagefolder(root, cache_dir=tmp_path / "cache").train_x.shape[0] == 5


def test_real_cifar10_jpg_through_imagefolder(tmp_path):
    if not CIFAR_JPG.is_dir():
        pytest.skip(f"the CIFAR-10 JPEG copy is not at {CIFAR_JPG} on this machine")
    cfg = compose_cfg("data=imagefolder", f"data.root={CIFAR_JPG}", f"data.cache_dir={tmp_path}")
    splits = load_training_data(cfg)
    assert splits.train_x.shape == (50_000, 3, 32, 32)
    assert splits.test_x.shape == (10_000, 3, 32, 32)
    assert splits.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert torch.bincount(splits.train_y).tolist() == [5000] * 10
    assert torch.bincount(splits.test_y).tolist() == [1000] * 10
    dm = make_datamodule(cfg, splits, resolution=32)
    assert len(dm.val_split.y) == 5000 and len(dm.train_split.y) == 45_000
    # Measured statistics match the copy's README (0.4898, 0.4802, 0.4442) closely.
    torch.testing.assert_close(dm.mean.flatten(), torch.tensor([0.4898, 0.4802, 0.4442]), atol=0.01, rtol=0)


def test_nas_load_sees_the_pixels_training_saw_when_it_resizes():
    """One resize for training and nas.load: 32-px images at a 24-px network (a downscale, where antialiasing
    matters) give the same network input both ways; a bundle made with another resize is refused."""
    from nas.inference import Classifier
    from nas.models import build
    from nas.retrain.export import Preprocess
    from nas.space import decode
    from tests.conftest import TINY_ARCH

    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    pre = Preprocess(resolution=24, mean=mean, std=std, channels=3, classes=["a", "b"])
    clf = Classifier(build(decode(TINY_ARCH), 2), pre, TINY_ARCH)
    trained_on = to_network_input(images, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1), 24)
    served = clf.preprocess(list(images))
    torch.testing.assert_close(served, trained_on, rtol=1e-5, atol=1e-5)
    # Without antialiasing the same downscale gives other pixels: the check above can fail.
    skipped = torch.nn.functional.interpolate(images.float() / 255, size=(24, 24), mode="bilinear", antialias=False)
    assert not torch.allclose((skipped - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1),
                              trained_on, atol=1e-3)  # fmt: skip


def test_nas_load_decodes_a_folders_files_as_training_did_at_data_image_size(tmp_path):
    """JPEGs of 64 px in a folder read with data.image_size=24 for a 16-px network: training decodes with
    libjpeg's draft (64 -> 32), resizes to 24 as uint8, then to 16. A bundle from the retrain's own
    preprocessing record gives nas.load exactly those network inputs from the files (and from PIL images)."""
    from PIL import Image
    from torchvision.transforms.functional import to_pil_image

    from nas.inference import Classifier
    from nas.models import build
    from nas.retrain.run import _preprocess
    from nas.space import decode
    from tests.conftest import TINY_ARCH

    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("test", 3)):
        for cls in ("cat", "dog"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(n):
                smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=gen), size=64, mode="bicubic")
                to_pil_image(smooth[0].clamp(0, 1)).save(tmp_path / "imgs" / split / cls / f"{i}.jpg", quality=90)
    cfg = compose_cfg("data=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.image_size=24", "data.storage=stream",
                      "data.workers=0", "data.val_size=2", f"data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    dm = make_datamodule(cfg, load_training_data(cfg), 16)
    dm.setup("test")
    trained_on = torch.cat([x for x, _ in dm.test_dataloader()])
    paths = dm.test_split.files.paths
    pre = _preprocess(cfg, dm, 16, 3)
    assert pre.image_size == 24
    clf = Classifier(build(decode(TINY_ARCH), 2), pre, TINY_ARCH)
    assert torch.equal(clf.preprocess(paths), trained_on)
    assert torch.equal(clf.preprocess([Image.open(p) for p in paths]), trained_on)
    # One resize from the full file (what nas.load did before) gives other pixels: the check can fail.
    direct = Classifier(build(decode(TINY_ARCH), 2), _preprocess(compose_cfg(), dm, 16, 3), TINY_ARCH)
    assert direct.pre.image_size is None
    assert (direct.preprocess(paths) - trained_on).abs().max() > 0.05


def test_a_bundle_made_with_another_resize_is_refused(tmp_path):
    import json

    import nas
    from nas.errors import NasError
    from nas.models import build
    from nas.retrain.export import Preprocess, write_bundle
    from nas.space import decode
    from tests.conftest import TINY_ARCH

    arch = decode(TINY_ARCH)
    pre = Preprocess(resolution=16, mean=[0.5] * 3, std=[0.2] * 3, channels=3, classes=["a", "b"])
    folder = write_bundle(tmp_path / "bundle", build(arch, 2), arch, pre)
    assert nas.load(folder).pre.resize == "bilinear-antialias"
    meta = json.loads((folder / "preprocess.json").read_text())
    (folder / "preprocess.json").write_text(json.dumps({**meta, "resize": "nearest"}))
    with pytest.raises(NasError, match="made with the resize 'nearest'"):
        nas.load(folder)


def test_the_class_count_is_the_datas_and_a_stated_one_must_agree(in_tmp, tiny_space):
    """The folder's two classes are what latency tables and the search use; data.num_classes=10 is refused."""
    from nas.data.loading import class_count
    from nas.errors import NasError
    from nas.search.runner import run_search
    from tests.conftest import FAST, write_image_folder

    root = write_image_folder(in_tmp / "imgs", per_class=8)
    folder = compose_cfg("data=imagefolder", f"data.root={root}")
    assert class_count(folder.data) == 2  # counted from train/<class>/, nothing decoded
    assert class_count(compose_cfg("data=digits").data) == 10
    stated = ("data=imagefolder", f"data.root={root}", "data.num_classes=10")
    with pytest.raises(NasError, match=r"data.num_classes=10 but data=imagefolder at .* has 2 classes \(cat, dog\): "
                                       r"set data.num_classes=2, or null"):  # fmt: skip
        run_search(compose_cfg(f"+space={tiny_space}", *FAST, "trials=1", *stated))
    import optuna

    assert optuna.get_all_study_names("sqlite:///outputs/optuna.db") == []  # refused before any study exists


def test_crop_boxes_follow_torchvisions_random_resized_crop_rules():
    from nas.data.augment import sample_crop_boxes

    boxes = sample_crop_boxes(2000, 96, 128, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = w * h / (96 * 128)
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1.0 + 1e-6 and area.max() > 0.9 and area.min() < 0.1
    assert (w / h).min() >= 3 / 4 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4
    assert boxes[:, :2].min() >= 0 and (boxes[:, 2] <= 128 + 1e-4).all() and (boxes[:, 3] <= 96 + 1e-4).all()
    # A 10x100 strip fits no square-ish crop of 90 % of its area: the widest centred crop within the ratio.
    strip = sample_crop_boxes(3, 10, 100, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    torch.testing.assert_close(strip, torch.tensor([[50 - 20 / 3, 0, 50 + 20 / 3, 10]] * 3))


def test_random_resized_crop_gives_each_image_its_own_box_resized():
    """A horizontal ramp (pixel value = column): each output row runs over its own box's columns."""
    from nas.data.augment import random_resized_crop, sample_crop_boxes

    ramp = torch.arange(128, dtype=torch.uint8).expand(4, 3, 96, 128)
    out = random_resized_crop(ramp, 24, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(5))
    boxes = sample_crop_boxes(4, 96, 128, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(5))
    assert out.shape == (4, 3, 24, 24)
    for image, (x1, _, x2, _) in zip(out, boxes.tolist(), strict=True):
        row = image[0, 0]
        assert x1 - 1 <= row.min() <= x1 + (x2 - x1) / 24 and x2 - (x2 - x1) / 24 - 1 <= row.max() <= x2
        assert torch.all(row[1:] > row[:-1])  # still a ramp: resized, not shuffled
    assert not torch.equal(out[0], out[1])  # the same image, another crop


def test_large_images_train_with_random_resized_crops_small_ones_with_pad_crops():
    images = torch.randint(0, 256, (40, 3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 2
    from nas.data.sources import ImageSplits

    splits = ImageSplits(images, labels, None, None, ["a", "b"])

    def dm(**kwargs):
        module = TensorImageDataModule("t", lambda: splits, 24, batch_size=8, val_size=8, **kwargs)
        module.setup("fit")
        return module

    auto = dm()
    assert auto.resized_crops(96) and not auto.resized_crops(32)
    assert not dm(augment="padcrop").resized_crops(96) and dm(augment="resizedcrop").resized_crops(32)
    batches = auto.train_dataloader()
    first, second = next(iter(batches))[0], next(iter(batches))[0]
    assert first.shape == (8, 3, 24, 24) and not torch.equal(first, second)  # a new draw every epoch
    with pytest.raises(DataError, match=r"data\.augment='crop' is not one of auto, padcrop, resizedcrop"):
        dm(augment="crop")
    with pytest.raises(DataError, match=r"data\.augment='crop' is not one of"):  # the search: before decoding
        load_training_data(compose_cfg("data=digits", "data.augment=crop"))

"""data.storage: an image folder decoded in memory or streamed from its files trains the same network."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.functional import to_pil_image

from nas.data import folders
from nas.data.datamodule import Batches, Shard, Split
from nas.data.folders import ImageFiles, ImageFolderSource
from nas.data.loading import MemoryBudget
from nas.data.sources import DataError, ImageSplits
from nas.space import decode
from nas.train.run import load_training_data, make_datamodule, train_arch
from tests.conftest import TINY_ARCH, compose_cfg, write_image_folder


def _cfg(root, storage: str, *more: str):
    return compose_cfg(
        "data=imagefolder",
        f"data.root={root}",
        f"data.cache_dir={root.parent / 'cache'}",
        f"data.storage={storage}",
        "data.workers=2",
        "train.accelerator=cpu",
        "train.batch_size=16",
        "train.epochs=2",
        *more,
    )


def test_memory_and_stream_give_the_same_data_and_train_the_same_weights(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=40, size=20)
    runs = {}
    for storage in ("memory", "stream"):
        cfg = _cfg(root, storage)
        data = load_training_data(cfg)
        assert isinstance(data, ImageSplits if storage == "memory" else ImageFiles)
        dm = make_datamodule(cfg, data, resolution=16)
        result = train_arch(cfg, decode(TINY_ARCH), dm)
        runs[storage] = (data, dm, result)
    (mem, mem_dm, mem_run), (stream, stream_dm, stream_run) = runs["memory"], runs["stream"]
    assert stream.fingerprint() == mem.fingerprint()  # one study, whichever storage a machine picks
    assert stream.classes == mem.classes and stream.image_shape == mem.image_shape == (3, 20, 20)
    for split in ("train_split", "val_split", "test_split"):
        assert torch.equal(getattr(stream_dm, split).y, getattr(mem_dm, split).y)
    assert torch.equal(stream_dm.mean, mem_dm.mean) and torch.equal(stream_dm.std, mem_dm.std)
    streamed = torch.cat([x for x, _ in stream_dm.test_dataloader()])
    assert torch.equal(streamed, torch.cat([x for x, _ in mem_dm.test_dataloader()]))
    # The same permutation, crops and flips on the same device: bit-identical training.
    assert stream_run.val_acc == mem_run.val_acc
    mem_state, stream_state = mem_run.module.state_dict(), stream_run.module.state_dict()
    assert all(torch.equal(mem_state[k], stream_state[k]) for k in mem_state)


def test_auto_streams_what_does_not_fit_and_says_why(tmp_path, capsys):
    root = write_image_folder(tmp_path / "imgs", per_class=4, size=20)
    assert isinstance(load_training_data(_cfg(root, "auto")), ImageSplits)
    assert "data imagefolder: memory (" in capsys.readouterr().out
    small = load_training_data(_cfg(root, "auto", "data.memory_limit_gb=0.00001"))
    assert isinstance(small, ImageFiles)
    out = capsys.readouterr().out
    assert "data imagefolder: stream (" in out and "> 50% of 0.0 MB host memory available" in out
    budget = MemoryBudget(host_bytes=10_000, device_bytes=None, fraction=0.5, processes=3)
    assert budget.choose(1000)[0] == "memory" and budget.choose(2000)[0] == "stream"  # 3 copies of 2 kB > 5 kB
    on_gpu = MemoryBudget(host_bytes=10**9, device_bytes=3000, fraction=0.5, per_device=2)
    storage, why = on_gpu.choose(1000)
    assert storage == "stream" and "free on the GPU" in why
    with pytest.raises(DataError, match=r"data\.storage=stream .* data=digits is loaded whole by torchvision"):
        load_training_data(compose_cfg("data=digits", "data.storage=stream"))
    with pytest.raises(DataError, match=r"data\.storage='disk' is not one of auto, memory, stream"):
        load_training_data(compose_cfg("data=digits", "data.storage=disk"))
    with pytest.raises(DataError, match=r"data\.memory_fraction=1\.5 must be a fraction in \(0, 1\]"):
        load_training_data(compose_cfg("data=digits", "data.memory_fraction=1.5"))
    with pytest.raises(DataError, match=r"data\.memory_limit_gb='lots' must be a positive number"):
        load_training_data(compose_cfg("data=digits", "data.memory_limit_gb=lots"))
    with pytest.raises(DataError, match=r"data\.workers=-1"):
        load_training_data(compose_cfg("data=digits", "data.workers=-1"))


def test_distributed_shards_split_training_and_cover_evaluation_once():
    split = Split(torch.arange(50), torch.arange(50).view(50, 1, 1, 1).expand(50, 3, 2, 2).to(torch.uint8))

    def labels(train: bool, rank: int, world: int) -> list[int]:
        batches = Batches(split, 8, lambda x, t, g: x.float(), train, 0, torch.device("cpu"), shard=Shard(rank, world))
        epoch = list(batches)
        assert len(epoch) == len(batches)
        return [int(v) for _, y in epoch for v in y]

    a, b = labels(True, 0, 2), labels(True, 1, 2)
    assert len(a) == len(b) == 24 and not set(a) & set(b)  # equal steps per rank, no image on both
    assert sorted(labels(False, 0, 2) + labels(False, 1, 2)) == list(range(50))  # 25 + 25: each once
    assert sorted(labels(False, 0, 3) + labels(False, 1, 3) + labels(False, 2, 3)) == list(range(50))  # 17/17/16


def test_parallel_decode_matches_and_reports_a_bad_file_by_its_path(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "imgs", per_class=6, size=12)
    serial = ImageFolderSource(root, cache_dir=tmp_path / "c1").load()
    monkeypatch.setattr(folders, "PARALLEL_FROM", 4)  # decode with DataLoader workers even this small folder
    parallel = ImageFolderSource(root, cache_dir=tmp_path / "c2").load()
    assert torch.equal(parallel.train_x, serial.train_x) and parallel.fingerprint() == serial.fingerprint()
    cached = ImageFolderSource(root, cache_dir=tmp_path / "c2").load()  # memory-mapped from the cache
    assert torch.equal(cached.train_x, serial.train_x)
    bad = root / "train" / "dog" / "2.png"
    bad.write_bytes(bad.read_bytes()[:30])
    for load in (ImageFolderSource(root, cache_dir=tmp_path / "c3").load, ImageFolderSource(root).files):
        with pytest.raises(DataError) as err:
            load()
        assert str(err.value).startswith(f"cannot decode {bad}") or str(err.value).startswith(f"cannot read {bad}")
        assert "Traceback" not in str(err.value)


def test_streamed_images_of_different_sizes_need_an_image_size(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=3, size=12)
    to_pil_image(torch.zeros(3, 30, 20, dtype=torch.uint8)).save(root / "train" / "cat" / "big.png")
    with pytest.raises(DataError, match=r"different sizes .* set data\.image_size=N"):
        ImageFolderSource(root, cache_dir=tmp_path / "c").files()
    files = ImageFolderSource(root, image_size=16, cache_dir=tmp_path / "c").files()
    assert files.image_shape == (3, 16, 16)
    x, _ = files.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8


def test_normalisation_is_accumulated_batch_by_batch_as_torch_computes_it():
    from nas.data.datamodule import channel_stats

    x = torch.randint(0, 256, (300, 3, 9, 9), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(x.split(64))
    whole = x.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), whole.mean(dim=(0, 2, 3)), atol=1e-12)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), whole.std(dim=(0, 2, 3)), atol=1e-12)


def test_search_workers_inherit_the_storage_the_main_process_chose(tmp_path):
    from nas.search.runner import settle_storage

    root = write_image_folder(tmp_path / "imgs", per_class=3, size=12)
    cfg = _cfg(root, "auto", "data.memory_limit_gb=0.000001")  # 1 kB
    settled = settle_storage(cfg, load_training_data(cfg))
    assert settled.data.storage == "stream" and cfg.data.storage == "auto"  # the workers' copy, not the user's
    assert settle_storage(cfg, ImageFolderSource(root, cache_dir=tmp_path / "c").load()).data.storage == "memory"


def test_the_gpu_is_asked_for_its_free_memory_only_when_a_choice_needs_it(monkeypatch):
    """Querying creates a CUDA context: DDP ranks must not each open one on GPU 0 for a set that is not weighed."""
    from nas.data.loading import memory_budget

    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(str(device)) or (4000, 8000))
    budget = memory_budget(compose_cfg("data=imagefolder", "data.root=/x", "data.memory_limit_gb=0.00001").data,
                           "cuda:1", processes=1, per_device=2)  # fmt: skip
    assert asked == []
    assert budget.choose(6000)[0] == "stream" and asked == []  # the host already says no
    storage, why = budget.choose(1500)  # 2 trials x 1.5 kB > half of the GPU's 4 kB
    assert storage == "stream" and why.endswith("free on the GPU") and asked == ["cuda:1"]
    assert budget.choose(600)[0] == "memory"

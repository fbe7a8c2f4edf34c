"""Images/s that ``data.storage=memory`` and ``stream`` feed, against what training consumes.

    python benchmarks/data_loading.py                        # 32 px and 224 px folders, generated
    python benchmarks/data_loading.py --sizes 224 --images 4000 --workers 8

For each image size a folder of JPEGs is generated (smooth random colour fields with noise, quality 90;
the 224-px set is stored at 320 px and decoded with ``data.image_size=256``, as ImageNet folders are
used). Each storage runs in its own process, through the product's own loader and data module, so its
peak resident memory (the process and its decoding workers) is its own:

- memory: the first decode (every core) into the cache, then a pass of training batches (augmented on
  the device: pad-crop at 32 px, random-resized-crop at 224);
- stream: a pass of training batches decoded by ``data.workers`` processes;
- the training step of MobileNetV3-Small (32 px) / -Large (224 px) alone, on batches already made, is
  what loading has to keep up with.

Writes benchmarks/results/data_loading-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_output import device_name, sync, write_results

STORED = {32: (32, None, "mobilenet_v3_small"), 224: (320, 256, "mobilenet_v3_large")}  # side on disk, decode, net


def make_folder(root: Path, n: int, side: int) -> Path:
    """``n`` JPEGs in 10 classes under root/train (and 10% more under root/test), once."""
    from PIL import Image

    if (root / "done").is_file():
        return root
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", n), ("test", max(10, n // 10))):
        for i in range(count):
            folder = root / split / f"c{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            base = torch.rand(3, 8, 8, generator=gen)
            img = torch.nn.functional.interpolate(base[None], size=(side, side), mode="bicubic")[0]
            img = (img + 0.08 * torch.randn(3, side, side, generator=gen)).clamp(0, 1).mul(255).to(torch.uint8)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.jpg", quality=90)
    (root / "done").write_text("")
    return root


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: kB


def feed(args: argparse.Namespace) -> dict:
    """One storage, in this process: images/s of an epoch of training batches (decode included for stream)."""
    from hydra import compose, initialize_config_dir

    from nas.cli import CONF_DIR, quiet_libraries
    from nas.train.run import load_training_data, make_datamodule

    quiet_libraries()
    baseline = peak_rss_mb()  # the libraries alone
    _, decode, _ = STORED[args.size]
    overrides = [
        "data=imagefolder",
        f"data.root={args.folder}",
        f"data.cache_dir={args.folder}/cache",
        f"data.storage={args.storage}",
        f"data.workers={args.workers}",
        f"data.image_size={decode if decode else 'null'}",
        f"train.batch_size={args.batch}",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    t0 = time.perf_counter()
    dm = make_datamodule(cfg, load_training_data(cfg), args.size)
    ready = time.perf_counter() - t0
    batches = dm.train_dataloader()
    sync()
    t0 = time.perf_counter()
    n = sum(len(x) for x, _ in batches)
    sync()
    seconds = time.perf_counter() - t0
    return {"storage": args.storage, "startup_s": round(ready, 2), "images": n, "images_per_s": round(n / seconds, 1),
            "data_rss_mb": round(peak_rss_mb() - baseline), "libraries_rss_mb": round(baseline),
            "worker_peak_rss_mb": round(peak_rss_mb(resource.RUSAGE_CHILDREN))}  # fmt: skip


def train_step_rate(size: int, batch: int, steps: int = 5) -> float:
    """Images/s of forward + backward + SGD step of the reference network at this size, batches ready."""
    from nas.models import build
    from nas.space import arch_from_text

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    arch = arch_from_text(f"reference:{STORED[size][2]}", size)
    model = build(arch, 10).to(dev).train()
    fmt = torch.channels_last if dev == "cpu" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - t0)


def run_child(folder: Path, size: int, storage: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--size", str(size), "--storage", storage,
           "--workers", str(args.workers), "--batch", str(args.batch)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224], choices=sorted(STORED))
    p.add_argument("--images", type=int, default=None, help="training images per folder (default 20000 / 2000)")
    p.add_argument("--workers", default="auto")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--root", type=Path, default=Path("outputs/bench-data"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--storage", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(feed(args)))
        return
    rows, result = [], {"device": device_name(), "workers": args.workers, "batch": args.batch, "sizes": {}}
    for size in args.sizes:
        n = args.images or (20_000 if size == 32 else 2_000)
        folder = make_folder(args.root / f"jpeg{size}-{n}", n, STORED[size][0])
        memory_first = run_child(folder, size, "memory", args)  # decodes and writes the cache
        memory = run_child(folder, size, "memory", args)  # reads the cache (memory-mapped)
        stream = run_child(folder, size, "stream", args)
        step = train_step_rate(size, min(args.batch, 64 if size == 224 else args.batch))
        result["sizes"][size] = {"images": n, "memory_first_decode": memory_first, "memory": memory,
                                 "stream": stream, "train_step_images_per_s": round(step, 1)}  # fmt: skip
        decode_rate = n * 1.1 / max(memory_first["startup_s"], 1e-9)
        decoded_mb = n * 1.1 * 3 * (STORED[size][1] or size) ** 2 / 1e6
        first = f"{memory_first['startup_s']} s ({decode_rate:,.0f} img/s, +{memory_first['data_rss_mb']:,} MB)"
        rows.append(f"| {size} px, {n} (+10%) | memory | {memory['images_per_s']:,.0f} | +{memory['data_rss_mb']:,} "
                    f"({decoded_mb:,.0f} decoded) | first decode {first}; from cache {memory['startup_s']} s "
                    f"| {step:,.0f} ({STORED[size][2]}) |")  # fmt: skip
        rows.append(f"| | stream | {stream['images_per_s']:,.0f} | +{stream['data_rss_mb']:,} (workers' peak "
                    f"{stream['worker_peak_rss_mb']:,}) | {stream['startup_s']} s (fingerprint pass, cached after) "
                    f"| {step:,.0f} |")  # fmt: skip
    text = "\n".join([
        f"# data loading: memory vs stream ({device_name()}, data.workers={args.workers}, batch {args.batch})",
        "",
        "| images | storage | batches img/s | main process RSS over its libraries, MB | startup | train step img/s |",
        "|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    write_results("data_loading", result, text)


if __name__ == "__main__":
    main()

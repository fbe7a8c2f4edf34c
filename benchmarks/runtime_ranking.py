"""Do the runtimes rank networks alike? The same networks timed in every installed runtime, interleaved.

    python benchmarks/runtime_ranking.py                        # mbv3_small and mbv3, 20 draws each + references
    python benchmarks/runtime_ranking.py --spaces mbv3 --n 30 --threads 4

For each space: ``--n`` seeded draws plus the space's reference networks, at ``--resolution``, batch 1, each
prepared once per runtime (exported to ONNX where the runtime runs ONNX), then timed in rounds that visit
every (network, runtime) pair in turn, so that a slow spell of the machine falls on every runtime alike; a
figure is the median of the rounds' medians. Prints and writes (benchmarks/results/runtime_ranking-<machine>)
each runtime's range, Spearman and Kendall between every pair of runtimes, the median ratio of their
figures, and the share of networks on the other side of a budget at the 25th / 50th / 75th percentile of
each runtime's own figures (what a search with that budget would keep in one and drop in the other). With
``--exporters``, also ONNX Runtime's figure for the file the retrain registers (dynamo exporter) against the
one the search times (TorchScript exporter), for the first networks.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from bench_output import write_results
from scipy.stats import kendalltau, spearmanr

from nas.cli import quiet_libraries
from nas.errors import NasError
from nas.latency.measure import LatencySettings, cpu_name, measure_file
from nas.latency.runtime import make_runtime
from nas.models import build
from nas.onnx_export import export_onnx_file
from nas.space import Arch, load_space

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("torch", "onnxruntime", "openvino")
PERCENTILES = (25, 50, 75)


def installed_runtimes() -> dict[str, object]:
    found = {}
    for name in RUNTIMES:
        try:
            found[name] = make_runtime(name)
        except NasError as exc:
            print(f"skipping {name}: {exc}")
    return found


def networks(space_name: str, n: int, resolution: int, seed: int) -> dict[str, Arch]:
    space = load_space(ROOT / "search_spaces" / f"{space_name}.yaml")
    rng = np.random.default_rng(seed)
    found = {f"draw{i}": space.sample(rng) for i in range(n)}
    found.update(space.reference_archs())
    return {name: _at(arch, resolution) for name, arch in found.items()}


def _at(arch: Arch, resolution: int) -> Arch:
    return replace(arch, resolution=resolution)


def interleaved(archs: dict[str, Arch], runtimes: dict, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """{runtime: {network: ms}}: every sampler prepared first, then ``rounds`` passes over all of them."""
    samplers = {}
    for (net, arch), (rt_name, runtime) in itertools.product(archs.items(), runtimes.items()):
        settings = LatencySettings(device="cpu", threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                                   runtime=runtime)  # fmt: skip
        model = build(arch, 10).eval()
        samplers[rt_name, net] = runtime.prepare(model, (1, 3, arch.resolution, arch.resolution), settings)
    rounds: dict[tuple[str, str], list[float]] = {key: [] for key in samplers}
    for r in range(args.rounds):
        for key, take in samplers.items():
            rounds[key].append(statistics.median(take()))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    figures: dict[str, dict[str, float]] = {name: {} for name in runtimes}
    for (rt_name, net), medians in rounds.items():
        figures[rt_name][net] = statistics.median(medians)
    return figures


def compare(figures: dict[str, dict[str, float]]) -> dict:
    names = list(figures)
    nets = list(next(iter(figures.values())))
    table = {name: np.array([figures[name][n] for n in nets]) for name in names}
    ranges = {name: [float(v.min()), float(v.max())] for name, v in table.items()}
    pairs = {}
    for a, b in itertools.combinations(names, 2):
        x, y = table[a], table[b]
        differ = {}
        for q in PERCENTILES:
            keep_a, keep_b = x <= np.percentile(x, q), y <= np.percentile(y, q)
            differ[str(q)] = float(np.mean(keep_a != keep_b))
        pairs[f"{a}/{b}"] = {
            "spearman": float(spearmanr(x, y)[0]),
            "kendall": float(kendalltau(x, y)[0]),
            "median_ratio": float(np.median(x / y)),
            "decisions_differ": differ,
        }
    return {"networks": nets, "ms": {k: v.tolist() for k, v in table.items()}, "range_ms": ranges, "pairs": pairs}


def exporter_gap(archs: dict[str, Arch], args: argparse.Namespace) -> list[dict]:
    """ONNX Runtime on the file the retrain registers (dynamo) vs the one search and table time (TorchScript)."""
    runtime = make_runtime("onnxruntime")
    settings = LatencySettings(device="cpu", threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                               runtime=runtime)  # fmt: skip
    rows = []
    for net, arch in list(archs.items())[: args.exporters]:
        model, shape = build(arch, 10).eval(), (1, 3, arch.resolution, arch.resolution)
        with tempfile.TemporaryDirectory() as tmp:
            files = {e: export_onnx_file(model, shape, Path(tmp) / f"{e}.onnx", e) for e in ("torchscript", "dynamo")}
            ms = {e: [] for e in files}
            for _ in range(args.rounds):
                for e, path in files.items():
                    ms[e].append(measure_file(path, shape, settings).median_ms)
        rows.append({"network": net, **{e: statistics.median(v) for e, v in ms.items()}})
    return rows


def report(space: str, result: dict, args: argparse.Namespace) -> str:
    lines = [f"## {space}: {len(result['networks'])} networks at {args.resolution} px\n",
             "| runtime | fastest ms | slowest ms |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {lo:.3f} | {hi:.3f} |" for name, (lo, hi) in result["range_ms"].items()]
    lines += ["", "| pair | Spearman | Kendall | median ratio | decisions differ at p25 / p50 / p75 |",
              "|---|---|---|---|---|"]  # fmt: skip
    for pair, p in result["pairs"].items():
        d = p["decisions_differ"]
        lines.append(f"| {pair} | {p['spearman']:.3f} | {p['kendall']:.3f} | {p['median_ratio']:.2f} | "
                     f"{d['25']:.0%} / {d['50']:.0%} / {d['75']:.0%} |")  # fmt: skip
    if result.get("exporters"):
        lines += ["", "ONNX Runtime, file of each exporter (ms): " + "; ".join(
            f"{r['network']} {r['torchscript']:.3f} (torchscript) vs {r['dynamo']:.3f} (dynamo)"
            for r in result["exporters"])]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spaces", nargs="+", default=["mbv3_small", "mbv3"])
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exporters", type=int, default=0, help="networks whose two ONNX exports are compared")
    args = p.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    runtimes = installed_runtimes()
    result = {"device": cpu_name(), "torch": torch.__version__, "threads": args.threads, "batch": 1,
              "runtimes": {name: rt.identity() for name, rt in runtimes.items()}, "spaces": {}}  # fmt: skip
    texts = [f"# Runtime ranking on {cpu_name()}\n",
             f"`python benchmarks/runtime_ranking.py --n {args.n} --threads {args.threads}` (batch 1, "
             f"{args.rounds} interleaved rounds of {args.repeats} timed runs; runtimes: "
             + ", ".join(runtimes[n].label() for n in runtimes) + ")\n"]  # fmt: skip
    for space in args.spaces:
        print(f"{space}: preparing and timing", flush=True)
        archs = networks(space, args.n, args.resolution, args.seed)
        result["spaces"][space] = compare(interleaved(archs, runtimes, args))
        if args.exporters and "onnxruntime" in runtimes:
            result["spaces"][space]["exporters"] = exporter_gap(archs, args)
        texts.append(report(space, result["spaces"][space], args))
    write_results("runtime_ranking", result, "\n".join(texts))


if __name__ == "__main__":
    main()

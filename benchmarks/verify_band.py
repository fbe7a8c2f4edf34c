"""Measure when unsure (latency.verify_band): how many draws a band around the budget sends to a measurement,
and how many budget decisions it gets right, against measuring every draw.

    python benchmarks/verify_band.py                          # mbv3_small, 100 draws, budget at the 40th pct
    python benchmarks/verify_band.py --space mbv3 --runtime onnxruntime --n 200

The space's table is built (or read from outputs/latency) with its calibration, as a search builds it;
``--validate`` networks measured whole give the table's error band as ``nas.latency validate`` would (its
90th-percentile relative error: ``latency.verify_band=auto``); then ``--n`` other draws are predicted and
measured whole. The budget is the ``--quantile`` of their measured latency. For each band: the share of draws
measured, and the budget decisions that are wrong against the measurement of every draw (table alone: band 0).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from bench_output import write_results

from nas.cli import quiet_libraries
from nas.latency.measure import LatencySettings, cpu_name, measure_arch
from nas.latency.runtime import make_runtime
from nas.latency.table import LatencyTable, build_table
from nas.space import load_space

ROOT = Path(__file__).resolve().parents[1]
BANDS = (0.0, 0.02, 0.05, 0.1, 0.2)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="mbv3_small")
    parser.add_argument("--runtime", default="torch", help="torch | onnxruntime | openvino")
    parser.add_argument("--n", type=int, default=100, help="draws predicted and measured")
    parser.add_argument("--validate", type=int, default=30, help="networks measured for the auto band")
    parser.add_argument("--quantile", type=float, default=0.4, help="budget: this quantile of measured latency")
    parser.add_argument("--table-dir", default=str(ROOT / "outputs" / "latency"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def _decisions(predicted: np.ndarray, measured: np.ndarray, budget: float, band: float) -> dict[str, float]:
    near = np.abs(predicted - budget) <= band * budget if band > 0 else np.zeros(len(predicted), bool)
    judged = np.where(near, measured, predicted)
    truth, table_says = measured <= budget, predicted <= budget
    return {
        "band": band,
        "measured_share": float(near.mean()),
        "wrong_decisions": int(((judged <= budget) != truth).sum()),
        "changed_by_measurement": int((near & (table_says != truth)).sum()),
        "feasible_kept_out": int(((judged > budget) & truth).sum()),
        "infeasible_let_in": int(((judged <= budget) & ~truth).sum()),
    }


def main() -> None:
    args = _args()
    quiet_libraries()
    space = load_space(ROOT / "search_spaces" / f"{args.space}.yaml")
    settings = LatencySettings(device="cpu", threads=1, runtime=make_runtime(args.runtime))
    table = LatencyTable(settings, args.table_dir)
    t0 = time.perf_counter()
    built = build_table(space, table, 10, 8, args.seed)
    print(f"table {table.path} ({len(table.entries)} entries, {time.perf_counter() - t0:.0f} s)", flush=True)
    rng = np.random.default_rng(args.seed + 7919)  # not the calibration's networks
    check = [space.sample(rng) for _ in range(args.validate)]
    draws = [space.sample(rng) for _ in range(args.n)]

    def figures(archs: list) -> tuple[np.ndarray, np.ndarray]:
        predicted = np.array([built.model.predict(a, 10) for a in archs])
        measured = np.array([measure_arch(a, 10, settings).median_ms for a in archs])
        return predicted, measured

    pv, mv = figures(check)
    auto = float(np.quantile(np.abs(pv - mv) / mv, 0.9))
    predicted, measured = figures(draws)
    budget = float(np.quantile(measured, args.quantile))
    rows = [_decisions(predicted, measured, budget, b) for b in sorted({*BANDS, auto})]
    for r in rows:
        r["auto"] = r["band"] == auto
    mape = float(np.mean(np.abs(predicted - measured) / measured) * 100)
    result = {"space": args.space, "runtime": settings.runtime.label(), "cpu": cpu_name(), "n": args.n,
              "validate_n": args.validate, "quantile": args.quantile, "budget_ms": budget, "auto_band": auto,
              "table_mape_pct": mape, "rows": rows,
              "networks": [{"arch": a.encode(), "predicted_ms": float(p), "measured_ms": float(m)}
                           for a, p, m in zip(draws, predicted, measured, strict=True)]}  # fmt: skip
    lines = [
        f"# verify band: {args.space}, {settings.runtime.label()} on {cpu_name()} (1 thread, batch 1)",
        "",
        f"`python benchmarks/verify_band.py --space {args.space} --runtime {args.runtime} --n {args.n}`: "
        f"{args.n} draws predicted by the calibrated table (MAPE {mape:.1f}%) and measured whole; budget "
        f"{budget:.3f} ms (the {args.quantile:.0%} quantile of measured); auto band {auto:.1%} (90th-percentile "
        f"error of {args.validate} other networks). Wrong decisions are against measuring every draw.",
        "",
        "| band | draws measured | wrong decisions | changed by measuring | feasible kept out | over budget let in |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"{r['band']:.1%}" + (" (auto)" if r["auto"] else "") if r["band"] else "0 (table alone)"
        lines.append(f"| {name} | {r['measured_share']:.0%} | {r['wrong_decisions']}/{args.n} | "
                     f"{r['changed_by_measurement']} | {r['feasible_kept_out']} | "
                     f"{r['infeasible_let_in']} |")  # fmt: skip
    write_results(f"verify_band-{args.space}-{args.runtime}", result, "\n".join(lines))


if __name__ == "__main__":
    main()

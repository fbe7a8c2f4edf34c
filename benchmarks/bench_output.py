"""What every benchmark script shares: the device it ran on, and writing its figures to results/."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

# NAS_BENCH_RESULTS: elsewhere (gpu_checks.py --cpu keeps its dry run's figures out of the committed ones).
RESULTS = Path(os.environ.get("NAS_BENCH_RESULTS") or Path(__file__).parent / "results")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{platform.machine()}"


def sync() -> None:
    """Wait for queued GPU work, so that a wall-clock time covers it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_results(benchmark: str, result: dict, text: str) -> None:
    """results/<benchmark>-<device>.json (figures) and .md (the table a person reads); prints the table."""
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{benchmark}-{device_name().replace(' ', '_').lower()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(text if text.endswith("\n") else text + "\n")
    print(text)

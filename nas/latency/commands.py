"""``python -m nas.latency {build-table|validate|measure} +space=NAME [latency.*=...]``: Hydra commands."""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from nas.cli import CONF_DIR, launch, quiet_libraries, user_errors
from nas.errors import NasError
from nas.latency.estimator import latency_table, settings_from_cfg
from nas.latency.fidelity import report_path, validate
from nas.latency.measure import measure_arch
from nas.latency.table import build_table
from nas.models import cost
from nas.space import arch_from_text, require_space

COMMANDS = ("build-table", "validate", "measure")
USAGE = (
    "usage: python -m nas.latency build-table +space=NAME [latency.device=cpu|cuda ...]\n"
    "       python -m nas.latency validate +space=NAME [n=30]\n"
    "       python -m nas.latency measure arch='<string>|reference:NAME'\n"
    "       python -m nas.latency agent [--host 127.0.0.1] [--port 8765]   (on the deployment device)"
)
_command: list[str] = []


def _num_classes(cfg: DictConfig) -> int:
    """The data's class count (the classifier's width is part of every head entry and measurement)."""
    from nas.data.loading import class_count

    return class_count(cfg.data)


def _progress(done: int, total: int) -> None:
    if done == total or done % 50 == 0:
        print(f"  measured {done}/{total} layers", flush=True)


def _build(cfg: DictConfig) -> None:
    space = require_space(cfg)
    table = latency_table(cfg.latency, settings_from_cfg(cfg.latency))
    print(f"latency table {table.path} for space {space.name} in {table.settings.runtime.label()} on "
          f"{table.settings.device_name()}")  # fmt: skip
    built = build_table(space, table, _num_classes(cfg), int(cfg.latency.calibrate), int(cfg.seed), _progress)
    cal = built.calibration
    print(
        f"{len(table.entries)} entries ({built.measured} measured now, {len(table.entries) - built.measured} from "
        "cache); "
        + (
            f"calibration a={cal.a:.4f} b={cal.b:.4f} ms for space {space.name} ({cal.networks} networks)"
            if cal
            else "no calibration (latency.calibrate=0)"
        )
    )


def _validate(cfg: DictConfig) -> None:
    space = require_space(cfg)
    table = latency_table(cfg.latency, settings_from_cfg(cfg.latency))
    built = build_table(space, table, _num_classes(cfg), int(cfg.latency.calibrate), int(cfg.seed), _progress)
    report = validate(space, table, built.calibration, _num_classes(cfg), int(cfg.n), int(cfg.seed))
    print("\n".join(report.lines()))
    out = report_path(cfg.latency.table_dir, space.name, table)
    out.write_text(json.dumps(report.as_dict(), indent=1))
    print(f"report written to {out}")
    from nas.tracking.runs import log_latency_report

    log_latency_report(cfg, report)


def _measure(cfg: DictConfig) -> None:
    if not cfg.arch:
        raise NasError("give the architecture: arch='<encoded string>' or arch=reference:mobilenet_v3_small")
    arch = arch_from_text(cfg.arch, int(cfg.data.get("image_size") or 32))
    settings = settings_from_cfg(cfg.latency)
    stats = measure_arch(arch, _num_classes(cfg), settings)
    c = cost(arch, _num_classes(cfg))
    print(
        f"{arch.encode()}\n  {stats.median_ms:.4f} ms median (p10 {stats.p10_ms:.4f}, p90 {stats.p90_ms:.4f}, "
        f"CV {stats.cv * 100:.1f}%) in {settings.runtime.label()} on {settings.device_name()} "
        f"[{settings.key_fields()}]; "
        f"{c.params / 1e6:.2f} M params, {c.mflops:.1f} MFLOPs"
    )
    if stats.fallback:
        print(f"  timed {stats.mode}, not {settings.effective_mode}: the network's CUDA-graph capture failed "
              f"({stats.fallback})")  # fmt: skip


@user_errors
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    {"build-table": _build, "validate": _validate, "measure": _measure}[_command[0]](cfg)


@hydra.main(config_path=CONF_DIR, config_name="latency_app", version_base="1.3")
def app(cfg: DictConfig) -> None:
    main(cfg)


def run() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    _command.append(sys.argv.pop(1))
    launch(app, "latency_app")

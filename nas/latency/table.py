"""A per-layer latency lookup table: predict a network as stem + sum(blocks) + head.

Each distinct layer configuration (channels, kernel, expansion, SE,
activation, stride, input size) is measured once per device and settings, and
cached on disk, shared by every space that uses the file. A linear calibration
``a * sum + b`` fitted on a few whole networks absorbs what isolated layers miss
(inter-layer caching, launch gaps); it depends on the networks it was fitted on,
so the file keeps one per calibration set (space, classes, network count), and a
study keeps its own copy of its layers and calibration (:class:`LayerModel`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from nas.channels import make_divisible
from nas.errors import NasError
from nas.latency.measure import LatencySettings, measure_arch, measure_module
from nas.latency.runtime import RuntimeRefused
from nas.models.blocks import ResolvedBlock, batch_norm
from nas.models.builder import (
    head_out_channels,
    make_block,
    make_classifier,
    make_head_conv,
    make_stem,
    resolve_blocks,
)
from nas.space import Arch, BlockSpec, Space

FLOOR = 0.1  # a calibrated prediction is at least this fraction of the summed layer latencies
CALIBRATION_SEED_OFFSET = 1_000_003  # calibration networks never overlap a validation sample of the same seed


@dataclass(frozen=True)
class Component:
    """One measurable piece of a network: its table key, how to build it, and its input shape (no batch)."""

    key: str
    make: Callable[[], nn.Module] = field(compare=False)
    input_shape: tuple[int, int, int]


def _out_size(size: int, stride: int) -> int:
    return math.ceil(size / stride)  # odd kernels with padding k // 2


def _stem(arch: Arch) -> Component:
    c = make_divisible(arch.stem_channels * arch.width)
    key = f"stem|c{c}|s{arch.stem_stride}|{arch.stem_activation}|r{arch.resolution}"
    return Component(key, lambda: make_stem(arch, batch_norm(0.1)), (3, arch.resolution, arch.resolution))


def _block(b: ResolvedBlock, size: int) -> Component:
    key = (
        f"{b.kind}|i{b.in_channels}|e{b.expanded_channels}|o{b.out_channels}|k{b.kernel}|s{b.stride}"
        f"|{b.activation}|se{int(b.se)}|h{size}"
    )
    return Component(key, lambda: make_block(b, batch_norm(0.1)), (b.in_channels, size, size))


def _head(arch: Arch, in_channels: int, size: int, num_classes: int) -> Component:
    """Head conv, pooling and classifier; ``c0`` / ``f0`` in the key: no head conv / no hidden layer."""
    head = 0 if arch.head_channels is None else head_out_channels(arch, in_channels)
    hidden = 0 if arch.classifier_channels is None else make_divisible(arch.classifier_channels * arch.width)
    key = f"head|i{in_channels}|c{head}|f{hidden}|{arch.head_activation}|n{num_classes}|h{size}"

    def make() -> nn.Module:
        conv = make_head_conv(arch, in_channels, batch_norm(0.1))
        classifier = make_classifier(arch, head_out_channels(arch, in_channels), num_classes, 0.0)
        return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), classifier)

    return Component(key, make, (in_channels, size, size))


def arch_components(arch: Arch, num_classes: int) -> list[Component]:
    """The stem, every block and the head of ``arch``, with the input size each one sees."""
    comps = [_stem(arch)]
    size = _out_size(arch.resolution, arch.stem_stride)
    blocks = resolve_blocks(arch)
    for b in blocks:
        comps.append(_block(b, size))
        size = _out_size(size, b.stride)
    comps.append(_head(arch, blocks[-1].out_channels, size, num_classes))
    return comps


def space_components(space: Space, num_classes: int) -> list[Component]:
    """Every distinct component any architecture of ``space`` can contain (what build-table measures)."""
    found: dict[str, Component] = {}

    def add(c: Component) -> None:
        found.setdefault(c.key, c)

    for r in space.resolution:
        for w in space.width:
            for sc in space.stem_channels:
                for ss in space.stem_stride:
                    for sa in space.stem_activation:
                        _walk_stages(space, r, w, sc, ss, sa, num_classes, add)
    return list(found.values())


def _probe(r: int, w: float, stem: tuple[int, int, str], blocks: Iterable[BlockSpec], head=(64, "relu", 64)) -> Arch:
    return Arch(r, w, stem[0], stem[1], stem[2], tuple(blocks), head[0], head[1], head[2])


def _walk_stages(space: Space, r: int, w: float, sc: int, ss: int, sa: str, n: int, add: Callable) -> None:
    stem = (sc, ss, sa)
    add(_stem(_probe(r, w, stem, [BlockSpec(3, 1, 16, 1, "relu", False)])))
    states = {(sc, _out_size(r, ss))}
    for stage in space.stages:
        nxt = set()
        for base_in, size in states:
            for ch in stage.channels:
                for st in stage.stride:
                    for k in stage.kernel:
                        for e in stage.expansion:
                            for act in stage.activation:
                                for se in stage.se:
                                    first = BlockSpec(k, e, ch, st, act, se)
                                    probe = _probe(r, w, (base_in, 1, sa), [first])
                                    add(_block(resolve_blocks(probe)[0], size))
                                    if max(stage.depth) > 1:
                                        later = BlockSpec(k, e, ch, 1, act, se)
                                        probe = _probe(r, w, (ch, 1, sa), [later])
                                        add(_block(resolve_blocks(probe)[0], _out_size(size, st)))
                    nxt.add((ch, _out_size(size, st)))
        states = nxt
    for base_in, size in states:
        for hc in space.head_channels:
            for ha in space.head_activation:
                for fc in space.classifier_channels:
                    arch = Arch(r, w, sc, ss, sa, (BlockSpec(3, 1, base_in, 1, "relu", False),), hc, ha, fc)
                    add(_head(arch, make_divisible(base_in * w), size, n))


def table_id(settings: LatencySettings) -> str:
    fields = settings.key_fields()
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return f"{settings.device}-b{settings.batch_size}-{settings.effective_mode}-{digest}"


@dataclass(frozen=True)
class Calibration:
    """``a * sum + b`` fitted on ``networks`` whole networks of one space."""

    a: float
    b: float
    networks: int

    def apply(self, total: float) -> float:
        """Never below ``FLOOR`` x the raw sum: a line fitted on a few large networks can have a negative
        intercept that would make a small one free or negative (breaking MnasNet's objective)."""
        return max(self.a * total + self.b, FLOOR * total)

    @classmethod
    def fit(cls, raw_sums: list[float], measured: list[float]) -> Calibration:
        """Least-squares fit of measured whole-network latency on the table's raw sums (a ratio for one
        network, or when every raw sum is the same)."""
        if len(raw_sums) >= 2 and np.ptp(raw_sums) > 0:
            a, b = np.polyfit(np.asarray(raw_sums), np.asarray(measured), 1)
            return cls(float(a), float(b), len(raw_sums))
        return cls(float(np.mean(measured) / np.mean(raw_sums)), 0.0, len(raw_sums))


def calibration_key(space: Space, num_classes: int, networks: int) -> str:
    """Which calibration of a table file a space uses: its content (not only its name), the classifier's width
    and ``latency.calibrate``, so another space's build never refits it and a new count does."""
    return f"{space.name}-{space.fingerprint()}-n{num_classes}-c{networks}"


def table_components(space: Space, num_classes: int) -> list[Component]:
    """Every layer the space can produce and every layer of its reference networks (MobileNetV2's expansion 6
    in a space of 3 and 4, V3's 4.5): what a study of the space can ever ask the table for."""
    components = space_components(space, num_classes)
    for arch in space.reference_archs().values():
        components += arch_components(arch, num_classes)
    return components


class LatencyTable:
    """Layer latencies for one device and settings, and the calibrations fitted on them, persisted as JSON;
    missing entries are measured on demand."""

    def __init__(self, settings: LatencySettings, directory: str | Path, path: str | Path | None = None) -> None:
        self.settings = settings
        self.path = Path(path) if path else Path(directory) / f"table-{table_id(settings)}.json"
        self.entries: dict[str, float] = {}
        self.calibrations: dict[str, Calibration] = {}
        self.refused: dict[str, str] = {}  # layers the runtime cannot compile, with its reason
        self.measured = 0  # components measured by this object (0 when everything came from the cache)
        self._load()

    def _load(self) -> None:
        if self.path.is_file():
            blob = json.loads(self.path.read_text())
            if blob.get("settings") == self.settings.key_fields():
                self.entries = {k: float(v) for k, v in blob["entries"].items()}
                # A file of an older version holds one "calibration" of unknown space: not used (refitted).
                self.calibrations = {k: Calibration(**v) for k, v in (blob.get("calibrations") or {}).items()}
                self.refused = dict(blob.get("refused") or {})

    @classmethod
    def at(cls, path: str | Path, settings: LatencySettings) -> LatencyTable:
        """A table file named by the user (``latency.table=PATH``), e.g. built on or through the target device
        and copied here. One made with other settings is refused naming what differs, never measured over."""
        path = Path(path)
        if path.is_file():
            try:
                stored = json.loads(path.read_text()).get("settings")
            except (ValueError, AttributeError) as exc:
                raise NasError(f"latency.table={path} is not a latency table ({exc})") from None
            if not isinstance(stored, dict):
                raise NasError(f"latency.table={path} is not a latency table (it has no settings)")
            diffs = [f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in settings.key_fields().items() if stored.get(k) != v]
            if diffs:
                raise NasError(
                    f"latency.table={path} was built with other latency settings ({'; '.join(diffs)}): use the "
                    "settings it was built with, or build a table for these (another latency.table file)"
                )
        return cls(settings, path.parent, path)

    def save(self) -> None:
        """Merge with what is on disk (another worker may have added entries) and replace atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        on_disk = LatencyTable(self.settings, self.path.parent, self.path)
        entries = {**on_disk.entries, **self.entries}
        calibrations = {**on_disk.calibrations, **self.calibrations}
        blob = {
            "settings": self.settings.key_fields(),
            "entries": dict(sorted(entries.items())),
            "calibrations": {k: asdict(c) for k, c in sorted(calibrations.items())},
            "refused": dict(sorted({**on_disk.refused, **self.refused}.items())),
        }
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(blob, indent=1))
        tmp.replace(self.path)

    def ensure(self, components: Iterable[Component], progress: Callable[[int, int], None] | None = None) -> int:
        """Measure every component not yet in the table; returns how many were measured. A layer the runtime
        refuses is kept with its reason: the networks that contain it fail their trials with it."""
        known = self.entries.keys() | self.refused.keys()
        todo = list({c.key: c for c in components if c.key not in known}.values())  # each layer once
        for i, comp in enumerate(todo):
            shape = (self.settings.batch_size, *comp.input_shape)
            try:
                self.entries[comp.key] = measure_module(comp.make(), shape, self.settings).median_ms
            except RuntimeRefused as exc:
                self.refused[comp.key] = str(exc)
            self.measured += 1
            if progress:
                progress(i + 1, len(todo))
        if todo:
            self.save()
        return len(todo)

    def raw_sum(self, arch: Arch, num_classes: int) -> float:
        comps = arch_components(arch, num_classes)
        if any(c.key not in self.entries for c in comps):
            self.ensure(comps)
        raise_if_refused(comps, self.refused)
        return sum(self.entries[c.key] for c in comps)

    def predict(self, arch: Arch, num_classes: int, calibration: Calibration | None = None) -> float:
        total = self.raw_sum(arch, num_classes)
        return total if calibration is None else calibration.apply(total)

    def calibrate(self, key: str, raw_sums: list[float], measured: list[float]) -> Calibration:
        """Fit and keep the calibration ``key`` (see :func:`calibration_key`)."""
        self.calibrations[key] = cal = Calibration.fit(raw_sums, measured)
        self.save()
        return cal


@dataclass(frozen=True)
class LayerModel:
    """What one study predicts with: its space's layer latencies and its calibration, kept in the study itself.
    A resumed study, and every worker on any machine, predicts exactly what its first trials were judged by,
    whatever has happened to the table file since (another space's calibration, a re-measurement, a deleted
    cache), and nothing is measured again."""

    settings: dict[str, object]  # LatencySettings.key_fields() of the measurements
    entries: dict[str, float]
    calibration: Calibration | None
    refused: dict[str, str] = field(default_factory=dict)

    def raw_sum(self, arch: Arch, num_classes: int) -> float:
        comps = arch_components(arch, num_classes)
        raise_if_refused(comps, self.refused)
        missing = [c.key for c in comps if c.key not in self.entries]
        if missing:
            raise NasError(
                f"the study's latency table has no entry for the layer {missing[0]} of {arch.encode()}: the study "
                "was made for other networks (another space?); start a new study with study.name=NEW_NAME"
            )
        return sum(self.entries[c.key] for c in comps)

    def predict(self, arch: Arch, num_classes: int) -> float:
        total = self.raw_sum(arch, num_classes)
        return total if self.calibration is None else self.calibration.apply(total)

    def record(self) -> dict[str, object]:
        cal = None if self.calibration is None else asdict(self.calibration)
        entries = dict(sorted(self.entries.items()))
        return {"settings": self.settings, "calibration": cal, "entries": entries, "refused": self.refused}

    @classmethod
    def from_record(cls, record: dict) -> LayerModel:
        cal = record.get("calibration")
        return cls(record["settings"], {k: float(v) for k, v in record["entries"].items()},
                   None if cal is None else Calibration(**cal), dict(record.get("refused") or {}))  # fmt: skip


@dataclass(frozen=True)
class TableBuild:
    measured: int  # layers measured by this build (0: all from the file)
    calibration: Calibration | None  # None with latency.calibrate=0: raw sums
    model: LayerModel


def build_table(
    space: Space,
    table: LatencyTable,
    num_classes: int,
    calibrate: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> TableBuild:
    """Measure every layer a study of the space can ask for (:func:`table_components`), then calibrate on
    ``calibrate`` whole networks of the space unless the file holds that calibration already. All of it before
    any trial trains: an entry missing at search time would be measured inside a worker, beside others'
    training."""
    components = table_components(space, num_classes)
    measured = table.ensure(components, progress)
    calibration = None
    if calibrate > 0:
        key = calibration_key(space, num_classes, calibrate)
        calibration = table.calibrations.get(key)
        if calibration is None:
            archs = calibration_archs(space, table, num_classes, calibrate, seed)
            raw = [table.raw_sum(a, num_classes) for a in archs]
            real = [measure_arch(a, num_classes, table.settings).median_ms for a in archs]
            calibration = table.calibrate(key, raw, real)
    entries = {c.key: table.entries[c.key] for c in components if c.key in table.entries}
    refused = {c.key: table.refused[c.key] for c in components if c.key in table.refused}
    return TableBuild(measured, calibration, LayerModel(table.settings.key_fields(), entries, calibration, refused))


def calibration_archs(space: Space, table: LatencyTable, num_classes: int, count: int, seed: int) -> list[Arch]:
    """``count`` networks of the space (seeded), none with a layer the runtime refuses."""
    rng = np.random.default_rng(seed + CALIBRATION_SEED_OFFSET)
    archs: list[Arch] = []
    for _ in range(100 * count):
        arch = space.sample(rng)
        if not any(c.key in table.refused for c in arch_components(arch, num_classes)):
            archs.append(arch)
            if len(archs) == count:
                return archs
    raise NasError(f"the runtime refuses a layer of nearly every network of space {space.name}: {table.refused}")


def raise_if_refused(components: list[Component], refused: dict[str, str]) -> None:
    for c in components:
        if c.key in refused:
            raise RuntimeRefused(f"{refused[c.key]} (layer {c.key})")

"""Latency: measurement, the per-layer lookup table, its cache key, and the CLI report."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from nas.errors import NasError
from nas.latency.estimator import MeasuredLatency, TableLatency, verify_band
from nas.latency.fidelity import report_path
from nas.latency.measure import LatencySettings, measure_arch, measure_module
from nas.latency.table import Calibration, LatencyTable, LayerModel, arch_components, space_components, table_id
from nas.models import cost
from nas.space import arch_from_text, decode, load_space, reference
from tests.conftest import HANG_S, TINY_ARCH, compose_cfg, subprocess_env

FAST = LatencySettings(device="cpu", batch_size=1, threads=1, warmup=3, repeats=10)


def test_measurement_is_positive_and_ordered():
    arch = reference("mobilenet_v3_small", resolution=64, stem_stride=1, first_stride2_as_1=1)
    stats = measure_arch(arch, 10, LatencySettings(device="cpu", warmup=2, repeats=10, max_cv=10.0))
    # How repeatable a figure is depends on what else the machine runs: `nas.latency validate` reports it
    # (repeat CV); a test can only ask for what holds on a busy machine too.
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms and stats.samples == 10


class _FakeClock:
    """``time.perf_counter`` for the measuring code: it moves only when the module under test says so, so
    the figures are exact whatever else the machine runs."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Sleeper(torch.nn.Module):
    """Call k takes (k mod 10 + 1) ms of the fake clock: samples of 1..10 ms whose order statistics are known."""

    def __init__(self, clock: _FakeClock) -> None:
        super().__init__()
        self.calls = 0
        self.clock = clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += (self.calls % 10 + 1) / 1000
        self.calls += 1
        return x


def test_measurement_times_the_forward_pass_in_milliseconds(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr("nas.latency.sessions.perf_counter", clock)  # the one timing loop
    sleeper = _Sleeper(clock)
    settings = LatencySettings(device="cpu", threads=1, warmup=10, repeats=10, max_cv=1.0)  # spread on purpose
    stats = measure_module(sleeper, (1, 3, 4, 4), settings)
    assert sleeper.calls == 20 and stats.attempts == 1  # warm-up calls are not timed
    # The timed calls took 1..10 ms: p10/p90 are the 1st and 9th of the 10 sorted samples.
    assert stats.p10_ms == pytest.approx(1.0)
    assert stats.median_ms == pytest.approx(5.5)
    assert stats.p90_ms == pytest.approx(9.0)
    assert stats.cv == pytest.approx(np.std(np.arange(1, 11)) / 5.5)  # population sd / mean = 0.522


def test_a_table_file_travels_and_is_refused_for_other_settings(tmp_path, tiny_space):
    """latency.table=PATH: one file, built once (on or through the target), used as it is by a search anywhere
    with the same settings; with others it is refused naming what differs, and never measured over."""
    comps = space_components(load_space(tiny_space), 10)[:3]
    path = tmp_path / "travels" / "mine.json"
    table = LatencyTable.at(path, FAST)
    assert table.ensure(comps) == 3 and json.loads(path.read_text())["settings"] == FAST.key_fields()
    again = LatencyTable.at(path, FAST)
    assert again.ensure(comps) == 0 and again.entries == table.entries  # nothing measured twice
    before = path.read_text()
    other = LatencySettings(device="cpu", batch_size=2, threads=2, warmup=3, repeats=10)
    with pytest.raises(NasError, match=r"latency.table=\S+mine.json was built with other latency settings "
                                       r"\(batch_size: 1 -> 2; threads: 1 -> 2\)"):  # fmt: skip
        LatencyTable.at(path, other)
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(NasError, match=r"bad.json is not a latency table"):
        LatencyTable.at(tmp_path / "bad.json", FAST)
    assert path.read_text() == before


def test_verify_band_auto_is_the_last_validate_reports_90th_percentile_error(tmp_path, tiny_space):
    cfg = compose_cfg("latency.estimator=table", f"latency.table_dir={tmp_path}").latency
    table, space = LatencyTable(FAST, tmp_path), load_space(tiny_space)
    band, source = verify_band(cfg, table, space)
    assert band == 0 and source.startswith("off: this table has no validate report")
    errors = [0.01 * i for i in range(1, 11)]
    path = report_path(tmp_path, space.name, table)
    path.write_text(json.dumps({"networks": [{"measured_ms": 2.0, "predicted_ms": 2.0 * (1 - e)} for e in errors]}))
    band, source = verify_band(cfg, table, space)
    assert band == pytest.approx(np.quantile(errors, 0.9)) and str(path) in source
    assert verify_band(compose_cfg("latency.verify_band=0.05").latency, table, space) == (0.05, "latency.verify_band")
    with pytest.raises(NasError, match=r"latency.verify_band=2 must be auto or a fraction of the budget"):
        verify_band(compose_cfg("latency.verify_band=2").latency, table, space)


def test_bigger_network_measures_slower():
    small = decode(TINY_ARCH)
    big = reference("mobilenet_v3_large", resolution=64, stem_stride=1)
    est = MeasuredLatency(LatencySettings(device="cpu", warmup=3, repeats=15), 10)
    assert est.latency_ms(big) > 3 * est.latency_ms(small)


def test_table_is_built_cached_and_reread(tmp_path, tiny_space):
    space = load_space(tiny_space)
    comps = space_components(space, 10)
    table = LatencyTable(FAST, tmp_path)
    assert table.ensure(comps) == len(comps) > 0
    assert table.path.is_file()
    again = LatencyTable(FAST, tmp_path)
    assert again.ensure(comps) == 0 and again.measured == 0
    assert again.entries == table.entries
    # Every layer of every sampled network is in the enumerated table: prediction measures nothing new.
    rng = np.random.default_rng(0)
    for _ in range(50):
        again.predict(space.sample(rng), 10)
    assert again.measured == 0


def test_single_block_prediction_is_stem_plus_block_plus_head(tmp_path):
    arch = decode("nas1-r16-w1-stem_c16_s1_hs-k5_e3_c24_s2_hs_se-head_c64_hs-fc_c64")
    table = LatencyTable(FAST, tmp_path)
    comps = arch_components(arch, 10)
    assert [c.key.split("|")[0] for c in comps] == ["stem", "ir", "head"]
    table.ensure(comps)
    stem, block, head = (table.entries[c.key] for c in comps)
    assert table.predict(arch, 10) == pytest.approx(stem + block + head)
    cal = table.calibrate("s", [1.0, 2.0, 3.0], [2.5, 4.5, 6.5])  # measured = 2 * sum + 0.5
    assert (cal.a, cal.b, cal.networks) == (pytest.approx(2.0), pytest.approx(0.5), 3)
    assert table.predict(arch, 10, cal) == pytest.approx(2 * (stem + block + head) + 0.5)
    assert LatencyTable(FAST, tmp_path).calibrations == {"s": cal}  # persisted
    model = LayerModel(FAST.key_fields(), {c.key: table.entries[c.key] for c in comps}, cal)
    assert TableLatency(model, FAST, 10).latency_ms(arch) == pytest.approx(2 * (stem + block + head) + 0.5)
    assert LayerModel.from_record(json.loads(json.dumps(model.record()))) == model  # what a study keeps


def test_v1_and_v2_layouts_are_tabled_and_predicted(tmp_path):
    """Depthwise-separable blocks, a missing head conv (c0) and a missing hidden layer (f0) are table
    entries of their own; the mbv2 space's table holds every layer of its MobileNetV2 reference."""
    v1, v2 = (arch_from_text(f"reference:{name}", 32) for name in ("mobilenet_v1", "mobilenet_v2"))
    comps1, comps2 = arch_components(v1, 10), arch_components(v2, 10)
    assert [c.key.split("|")[0] for c in comps1] == ["stem", *["ds"] * 13, "head"]
    assert "|i1024|c0|f0|None|" in comps1[-1].key
    assert "|i320|c1280|f0|relu6|" in comps2[-1].key
    table = LatencyTable(FAST, tmp_path)
    table.ensure(comps1 + comps2)
    for arch, comps in ((v1, comps1), (v2, comps2)):
        assert table.predict(arch, 10) == pytest.approx(sum(table.entries[c.key] for c in comps))
    space = load_space("mbv2")
    assert {c.key for c in comps2} <= {c.key for c in space_components(space, 10)}


def test_a_calibrated_prediction_never_drops_to_zero_or_below(tmp_path):
    """A line fitted on large networks may have a negative intercept; a small network must still cost time
    (MnasNet's objective takes a power of the latency)."""
    arch = decode(TINY_ARCH)
    table = LatencyTable(FAST, tmp_path)
    table.ensure(arch_components(arch, 10))
    raw = table.raw_sum(arch, 10)
    cal = Calibration.fit([10 * raw, 20 * raw], [5 * raw, 15 * raw])  # slope 1, intercept -5 x raw
    assert (cal.a, cal.b) == (pytest.approx(1.0), pytest.approx(-5 * raw))
    assert table.predict(arch, 10, cal) == pytest.approx(0.1 * raw)  # the floor, not -4 x raw
    assert table.predict(arch, 10, Calibration.fit([raw, 2 * raw], [raw, 2 * raw])) == pytest.approx(raw)  # untouched


def test_cache_key_changes_with_device_batch_and_mode(monkeypatch):
    base = table_id(LatencySettings(device="cpu", batch_size=1))
    assert table_id(LatencySettings(device="cpu", batch_size=8)) != base
    assert table_id(LatencySettings(device="cpu", batch_size=1, threads=2)) != base
    assert LatencySettings(device="cpu").key_fields()["torch"] == torch.__version__
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)  # a CUDA build asks the (absent) device
    graph = table_id(LatencySettings(device="cuda", mode="cudagraph"))
    eager = table_id(LatencySettings(device="cuda", mode="eager"))
    assert len({base, graph, eager}) == 3
    key = LatencySettings(device="cuda").key_fields()
    assert key["cudnn"] == 91000 and key["cudnn_benchmark"] is False and key["tf32"].startswith("matmul=")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 92000)  # another cuDNN: another table
    assert table_id(LatencySettings(device="cuda", mode="cudagraph")) != graph


def test_settings_reject_bad_values():
    from nas.errors import NasError

    with pytest.raises(NasError, match=r"latency\.mode='fast' is not one of cudagraph, eager"):
        LatencySettings(mode="fast")
    with pytest.raises(NasError, match=r"latency\.device='tpu'"):
        LatencySettings(device="tpu")


def test_cli_build_table_and_validate(tmp_path, tiny_space):
    common = [
        f"+space={tiny_space}",
        "latency.device=cpu",
        "latency.repeats=5",
        "latency.warmup=2",
        "latency.calibrate=3",
        "mlflow.tracking_uri=sqlite:///outputs/mlflow.db",
    ]
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "nas.latency", *a, *common],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),
        timeout=HANG_S,
    )
    counts = re.compile(r"(\d+) entries \((\d+) measured now, (\d+) from cache\); calibration a=\S+ b=\S+ ms for sp")
    first, again = run("build-table"), run("build-table")
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    n, measured, cached = map(int, counts.search(first.stdout).groups())
    assert n == len(space_components(load_space(tiny_space), 10)) and (measured, cached) == (n, 0)
    assert tuple(map(int, counts.search(again.stdout).groups())) == (n, 0, n)  # the rerun measures nothing
    report = run("validate", "n=6")
    assert report.returncode == 0, report.stderr
    files = list((tmp_path / "outputs" / "latency").glob("validate-tiny-*.json"))
    data = json.loads(files[0].read_text())
    # The summary is computed from the six networks it lists, and printed as such.
    nets = data["networks"]
    assert len(nets) == data["n"] == 6 and len({net["arch"] for net in nets}) > 1
    measured, predicted = (np.array([net[k] for net in nets]) for k in ("measured_ms", "predicted_ms"))
    assert data["spearman"] == pytest.approx(spearmanr(measured, predicted).statistic)
    assert data["mape_pct"] == pytest.approx(np.mean(np.abs(predicted - measured) / measured) * 100)
    assert f"Spearman rank correlation: {data['spearman']:.4f}" in report.stdout
    assert data["measured_min_ms"] == min(measured) and data["speedup"] > 1
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("latency-fidelity").experiment_id])
    assert len(runs) == 1 and "spearman" in runs[0].data.metrics
    # One network: the reference adapted to the data's 32 px, its median and its size.
    one = run("measure", "arch=reference:mobilenet_v3_small")
    assert one.returncode == 0, one.stderr
    arch = arch_from_text("reference:mobilenet_v3_small", 32)
    head, stats = one.stdout.splitlines()[:2]
    assert head == arch.encode()
    figures = r"  (\S+) ms median \(p10 (\S+), p90 (\S+), CV (\S+)%\) in torch on .*; (\S+) M params, (\S+) MFLOPs$"
    m = re.match(figures, stats)
    assert m is not None, stats
    assert 0 < float(m[2]) <= float(m[1]) <= float(m[3])
    assert (m[5], m[6]) == (f"{cost(arch, 10).params / 1e6:.2f}", f"{cost(arch, 10).mflops:.1f}")
    usage = subprocess.run([sys.executable, "-m", "nas.latency"], capture_output=True, text=True, cwd=tmp_path)
    assert usage.returncode == 2 and "build-table" in usage.stderr


def test_measuring_pins_cudnn_algorithm_choice_whatever_the_last_trial_set():
    """Review finding C2: cudnn.benchmark is process-global and each trainer sets it; a measurement must
    not inherit it, and a CUDA figure's key says what it was measured under."""
    from nas.latency.runtime import MEASURE_CUDNN_BENCHMARK, cuda_backend_fields

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cudnn.benchmark)
            return x * 2

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = not MEASURE_CUDNN_BENCHMARK  # as a trial's trainer may leave it
        measure_module(Probe(), (1, 3, 4, 4), FAST)
        assert set(seen) == {MEASURE_CUDNN_BENCHMARK}
        assert torch.backends.cudnn.benchmark is (not MEASURE_CUDNN_BENCHMARK)  # restored for training
    finally:
        torch.backends.cudnn.benchmark = before
    fields = cuda_backend_fields()
    assert set(fields) == {"cudnn", "cudnn_benchmark", "tf32"} and fields["cudnn_benchmark"] == MEASURE_CUDNN_BENCHMARK


def test_a_noisy_measurement_is_taken_again_and_the_steadiest_kept():
    """Review finding C5: the coefficient of variation decides whether a measurement is kept."""
    from nas.errors import NasError
    from nas.latency.measure import steadiest

    attempts = iter([[1.0, 3.0, 1.0, 3.0], [2.0, 2.1, 1.9, 2.0], [5.0, 5.0, 5.0, 5.0]])
    stats = steadiest(lambda: next(attempts), max_cv=0.1)
    assert stats.attempts == 2 and stats.median_ms == pytest.approx(2.0)  # the second was steady: no third
    noisy = iter([[1.0, 3.0, 1.0, 3.0], [1.0, 2.0, 1.0, 2.0], [1.0, 4.0, 1.0, 4.0]])
    stats = steadiest(lambda: next(noisy), max_cv=0.1)
    assert stats.attempts == 3 and stats.median_ms == pytest.approx(1.5)  # all noisy: the least noisy kept
    with pytest.raises(NasError, match=r"latency\.max_cv must be > 0"):
        LatencySettings(max_cv=0)


def test_the_table_holds_the_references_layers_before_any_trial(tmp_path, tiny_space):
    """Review finding C3: a reference's layers (MobileNetV3-Small's expansions 4.5 and 3.67 in a space of 2 and
    3) are measured when the table is built, not on demand inside workers while others train."""
    from nas.latency.table import build_table

    tiny_space.write_text(
        tiny_space.read_text() + "references:\n  - {name: mobilenet_v3_small, stem_stride: 1, first_stride2_as_1: 1}\n"
    )
    space = load_space(tiny_space)
    table = LatencyTable(FAST, tmp_path)
    built = build_table(space, table, 10, calibrate=0, seed=0)
    measured = table.measured
    (ref,) = space.reference_archs().values()
    assert any(c.key not in {s.key for s in space_components(space, 10)} for c in arch_components(ref, 10))
    table.predict(ref, 10)
    assert table.measured == measured  # nothing left to measure at search time
    assert built.model.predict(ref, 10) == pytest.approx(table.predict(ref, 10))  # the study's copy holds them too


def test_each_space_keeps_its_own_calibration_in_a_shared_table_file(tmp_path, tiny_space, monkeypatch):
    """Issue 25, finding 2: a table file is shared by every space measured with the same settings. Building
    space B's table must not refit the calibration space A's studies predict with, and a rebuild of A measures
    no whole network again; another latency.calibrate is another calibration, fitted when asked for."""
    from nas.latency import table as table_module
    from nas.latency.table import build_table

    wide = tiny_space.with_name("wide.yaml")
    wide.write_text(tiny_space.read_text().replace("width: [0.25, 0.5]", "width: [0.75]"))
    space_a, space_b = load_space(tiny_space), load_space(wide)
    assert space_a.fingerprint() != space_b.fingerprint()
    measured_networks = []
    real = table_module.measure_arch
    monkeypatch.setattr(table_module, "measure_arch", lambda *a: measured_networks.append(1) or real(*a))
    a = build_table(space_a, LatencyTable(FAST, tmp_path), 10, calibrate=2, seed=0)
    arch = space_a.sample(0)
    before = a.model.predict(arch, 10)
    b = build_table(space_b, LatencyTable(FAST, tmp_path), 10, calibrate=2, seed=0)
    assert len(measured_networks) == 4 and b.calibration != a.calibration
    again = build_table(space_a, LatencyTable(FAST, tmp_path), 10, calibrate=2, seed=0)
    assert len(measured_networks) == 4 and again.measured == 0  # A's calibration read back, nothing measured
    assert again.calibration == a.calibration and again.model.predict(arch, 10) == before
    assert len(LatencyTable(FAST, tmp_path).calibrations) == 2  # one file, one calibration per space
    three = build_table(space_a, LatencyTable(FAST, tmp_path), 10, calibrate=3, seed=0)
    assert len(measured_networks) == 7 and three.calibration.networks == 3  # latency.calibrate takes effect

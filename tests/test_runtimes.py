"""Latency in the deployment runtime (issue 26): ONNX Runtime and OpenVINO on CPU through the same measuring,
table, search and retrain paths as PyTorch; the refusals; a network a runtime cannot run."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from nas.cli import check_overrides
from nas.errors import NasError
from nas.latency.estimator import settings_from_cfg
from nas.latency.measure import LatencySettings, measure_arch, measure_file, measure_module
from nas.latency.measuring_process import serve
from nas.latency.onnx_runtimes import OnnxRuntime, OpenVinoRuntime
from nas.latency.runtime import RuntimeRefused, TorchRuntime, make_runtime
from nas.latency.table import LatencyTable, arch_components, build_table, table_id
from nas.models import build
from nas.onnx_export import export_onnx_file
from nas.search.runner import run_search
from nas.space import decode, load_space
from tests.conftest import FAST, HANG_S, ROOT, TINY_ARCH, compose_cfg, subprocess_env

QUICK = {"device": "cpu", "warmup": 2, "repeats": 5, "max_cv": 10.0}
RUNTIMES = {"onnxruntime": OnnxRuntime, "openvino": OpenVinoRuntime}
REFUSING = "latency.runtime._target_=tests.runtime_doubles.OnnxRuntimeWithoutHardSigmoid"


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env["PYTHONPATH"] = str(ROOT)  # tests.runtime_doubles, from any folder
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=HANG_S)  # fmt: skip


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_a_runtime_times_the_network_and_keys_its_figures_by_its_identity(name):
    runtime = RUNTIMES[name]()
    settings = LatencySettings(runtime=runtime, **QUICK)
    stats = measure_arch(decode(TINY_ARCH), 10, settings)
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms and stats.samples == 5
    fields = settings.key_fields()
    assert fields["runtime"]["name"] == name and fields["runtime"]["version"] and fields["mode"] == name
    torch_fields = LatencySettings(**QUICK).key_fields()
    assert "runtime" not in torch_fields  # PyTorch's figures keep the key they had before runtimes
    assert table_id(settings) != table_id(LatencySettings(**QUICK)) and name in table_id(settings)


def test_the_runtimes_run_the_exported_network_itself(tmp_path):
    """What is timed is the network: the exported file computes what PyTorch computes (both exporters), and
    measure_file times a file as it is."""
    model = build(decode(TINY_ARCH), 10).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(x).numpy()
    import onnxruntime as ort

    for exporter in ("torchscript", "dynamo"):
        path = export_onnx_file(model, (1, 3, 16, 16), tmp_path / f"{exporter}.onnx", exporter)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        assert {n.op_type for n in onnx.load(str(path)).graph.node} >= {"Conv", "HardSigmoid"}  # the SE gate
        for runtime in (OnnxRuntime(), OpenVinoRuntime()):
            assert measure_file(path, (1, 3, 16, 16), LatencySettings(runtime=runtime, **QUICK)).median_ms > 0


def test_a_runtime_measures_in_a_process_of_its_own_where_a_crash_fails_one_measurement_only():
    runtime = OpenVinoRuntime()
    settings = LatencySettings(runtime=runtime, **QUICK)
    model = build(decode(TINY_ARCH), 10).eval()
    take = runtime.prepare(model, (1, 3, 16, 16), settings)
    assert len(take()) == 5
    assert "openvino" not in sys.modules  # training never shares a process with the runtime's libraries
    pid = runtime._process.pid
    os.kill(pid, signal.SIGSEGV)  # as a runtime that crashes on a network
    with pytest.raises(RuntimeRefused, match=r"^the openvino measuring process died \(signal SIGSEGV"):
        take()
    assert measure_module(model, (1, 3, 16, 16), settings).median_ms > 0  # the next network: a fresh process
    assert runtime._process.pid not in (None, pid)


def test_the_measuring_process_answers_bad_requests_and_goes_on():
    answers = io.StringIO()
    serve(io.StringIO('not json\n{"op": "take", "handle": 7}\n{"op": "fly"}\n{"op": "close", "handle": 7}\n'), answers)
    lines = [json.loads(line) for line in answers.getvalue().splitlines()]
    assert ["error" in a for a in lines] == [True, True, True, False]
    assert lines[0]["error"].startswith("JSONDecodeError") and lines[1]["error"] == "no open network 7"


def test_runtimes_are_chosen_by_group_or_by_name_and_bad_choices_are_one_line():
    assert isinstance(make_runtime(compose_cfg("latency/runtime=onnxruntime").latency.runtime), OnnxRuntime)
    assert isinstance(make_runtime(compose_cfg("latency.runtime=openvino").latency.runtime), OpenVinoRuntime)
    assert isinstance(make_runtime(compose_cfg().latency.runtime), TorchRuntime)  # the default
    options = "is not one of onnxruntime, openvino, tensorrt, torch"
    with pytest.raises(NasError, match=re.escape(f"latency/runtime=tflite {options}")):
        check_overrides("config", ["latency/runtime=tflite"])
    with pytest.raises(NasError, match=re.escape(f"latency.runtime=tflite {options}; add a file latency/runtime/")):
        make_runtime(compose_cfg("latency.runtime=tflite").latency.runtime)
    cfg = compose_cfg("latency/runtime=onnxruntime", "latency.runtime.providers=[CUDAExecutionProvider]")
    with pytest.raises(NasError, match=r"CUDAExecutionProvider is not available here \(pip install onnxruntime-gpu"):
        make_runtime(cfg.latency.runtime)
    with pytest.raises(NasError, match=re.escape("latency.runtime.optimization='most' is not one of disable, basic")):
        make_runtime(compose_cfg("latency/runtime=onnxruntime", "latency.runtime.optimization=most").latency.runtime)
    # latency.device=auto takes the runtime's device; a device the runtime does not run on is refused.
    assert settings_from_cfg(compose_cfg("latency/runtime=openvino").latency).device == "cpu"
    with pytest.raises(NasError, match=re.escape("latency.device=cuda but latency/runtime=openvino runs on the CPU")):
        OpenVinoRuntime().check("cuda")


def test_a_runtime_that_is_not_installed_stops_the_command_with_its_install_line(tmp_path):
    shadow = tmp_path / "shadow" / "openvino"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named openvino')\n")  # as if not installed
    env = subprocess_env()
    env["PYTHONPATH"] = f"{shadow.parent}:{ROOT}"
    proc = subprocess.run([sys.executable, "-m", "nas.latency", "measure", f"arch={TINY_ARCH}", "data=digits",
                           "latency/runtime=openvino"], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=HANG_S)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: latency/runtime=openvino needs OpenVINO: pip install -e '.[openvino]'"


@pytest.mark.parametrize("name", ["openvino"])  # onnxruntime's command line: the search test below
def test_latency_measure_through_the_command_line(tmp_path, name):
    proc = _cli("nas.latency", "measure", f"arch={TINY_ARCH}", "data=digits", f"latency/runtime={name}",
                "latency.repeats=5", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(rf"ms median .* in {name}\[CPU.*\] on ", proc.stdout), proc.stdout


def test_a_layer_the_runtime_refuses_is_kept_with_its_reason_and_fails_only_its_networks(tmp_path, micro_space):
    space = load_space(micro_space)
    from tests.runtime_doubles import OnnxRuntimeWithoutHardSigmoid

    settings = LatencySettings(runtime=OnnxRuntimeWithoutHardSigmoid(), **QUICK)
    built = build_table(space, LatencyTable(settings, tmp_path), 10, 2, 0)
    se_layers = {k for k in built.model.refused if "|se1|" in k}
    assert se_layers and se_layers == set(built.model.refused)  # exactly the layers with the gate
    with_se = next(
        a for a in (space.sample(s) for s in range(50)) if any("|se1|" in c.key for c in arch_components(a, 10))
    )
    without = next(
        a for a in (space.sample(s) for s in range(50)) if a is not with_se and not any(b.se for b in a.blocks)
    )
    assert built.model.predict(without, 10) > 0
    with pytest.raises(RuntimeRefused, match=r"no kernel for HardSigmoid\(6\) \(layer "):
        built.model.predict(with_se, 10)
    # The file keeps the refusal: a new table object measures nothing again and refuses alike.
    again = LatencyTable(settings, tmp_path)
    assert again.ensure(arch_components(with_se, 10)) == 0 and set(again.refused) == se_layers


def test_a_network_the_runtime_cannot_run_fails_its_trial_with_the_reason_and_the_search_goes_on(in_tmp, micro_space):
    result = run_search(compose_cfg(f"+space={micro_space}", *FAST, "trials=3", "latency/runtime=onnxruntime",
                                    REFUSING, "search.max_consecutive_failures=0", "search/sampler=random",
                                    "search.enqueue_references=false"))  # fmt: skip
    assert result.exit_code == 0
    trials = result.study.trials
    failed = [t for t in trials if t.user_attrs.get("state") == "failed"]
    done = [t for t in trials if t.user_attrs.get("state") == "complete"]
    assert len(done) == 3 and all("_se-" not in t.user_attrs["arch"] for t in done)
    assert failed and all("_se-" in t.user_attrs["arch"] for t in failed)
    assert all(t.user_attrs["fail_reason"].endswith("no kernel for HardSigmoid(6)") for t in failed)
    client = MlflowClient(f"sqlite:///{in_tmp}/outputs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(result.study.study_name).experiment_id],
                              "tags.`nas.kind` = 'trial'")  # fmt: skip
    reasons = [r.data.tags.get("nas.fail_reason", "") for r in runs if r.info.status == "FAILED"]
    assert len(reasons) == len(failed) and all("HardSigmoid" in r for r in reasons)


def test_a_network_whose_cuda_graph_capture_fails_is_timed_eagerly_with_one_warning(capsys):
    from nas.latency.runtime import TorchSampler
    from tests.runtime_doubles import CAPTURE_ERROR, failing_capture

    model, x = build(decode(TINY_ARCH), 10).eval(), torch.randn(1, 3, 16, 16)
    settings = LatencySettings(**QUICK)
    replays = []
    captured = TorchSampler(model, x, settings, capture=lambda m, t: lambda: replays.append(1))
    captured.mode = "cudagraph"  # as on CUDA: a CPU has no graphs to capture
    assert len(captured()) == 5 and len(replays) == 2 + 5 and captured.fallback is None  # the replay is timed
    sampler = TorchSampler(model, x, settings, capture=failing_capture)
    sampler.mode = "cudagraph"
    with torch.no_grad():
        assert torch.equal(sampler.runner()(), model(x))  # the network itself, eagerly
    assert sampler.mode == "eager" and sampler.fallback == f"CUDA error: {CAPTURE_ERROR}"
    assert len(sampler()) == 5  # captured once: no second warning for the next measurement
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: CUDA-graph capture of the network failed (CUDA error: {CAPTURE_ERROR}); its latency "
                   "is measured eagerly (launch overhead included)"]  # fmt: skip

    def out_of_memory(m, t):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    oom = TorchSampler(model, x, settings, capture=out_of_memory)
    oom.mode = "cudagraph"
    with pytest.raises(torch.cuda.OutOfMemoryError):  # not a capture problem: the trial fails as out of memory
        oom()


def test_a_figure_timed_eagerly_after_a_failed_capture_says_so_on_the_trial_and_finalist_runs(in_tmp, micro_space):
    from tests.runtime_doubles import CAPTURE_ERROR

    double = "tests.runtime_doubles.TorchRuntimeWhoseCaptureFails"
    stats = measure_arch(decode(TINY_ARCH), 10, LatencySettings(runtime=make_runtime({"_target_": double}), **QUICK))
    assert (stats.mode, stats.fallback) == ("eager", f"CUDA error: {CAPTURE_ERROR}")
    result = run_search(compose_cfg(f"+space={micro_space}", *FAST, "trials=2", "latency.estimator=measure",
                                    f"latency.runtime._target_={double}",
                                    "search.enqueue_references=false", "search.finalists=1", "search.finalist_seeds=1",
                                    "search.fidelity_sample=0", "search.finalist_epochs=1"))  # fmt: skip
    assert result.exit_code == 0
    trained = [t for t in result.study.trials if t.user_attrs.get("state") == "complete"]
    assert len(trained) == 2
    for t in trained:
        assert t.user_attrs["latency_mode"] == "eager"
        assert t.user_attrs["latency_mode_fallback"] == f"CUDA error: {CAPTURE_ERROR}"
    client = MlflowClient(f"sqlite:///{in_tmp}/outputs/mlflow.db")
    exp = client.get_experiment_by_name(result.study.study_name)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    kinds = {r.data.tags.get("nas.kind") for r in runs if "nas.latency_mode" in r.data.tags}
    assert {"trial", "finalist"} <= kinds, [r.data.tags for r in runs]
    assert all(r.data.tags["nas.latency_mode"] == f"eager fallback: CUDA error: {CAPTURE_ERROR}"
               for r in runs if "nas.latency_mode" in r.data.tags)  # fmt: skip


def test_a_study_keeps_its_runtime_and_refuses_another_by_name(in_tmp, micro_space):
    run_search(compose_cfg(f"+space={micro_space}", *FAST, "trials=1", "latency/runtime=onnxruntime"))
    study = optuna.load_study(study_name="micro-digits", storage="sqlite:///outputs/optuna.db")
    assert study.user_attrs["identity"]["latency.runtime"] == "onnxruntime[CPU]"
    with pytest.raises(NasError, match=re.escape("latency.runtime: 'onnxruntime[CPU]' -> 'torch'")):
        run_search(compose_cfg(f"+space={micro_space}", *FAST, "trials=2"))
    with pytest.raises(NasError, match=re.escape("latency.runtime: 'onnxruntime[CPU]' -> 'openvino[CPU,f32]'")):
        run_search(compose_cfg(f"+space={micro_space}", *FAST, "trials=2", "latency.runtime=openvino"))


def test_search_finalists_and_retrain_in_onnxruntime_through_the_command_line(tmp_path, micro_space):
    """The issue's command on a small space: every figure is ONNX Runtime's, the retrain times the registered
    ONNX file, and the retrain needs no runtime setting (the study keeps its own)."""
    common = (f"+space={micro_space}", *FAST[1:], "search.plots=false")
    fastest = measure_arch(load_space(micro_space).extreme("min"), 10, LatencySettings(runtime=OnnxRuntime(), **QUICK))
    budget = round(fastest.median_ms * 100, 6)  # a budget the networks meet whatever else this machine runs
    search = _cli("nas.search", *common, "trials=2", "latency/runtime=onnxruntime", f"latency.budget_ms={budget}",
                  "search.finalists=2", "search.finalist_epochs=1", "search.finalist_seeds=1",
                  "search.fidelity_sample=0", "search.enqueue_references=false", "search/sampler=random",
                  cwd=tmp_path)  # fmt: skip
    assert search.returncode == 0, search.stderr[-3000:]
    assert "latency in onnxruntime[CPU] on " in search.stdout.splitlines()[0]
    assert "latency measured in onnxruntime[CPU] on " in search.stdout
    study = optuna.load_study(study_name="micro-digits", storage=f"sqlite:///{tmp_path}/outputs/optuna.db")
    trained = [t for t in study.trials if t.user_attrs.get("state") == "complete"]
    assert len(trained) == 2 and all(t.user_attrs["latency_ms"] <= budget for t in trained)
    retrain = _cli("nas.retrain", "study.name=micro-digits", *FAST[1:], "train.epochs=1", "retrain.register=false",
                   cwd=tmp_path)  # fmt: skip
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    assert re.search(r"latency [\d.]+ ms in onnxruntime\[CPU\] \(export/model\.onnx\) \(budget ", retrain.stdout)
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("micro-digits").experiment_id],
                             "tags.`nas.kind` = 'retrain'")[0]  # fmt: skip
    assert run.data.tags["nas.latency_of"] == "onnxruntime[CPU] (export/model.onnx)"
    assert "'name': 'onnxruntime'" in run.data.params["latency.runtime"]


def test_search_with_an_openvino_table_through_the_command_line(tmp_path, micro_space):
    proc = _cli("nas.search", f"+space={micro_space}", *FAST[1:], "search.plots=false", "trials=2",
                "latency/runtime=openvino", "latency.estimator=table", "latency.calibrate=2", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "latency in openvino[CPU,f32] on " in proc.stdout.splitlines()[0]
    tables = list((tmp_path / "outputs" / "latency").glob("table-cpu-b1-openvino-*.json"))
    assert len(tables) == 1
    study = optuna.load_study(study_name="micro-digits", storage=f"sqlite:///{tmp_path}/outputs/optuna.db")
    record = study.user_attrs["latency_table"]
    assert record["settings"]["runtime"]["name"] == "openvino" and record["calibration"]["networks"] == 2


def test_tensorrt_without_tensorrt_or_a_gpu_stops_with_one_line():
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(NasError, match=re.escape("latency/runtime=tensorrt needs TensorRT: pip install tensorrt")):
            make_runtime("tensorrt")
    elif not torch.cuda.is_available():
        with pytest.raises(NasError, match="latency/runtime=tensorrt needs a CUDA GPU"):
            make_runtime("tensorrt")
    else:
        pytest.skip("TensorRT and a GPU are here: test_tensorrt_times_the_network_on_the_gpu checks the runtime")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: TensorRT runs on CUDA only (run "
                    "pytest -m gpu on a GPU machine)")  # fmt: skip
def test_tensorrt_times_the_network_on_the_gpu():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here: pip install tensorrt")
    from nas.latency.tensorrt_runtime import TensorRtRuntime

    for precision in ("fp32", "fp16"):
        settings = LatencySettings(device="cuda", runtime=TensorRtRuntime(precision), warmup=3, repeats=10,
                                   max_cv=10.0)  # fmt: skip
        stats = measure_arch(decode(TINY_ARCH), 10, settings)
        assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
        assert settings.key_fields()["runtime"]["precision"] == precision and "tensorrt" in table_id(settings)

"""The CUDA paths (``pytest -m gpu`` on a GPU machine); each skips, saying why, where there is no CUDA device.

Small and fast: tiny networks, a few hundred digits images. What they check is that the code runs on a
GPU and that what it measures or trains agrees with the eager path, not how fast it is (that is
``benchmarks/``).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nas.latency.measure import LatencySettings, measure_arch, measure_module
from nas.latency.table import arch_components
from nas.space import arch_from_text, decode
from nas.train.run import load_training_data, make_datamodule, train_arch
from tests.conftest import TINY_ARCH, compose_cfg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device here: these tests check the CUDA paths (run pytest -m gpu on a GPU machine)",
    ),
]


def graph_settings() -> LatencySettings:
    return LatencySettings(device="cuda", batch_size=1, mode="cudagraph", warmup=5, repeats=10)


def test_cuda_graph_latency_of_a_network_beats_eager_launches_and_covers_table_components():
    arch = arch_from_text("reference:mobilenet_v3_small", 32)
    GRAPH = graph_settings()
    graphed = measure_arch(arch, 10, GRAPH)
    eager = measure_arch(arch, 10, replace(GRAPH, mode="eager"))
    assert 0 < graphed.median_ms < eager.median_ms  # batch 1 at 32 px is launch-bound when eager
    assert GRAPH.key_fields()["cudnn_benchmark"] is False and "tf32" in GRAPH.key_fields()
    for comp in arch_components(arch, 10)[:3]:  # stem and the first blocks: microseconds each
        stats = measure_module(comp.make(), (1, *comp.input_shape), GRAPH)
        assert 0 < stats.median_ms < graphed.median_ms


class SyncsWithTheHost(torch.nn.Module):
    """A layer that reads a value back to the host in its forward pass: CUDA cannot capture that."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum().item() >= 0 else x


def test_a_network_that_cannot_be_captured_is_timed_eagerly_and_says_so(capsys):
    stats = measure_module(SyncsWithTheHost(), (1, 3, 8, 8), graph_settings())
    assert stats.mode == "eager" and stats.fallback and stats.median_ms > 0
    assert "warning: CUDA-graph capture of the network failed" in capsys.readouterr().err
    captured = measure_arch(decode(TINY_ARCH), 10, graph_settings())  # the CUDA context still captures
    assert captured.mode == "cudagraph" and captured.fallback is None


BASE = ("data=digits", "train.epochs=1", "train.limit_train_images=256", "train.accelerator=gpu", "train.dropout=0.0")
ONE_CYCLE = ("train/schedule=onecycle", "train.schedule.cycle_momentum=false")


@pytest.mark.parametrize("recipe", [("train/optimizer=sgd",), ("train/optimizer=adamw", *ONE_CYCLE)])
def test_graphed_training_gives_the_weights_eager_training_gives(recipe):
    cfg = compose_cfg(*BASE, *recipe)
    graph_cfg = compose_cfg(*BASE, *recipe, "train.cuda_graph=true")
    data = load_training_data(cfg)
    eager = train_arch(cfg, decode(TINY_ARCH), make_datamodule(cfg, data, 16))
    graphed = train_arch(graph_cfg, decode(TINY_ARCH), make_datamodule(graph_cfg, data, 16))
    assert graphed.module.graph_captured and graphed.graph_fallback is None
    for a, b in zip(eager.module.model.state_dict().values(), graphed.module.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=5e-4, rtol=1e-3)


def test_a_failed_trial_gives_its_gpu_memory_back():
    from nas.search.objective import free_trial_memory
    from nas.train.module import NonFiniteLossError

    cfg = compose_cfg("data=digits", "train.epochs=1", "train.limit_train_images=128", "train.accelerator=gpu",
                      "train.optimizer.lr=1e9")  # fmt: skip
    dm = make_datamodule(cfg, load_training_data(cfg), 16)
    free_trial_memory()
    baseline = torch.cuda.memory_allocated()
    with pytest.raises(NonFiniteLossError):
        train_arch(cfg, decode(TINY_ARCH), dm)
    free_trial_memory()
    assert torch.cuda.memory_allocated() <= baseline + (1 << 20)


def test_out_of_memory_in_a_graphed_trial_is_reported_as_such_and_the_next_trial_runs():
    """Review finding G4: an out-of-memory error must surface as one, and leave the CUDA context usable."""
    from nas.search.objective import free_trial_memory

    cfg = compose_cfg(*BASE, "train.cuda_graph=true", "train.batch_size=256", "train.limit_train_images=512")
    data = load_training_data(cfg)
    big = make_datamodule(cfg, data, 224)  # 224 px: activations far beyond the cap below
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated() + (64 << 20)) / total))
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            train_arch(cfg, decode(TINY_ARCH), big)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    free_trial_memory()
    small = make_datamodule(cfg, data, 16)
    assert train_arch(cfg, decode(TINY_ARCH), small).module.graph_captured  # the CUDA context still works

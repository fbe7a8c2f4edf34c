"""The whole training step (forward, loss, backward, optimizer) captured once as a CUDA graph.

At 32x32 the step of a small network is launch-bound: one graph replay instead of a few
hundred kernel launches is what makes a short search trial fast on a GPU. Following
PyTorch's whole-network capture recipe (torch.cuda.graphs): a few eager warm-up steps on
a side stream, then capture, then replay with each new batch copied into fixed input
buffers. Every step is a real training step, warm-up and the capturing one included.

A learning-rate schedule must reach inside the graph: the optimizer reads its rate from
a device tensor per parameter group (fused SGD/Adam/AdamW accept a tensor ``lr``), refilled
from the schedule's float before every step. On a CPU the same step runs eagerly on the
same buffers (nothing to capture), which is how the tests check it against Lightning's
automatic optimization.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from nas.errors import NasError

StepBody = Callable[[torch.Tensor, torch.Tensor], None]

GRAPH_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def graph_ready_optimizer(optimizer: torch.optim.Optimizer, param_groups: list[dict]) -> torch.optim.Optimizer:
    """The same optimizer and settings, rebuilt fused (and capturable on CUDA) over fresh param groups.

    Fused kernels read a tensor learning rate from device memory, so a schedule can change it
    between replays; the foreach path would bake the rate in as a constant at capture time.
    """
    kind = type(optimizer)
    if kind not in GRAPH_OPTIMIZERS:
        names = ", ".join(c.__name__ for c in GRAPH_OPTIMIZERS)
        raise NasError(
            f"train.cuda_graph=true supports the optimizers {names}, not {kind.__name__}; "
            "pick train/optimizer=sgd or adamw, or set train.cuda_graph=false"
        )
    accepted = inspect.signature(kind).parameters  # defaults also hold derived flags (AdamW's decoupling)
    settings = {k: v for k, v in optimizer.defaults.items() if k in accepted} | {"fused": True, "foreach": None}
    device = param_groups[0]["params"][0].device
    if "capturable" in settings:
        settings["capturable"] = device.type == "cuda"  # Adam's capturable path exists only for accelerators
    return kind(param_groups, **settings)


def ddp_refusal(processes: int) -> str:
    """Why a captured step and DDP do not go together: the graph replays one process's step without DDP's
    gradient all-reduce, so every process would train a model of its own on its share of the data."""
    return (
        f"train.cuda_graph=true cannot train with DDP ({processes} processes): the captured step leaves out DDP's "
        "gradient all-reduce, so every process would train its own model. Set train.cuda_graph=false for a "
        "multi-process run"
    )


class GraphedTrainStep:
    """Runs ``body(x, y)`` on fixed buffers: eager for ``warmup`` steps, then as one replayed CUDA graph."""

    def __init__(self, body: StepBody, optimizer: torch.optim.Optimizer, warmup: int = 3) -> None:
        self.body = body
        self.optimizer = optimizer
        self.warmup = warmup
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lrs: list[torch.Tensor] = []
        self.captured_settings: list[dict] = []  # what the graph baked in besides the rate
        self.fallback: str | None = None  # why this network trains eagerly after all (capture failed)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.static is None:
            self._allocate(x, y)
        static_x, static_y = self.static
        if x.shape != static_x.shape or y.shape != static_y.shape:
            raise NasError(
                f"train.cuda_graph=true needs every training batch to have one shape; got {tuple(x.shape)} "
                f"after {tuple(static_x.shape)} (the data module drops the last partial batch; a custom one must too)"
            )
        static_x.copy_(x, non_blocking=True)
        static_y.copy_(y, non_blocking=True)
        for lr, group in zip(self.lrs, self.optimizer.param_groups, strict=True):
            lr.fill_(group["lr"])
        if self.graph is not None:
            self._check_settings()
            self.graph.replay()
        elif not self._captures() or self.fallback is not None:
            self._run_eager()
        elif self.steps < self.warmup:
            self._warm_up()
        elif self._capture():
            self.graph.replay()  # capturing records the kernels without running them
        else:
            self._run_eager()  # this step still trains, eagerly
        self.steps += 1

    def _captures(self) -> bool:
        """Only CUDA has graphs: on a CPU the same step runs eagerly on the same buffers."""
        return self.static is not None and self.static[0].device.type == "cuda"

    def _allocate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static = (torch.empty_like(x), torch.empty_like(y))
        self.lrs = [torch.tensor(float(g["lr"]), device=x.device) for g in self.optimizer.param_groups]

    @contextmanager
    def _tensor_lr(self) -> Iterator[None]:
        """The optimizer sees the device tensors while the body runs, the schedule's floats otherwise."""
        groups = self.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        for g, lr in zip(groups, self.lrs, strict=True):
            g["lr"] = lr
        try:
            yield
        finally:
            for g, value in zip(groups, floats, strict=True):
                g["lr"] = value

    def _run_eager(self) -> None:
        with self._tensor_lr():
            self.body(*self.static)

    def _warm_up(self) -> None:
        # PyTorch's recipe: warm-up iterations on a side stream before capture (lazy init, allocator).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run_eager()
        torch.cuda.current_stream().wait_stream(side)

    def _record(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with self._tensor_lr(), torch.cuda.graph(graph):
            self.body(*self.static)
        return graph

    def _capture(self) -> bool:
        """Capture the step; when the network cannot be captured (an op that syncs with the host, say), it
        trains eagerly instead, with one warning line and the reason kept in ``fallback``."""
        try:
            self.graph = self._record()
        except torch.cuda.OutOfMemoryError:
            raise  # reported as out of memory, like any other step's
        except RuntimeError as err:
            self.graph = None
            self.fallback = (str(err).strip().splitlines() or ["RuntimeError"])[0][:300]
            self.optimizer.zero_grad(set_to_none=True)  # nothing recorded during the capture ever ran
            print(f"warning: CUDA-graph capture of the training step failed ({self.fallback}); "
                  "this network trains eagerly", file=sys.stderr, flush=True)  # fmt: skip
            return False
        self.captured_settings = self._settings()
        return True

    def _settings(self) -> list[dict]:
        """Every optimizer setting except the rate (momentum, betas, weight decay...), per group."""
        keys = [k for k in self.optimizer.defaults if k != "lr"]
        return [{k: g.get(k) for k in keys} for g in self.optimizer.param_groups]

    def _check_settings(self) -> None:
        """A replay runs with the settings the capture saw; a schedule that moves any of them (one-cycle's
        momentum) would otherwise train silently differently from the eager step."""
        now = self._settings()
        if now == self.captured_settings:
            return
        for before, after in zip(self.captured_settings, now, strict=True):
            changed = next((k for k in before if before[k] != after[k]), None)
            if changed is not None:
                raise NasError(
                    f"the optimizer's {changed} changed from {before[changed]} to {after[changed]} after the "
                    "training step was captured as a CUDA graph, which keeps the captured value; keep it fixed "
                    "(e.g. train.schedule.cycle_momentum=false) or set train.cuda_graph=false"
                )

    def release(self) -> None:
        """Free the graph and its private memory pool (gradients live there after capture)."""
        self.graph = None
        self.static = None
        self.optimizer.zero_grad(set_to_none=True)

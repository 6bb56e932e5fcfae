"""The throughput monitor: it reads nothing from the device between its reads (checked with fake tensors, whose
values cannot be read: a read raises), and what it logs at a read is the count of the micro batches since the
previous one (samples, real tokens, FLOPs of the summed shapes)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_vargpt_model import TINY_IDS, make_batch
from torch._subclasses.fake_tensor import FakeTensorMode

from vargpt.model import build_vargpt, load_model_config
from vargpt.training.callbacks import ThroughputMonitor
from vargpt.training.flops import BatchShape, VARGPTFlops

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_vargpt(load_model_config(CONF / "model" / "tiny.yaml"), TINY_IDS)


class Loop:
    """What the monitor sees of Lightning: accumulation, the step counter, the log cadence, one device."""

    def __init__(self, accumulate: int, log_every: int) -> None:
        self.accumulate, self.micro = accumulate, 0
        strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=lambda t, reduce_op: t)
        self.trainer = SimpleNamespace(
            global_step=0,
            log_every_n_steps=log_every,
            world_size=1,
            precision="32-true",
            strategy=strategy,
            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_should_accumulate=self._should_accumulate)),
        )
        self.logged: list[dict[str, float]] = []

    def _should_accumulate(self) -> bool:
        return self.micro % self.accumulate != 0

    def module(self, model: torch.nn.Module) -> SimpleNamespace:
        return SimpleNamespace(model=model, log_dict=lambda metrics, **_: self.logged.append(dict(metrics)))

    def micro_batch(self, monitor: ThroughputMonitor, module: SimpleNamespace, batch: dict) -> None:
        self.micro += 1
        if not self._should_accumulate():
            self.trainer.global_step += 1
        monitor.on_train_batch_end(self.trainer, module, None, batch, self.micro - 1)


def batches(model: torch.nn.Module, n: int) -> list[dict]:
    return [make_batch(model, n_und=1 + i % 2, n_gen=i % 3, seed=i) for i in range(n)]


def test_no_reads_between_log_steps(tiny):
    """Four optimizer steps of two micro batches, logging every 4th step: nothing is read before it (fake
    tensors raise on any read), and the read at step 4 is the only one."""
    loop = Loop(accumulate=2, log_every=4)
    monitor, module = ThroughputMonitor(window=1), loop.module(tiny)
    monitor.on_train_start(loop.trainer, module)
    mode = FakeTensorMode()
    fake = [{k: mode.from_tensor(v) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches(tiny, 7)]
    with mode:
        for batch in fake:
            loop.micro_batch(monitor, module, batch)
    assert loop.logged == [] and loop.trainer.global_step == 3
    with pytest.raises(Exception, match="_local_scalar_dense|data-dependent"), mode:
        loop.micro_batch(monitor, module, fake[0])  # step 4 is a log step: the one read


def test_logged_rates_count_the_interval(tiny):
    loop = Loop(accumulate=2, log_every=1)
    monitor, module = ThroughputMonitor(window=2), loop.module(tiny)
    monitor.on_train_start(loop.trainer, module)
    data = batches(tiny, 8)
    for batch in data[:4]:
        loop.micro_batch(monitor, module, batch)
    assert len(loop.logged) == 1  # window=2: the first read after two optimizer steps
    for batch in data[4:]:
        loop.micro_batch(monitor, module, batch)
    assert len(loop.logged) == 2
    shapes = [BatchShape.from_batch(b) for b in data[4:]]
    total = sum(shapes[1:], shapes[0])
    metrics = loop.logged[-1]
    seconds = 2 * metrics["perf/step_time"]
    assert metrics["perf/samples_per_sec"] * seconds == pytest.approx(total.samples)
    assert metrics["perf/tokens_per_sec"] * seconds == pytest.approx(total.real_tokens)
    flops = VARGPTFlops(tiny)(total).total
    assert metrics["perf/tflops_per_sec_per_device"] * 1e12 * seconds == pytest.approx(flops)
    monitor.on_train_end(loop.trainer, module)
    everything = sum((BatchShape.from_batch(b) for b in data), BatchShape())
    assert monitor.stats.samples == everything.samples and monitor.stats.tokens == everything.real_tokens
    assert monitor.stats.steps == 4

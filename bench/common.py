"""Helpers shared by the bench scripts: ``key=value`` arguments, configs without Hydra, timing, memory, tables.

The bench scripts run where only torch, transformers and PyYAML exist (the GPU image has no hydra-core,
omegaconf, webdataset, mlflow or open_clip), so nothing here imports those at module level:

* ``load_model_cfg`` reads ``conf/model/*.yaml`` with ``vargpt.model.load_model_config`` (OmegaConf) when
  omegaconf is installed, else with PyYAML into the same ``ModelConfig`` dataclasses (same overrides syntax);
* ``load_stage`` reads ``conf/stage/<name>.yaml`` with PyYAML (the stage's ``trainable`` prefixes and batch).

Importing this module has no side effects; ``vargpt`` must be importable (installed, or ``PYTHONPATH=src``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import json
import os
import platform
import resource
import statistics
import sys
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml

from vargpt.model import load_model_config
from vargpt.model.config import REPO_ROOT, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


# ------------------------------------------------------------------------------------------------ arguments
def parse_value(text: str) -> Any:
    """YAML-ish scalar: true/false, null, int, float, comma list (``1,8,32``), else the string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("null", "none", "~"):
        return None
    if "," in text:
        return [parse_value(t) for t in text.split(",") if t.strip()]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_args(
    argv: Sequence[str] | None, defaults: dict[str, Any], doc: str, prefixes: Iterable[str] = ("model.",)
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Hydra-style ``key=value`` arguments against ``defaults``; ``-h``/``--help`` prints ``doc`` and exits.

    Keys under one of ``prefixes`` (e.g. ``model.llm.num_hidden_layers=4``) are collected verbatim per prefix
    (without it) for the config loaders. An unknown key is an error listing the known ones.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(doc.strip())
        print("\narguments (key=value, defaults):")
        for k, v in defaults.items():
            print(f"  {k}={_show(v)}")
        raise SystemExit(0)
    args = dict(defaults)
    extra: dict[str, list[str]] = {p: [] for p in prefixes}
    for a in argv:
        if "=" not in a:
            raise SystemExit(f"argument {a!r} is not key=value (try --help)")
        key, value = a.split("=", 1)
        key = key.lstrip("+").strip()
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is not None:
            extra[prefix].append(f"{key[len(prefix) :]}={value}")
            continue
        if key not in defaults:
            raise SystemExit(f"unknown argument {key!r}; known: {', '.join(defaults)} (and model.*)")
        v = parse_value(value)
        if isinstance(defaults[key], list) and not isinstance(v, list):
            v = [v]
        args[key] = v
    return args, extra


def _show(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    if isinstance(v, bool):
        return str(v).lower()
    return "null" if v is None else str(v)


# ------------------------------------------------------------------------------------------------ configs
def model_yaml(name: str) -> Path:
    """``conf/model/<name>.yaml`` or a yaml path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return p
    path = CONF / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(q.stem for q in (CONF / "model").glob("*.yaml"))
        raise SystemExit(f"no model config {name!r}: {known} or a yaml path")
    return path


def load_model_cfg(name: str, overrides: Sequence[str] = ()) -> Any:
    """A validated ``ModelConfig`` from ``conf/model/<name>.yaml`` (or a path) and dotted overrides."""
    path = model_yaml(name)
    try:
        import omegaconf  # noqa: F401 - a probe: the GPU image has no omegaconf
    except ImportError:
        return _load_model_cfg_yaml(path, overrides)
    return load_model_config(path, list(overrides))


def _load_model_cfg_yaml(path: Path, overrides: Sequence[str]) -> Any:
    """PyYAML fallback of ``load_model_config``; the one interpolation the model files use is ``${vargpt_repo:}``."""
    data = yaml.safe_load(path.read_text().replace("${vargpt_repo:}", str(REPO_ROOT))) or {}
    for item in overrides:
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    cfg = _build_dataclass(ModelConfig, data, "model")
    cfg.vqvae.validate()
    return cfg


def _build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if f.name not in data:
            if typing.get_origin(hint) is tuple and isinstance(f.default, tuple):
                kwargs[f.name] = list(f.default)  # as OmegaConf.to_object returns sequences
            continue
        value = data[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _build_dataclass(hint, value, f"{where}.{f.name}")
        elif typing.get_origin(hint) is tuple and isinstance(value, tuple | list):
            value = list(value)
        elif isinstance(hint, type) and issubclass(hint, enum.Enum):
            allowed = [m.value for m in hint]
            if value not in allowed:
                raise ValueError(f"{where}.{f.name}: {value!r} is not one of {allowed}")
            value = hint(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def load_stage(name: str) -> dict[str, Any]:
    """The ``stage`` node of ``conf/stage/<name>.yaml`` (name, trainable prefixes, global batch...)."""
    path = CONF / "stage" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(q.stem for q in (CONF / "stage").glob("*.yaml"))
        raise SystemExit(f"no stage {name!r}: {known}")
    return yaml.safe_load(path.read_text())["stage"]


# ------------------------------------------------------------------------------------------------ device
def pick_device(name: str) -> torch.device:
    if name in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Dense (no sparsity) tensor-core peaks from the datasheets, in FLOP/s: bf16/fp16, and tf32 for fp32 matmuls.
# Matched as substrings of torch.cuda.get_device_name, first match wins (H100 NVL/PCIe before plain H100).
GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.4e12, 494.7e12),
    ("GH200", 989.4e12, 494.7e12),
    ("H100 NVL", 835e12, 417.5e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989.4e12, 494.7e12),  # SXM
    ("H800", 989.4e12, 494.7e12),
    ("A100", 312e12, 156e12),
    ("A800", 312e12, 156e12),
    ("L40S", 362.05e12, 183e12),
    ("L4", 121e12, 60e12),
    ("A10G", 70e12, 35e12),
    ("RTX 4090", 165.2e12, 82.6e12),
)


def peak_flops(device: torch.device, bf16: bool, override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): a given value, the GPU datasheet, or a measured CPU matmul."""
    if override_tflops:
        return float(override_tflops) * 1e12, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, p_bf16, p_tf32 in GPU_PEAKS:
            if key in name:
                return (p_bf16 if bf16 else p_tf32), f"datasheet dense {'bf16' if bf16 else 'tf32'}"
        return float("nan"), f"unknown GPU {name!r}: pass peak_tflops="
    return measured_matmul_flops(device, torch.bfloat16 if bf16 else torch.float32), "measured CPU matmul"


_MATMUL_CACHE: dict[tuple[str, torch.dtype], float] = {}


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul: the CPU's achievable peak (noisy on a shared machine)."""
    key = (str(device), dtype)
    if key not in _MATMUL_CACHE:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = min(best, time.perf_counter() - t0)
        _MATMUL_CACHE[key] = 2.0 * n**3 / best
    return _MATMUL_CACHE[key]


# ------------------------------------------------------------------------------------------------ memory
def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA allocator stats, or the process's RSS high-water mark (Linux clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak then covers the whole process


def cpu_memory_returns_to_os() -> None:
    """Make glibc give freed tensor memory back at once (fixed 64 KiB mmap threshold), so that the RSS between
    steps is what the process holds and the RSS peak of a step shows its activations. Linux/glibc only."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also turns off glibc's dynamic threshold)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_memory_gib(device: torch.device) -> float:
    """CUDA ``max_memory_allocated``, or the process's peak resident memory (RSS) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


# ------------------------------------------------------------------------------------------------ timing
def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (synced)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


class PhaseTimer:
    """Per-phase times of one step without host syncs between phases: CUDA events on a GPU, clocks on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def seconds(self) -> dict[str, float]:
        """Seconds from each mark to the next (call after a sync), keyed by the later mark's name."""
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:], strict=False):
            out[name] = a.elapsed_time(b) / 1e3 if self.cuda else b - a
        return out


# ------------------------------------------------------------------------------------------------ output
def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    sys.stdout.flush()


def write_json(path: str | None, record: dict[str, Any]) -> None:
    """Append one JSON line to ``path`` (the GPU script's results file); nothing when path is empty."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def environment() -> dict[str, str]:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    info["transformers"] = transformers.__version__
    return info

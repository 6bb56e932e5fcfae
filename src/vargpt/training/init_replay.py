"""The seeded initialisation of a model built on the meta device, recorded while it is built and replayed one
parameter at a time: the same values as building it whole on the host, bit for bit, holding one parameter.

While the model is built (``vargpt.training.materialize.build_on_meta``), every in-place operation on a
parameter (``uniform_``, ``normal_``, ``erfinv_``, ``mul_``, ``zero_`` ..., on the parameter or on a view of
it) is recorded with the view's geometry (size, stride, storage offset) and its scalar arguments. A random one
also records the host generator's state before it, then runs on a host scratch tensor of the same geometry so
that the generator advances exactly as when the model is built for real (the next parameter draws the same
numbers). :meth:`InitRecord.replay` later redoes one parameter's operations on a host tensor from its
recorded states: the caller keeps its shard's rows and drops the rest.

Anything the record cannot replay exactly makes it refuse (``InitRecord.refused`` says why) and the caller
builds the model whole: an operation on a parameter with a tensor argument that is another parameter, an
explicit generator, a parameter whose storage was replaced (``param.data = ...``), writes through ``out=``.
The cost is the initialisation's compute twice on every rank (once to advance the generator, once for the
replay), against holding the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# The in-place operations that draw from the generator (their values depend on its state and the geometry).
RANDOM_OPS = {"uniform_", "normal_", "bernoulli_", "random_", "exponential_", "cauchy_", "log_normal_", "geometric_"}
# torch.nn.init functions that do nothing on the meta device (and whose draws depend on the values drawn, such as
# trunc_normal_'s rejection loop): recorded as one step each, run whole on the scratch and in the replay.
OPAQUE_INITS = ("trunc_normal_", "orthogonal_", "sparse_")
# How a parameter's host tensor is made when its value does not matter (nn.Linear, nn.Embedding, ...).
EMPTY_OPS = (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default)


@dataclass
class Step:
    """One in-place operation on (a view of) a parameter: ``op(view, *args, **kwargs)``."""

    op: Any
    geometry: tuple[tuple[int, ...], tuple[int, ...], int]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    # The host generator's state before a random operation; None for a deterministic one.
    rng_state: torch.Tensor | None


def storage_key(t: torch.Tensor) -> int:
    """The identity of a tensor's storage (shared by its views and its ``.data``)."""
    return t.untyped_storage()._cdata


@dataclass
class InitRecord:
    """The recorded initialisation of every parameter created while :class:`RecordInit` was active."""

    # storage key -> (parameter as created, its host initial value when not created by torch.empty)
    params: dict[int, tuple[nn.Parameter, torch.Tensor | None]] = field(default_factory=dict)
    steps: dict[int, list[Step]] = field(default_factory=dict)
    refused: str | None = None
    # One host buffer per dtype, reused by every replay (see ``host_buffer``).
    buffers: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def add_param(self, meta: nn.Parameter, created: torch.Tensor | None) -> None:
        """A new parameter on the meta device; ``created``: its host value when it was made by anything but
        ``torch.empty`` (e.g. ``torch.randn``), which the steps then start from."""
        self.params[storage_key(meta)] = (meta, created)
        self.steps[storage_key(meta)] = []

    def check_model(self, model: nn.Module) -> None:
        """Refuse when a parameter of ``model`` is not one this record saw created (its storage was replaced)."""
        for name, p in model.named_parameters():
            if storage_key(p) not in self.params and self.refused is None:
                self.refused = f"{name}: not created as recorded (its storage was replaced)"

    @torch.no_grad()
    def replay(self, param: torch.Tensor) -> torch.Tensor:
        """The host value ``param`` (a meta parameter of the recorded model) had after its initialisation: a view
        of a buffer the next replay overwrites (copy what you keep)."""
        meta, created = self.params[storage_key(param)]
        numel = meta.untyped_storage().nbytes() // meta.element_size()
        flat = host_buffer(self.buffers, numel, meta.dtype)
        if created is not None:
            flat.copy_(created.reshape(-1))
        saved = torch.get_rng_state()
        try:
            for step in self.steps[storage_key(param)]:
                if step.rng_state is not None:
                    torch.set_rng_state(step.rng_state)
                step.op(flat.as_strided(*step.geometry), *step.args, **step.kwargs)
        finally:
            torch.set_rng_state(saved)
        return flat.as_strided(tuple(meta.shape), meta.stride(), meta.storage_offset())


class RecordInit(TorchDispatchMode):
    """Records every in-place operation on the record's parameters (see the module docstring)."""

    def __init__(self, record: InitRecord) -> None:
        super().__init__()
        self.record = record
        # Storages made by torch.empty since the last parameter was registered (their values are not data).
        self.empty_storages: set[int] = set()
        # The scratch the random steps run on, one per dtype, reused (see ``host_buffer``).
        self.scratch: dict[torch.dtype, torch.Tensor] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else None
        if func._schema.is_mutable and self.record.refused is None:
            self._note(func, target, args, kwargs)
        out = func(*args, **kwargs)
        if func in EMPTY_OPS:
            self.empty_storages.add(storage_key(out))
        return out

    def __enter__(self) -> RecordInit:
        self._inits = {name: getattr(nn.init, name) for name in OPAQUE_INITS}
        for name, fn in self._inits.items():
            setattr(nn.init, name, self._recorded(fn))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self._inits.items():
            setattr(nn.init, name, fn)
        super().__exit__(*exc)

    def _recorded(self, fn: Any) -> Any:
        """``fn`` (an ``nn.init`` function) recorded as one random step when it gets a meta tensor."""

        def recorded(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not tensor.is_meta:
                return fn(tensor, *args, **kwargs)
            if kwargs.get("generator") is not None:
                self.record.refused = f"nn.init.{fn.__name__}: an explicit generator"
            self._step(fn, tensor, args, kwargs, random=True)
            return tensor

        return recorded

    def _step(self, op: Any, target: torch.Tensor, args: tuple, kwargs: dict, random: bool) -> None:
        """Record ``op(target, *args, **kwargs)``; a random one advances the host generator on a scratch tensor."""
        geometry = (tuple(target.shape), tuple(target.stride()), target.storage_offset())
        state = None
        if random:
            state = torch.get_rng_state()
            extent = 1 + sum((n - 1) * st for n, st in zip(geometry[0], geometry[1], strict=True))
            scratch = host_buffer(self.scratch, extent, target.dtype)
            op(scratch.as_strided(geometry[0], geometry[1]), *args, **kwargs)
        key = self._key(target)
        if key is not None:
            host_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
            self.record.steps[key].append(Step(op, geometry, host_args, dict(kwargs), state))

    def register(self, meta: nn.Parameter, created: torch.Tensor) -> None:
        """Record a parameter moved to the meta device from its host tensor ``created``."""
        self.record.add_param(meta, None if storage_key(created) in self.empty_storages else created.detach())
        self.empty_storages.clear()

    def _note(self, func: Any, target: Any, args: tuple, kwargs: dict) -> None:
        written = [a for a, spec in zip(args, func._schema.arguments, strict=False) if _writes(spec)]
        written += [v for k, v in kwargs.items() if _writes_named(func, k)]
        tracked = [t for t in written if isinstance(t, torch.Tensor) and t.is_meta and self._key(t) is not None]
        if not tracked:
            return
        name = func.overloadpacket.__name__
        if tracked[0] is not target or len(tracked) > 1 or not name.endswith("_"):
            self.record.refused = f"{func}: writes a parameter other than in place"
            return
        rest = [*args[1:], *kwargs.values()]
        if any(isinstance(a, torch.Tensor) and (a.is_meta or a.numel() > 1) for a in rest):
            self.record.refused = f"{func}: a tensor argument (another parameter's value?)"
            return
        if kwargs.get("generator") is not None:
            self.record.refused = f"{func}: an explicit generator"
            return
        self._step(func, target, args[1:], kwargs, random=name in RANDOM_OPS)

    def _key(self, t: torch.Tensor) -> int | None:
        key = storage_key(t)
        return key if key in self.record.params else None


def host_buffer(buffers: dict[torch.dtype, torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``numel`` elements of the reused buffer of ``dtype`` in ``buffers``, grown (doubling) when too small.

    One buffer instead of a fresh tensor per parameter: freed blocks under the allocator's mmap threshold (up to
    32 MB) stay in the heap, and a heap cut up by small allocations in between (the generator states) grows by
    about the whole model over a record or a replay."""
    have = buffers.get(dtype)
    if have is None or have.numel() < numel:
        buffers[dtype] = have = torch.empty(max(numel, 2 * (0 if have is None else have.numel())), dtype=dtype)
    return have[:numel]


def _writes(spec: Any) -> bool:
    return spec.alias_info is not None and spec.alias_info.is_write


def _writes_named(func: Any, name: str) -> bool:
    return any(s.name == name and _writes(s) for s in func._schema.arguments)

"""Reading the state-dict lists of the released checkpoints (``<shared>/reference/<name>.state_dict.txt``).

Each list has ``#`` comment lines and one ``key (d0, d1, ...) dtype`` line per tensor. Tests compare the keys and
shapes of our modules against them, so a checkpoint that cannot be downloaded here still pins our layout. The
shared folder is ``$VARGPT_SHARED_DIR`` when set, else ``shared/`` next to the repository checkout; a test that
needs a missing list is skipped, not failed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

_LINE = re.compile(r"^(?P<key>\S+) \((?P<shape>[\d, ]*)\) (?P<dtype>\S+)$")


def reference_dir() -> Path:
    env = os.environ.get("VARGPT_SHARED_DIR")
    shared = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    return shared / "reference"


def load_reference(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype)}`` of ``<name>.state_dict.txt``, in file order; skips the test if it is missing."""
    path = reference_dir() / f"{name}.state_dict.txt"
    if not path.is_file():
        pytest.skip(f"reference list {path} not found (set VARGPT_SHARED_DIR to the folder holding reference/)")
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"{path}:{lineno}: cannot parse {line!r}")
        shape = tuple(int(s) for s in m["shape"].split(",") if s.strip())
        out[m["key"]] = (shape, m["dtype"])
    return out


def state_dict_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The same ``{key: (shape, dtype)}`` view of a live state dict (works on the meta device)."""
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state_dict.items()}

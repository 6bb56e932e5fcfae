"""The files of an evaluation run: predictions as JSON lines (appended batch by batch, resumable) and the
``run.json`` that records what defines them (predictions made with other settings are never resumed or scored).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
SCORES = "scores.json"
RUN_FILE = "run.json"


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The records of a predictions file; a last line cut short by an interrupted write is dropped (and cut
    from the file, so appending continues cleanly). A broken line elsewhere is an error."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not valid JSON; delete the file to start over") from None
            log.warning("%s: dropping an incomplete last line (interrupted write)", path)
    if lines[-1]:  # the file does not end with a newline: rewrite it from the complete records
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def append_records(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Append records as JSON lines and flush; returns how many."""
    n = 0
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
    return n


def _differences(previous: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """One line per setting that differs: ``key: old -> new``; for the benchmark files, which ones changed."""
    lines = []
    for key in sorted(set(previous) | set(settings)):
        old, new = previous.get(key), settings.get(key)
        if old == new:
            continue
        if key == "files":  # {file: [size, mtime]}: name the files, not their numbers
            old, new = old or {}, new or {}
            changed = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            lines.append(f"  files: added, removed or rewritten since: {', '.join(changed[:5])}{more}")
        else:
            lines.append(f"  {key}: {json.dumps(old)} -> {json.dumps(new)}")
    return lines


def check_run_file(folder: Path, settings: Mapping[str, Any]) -> None:
    """Write ``run.json`` with what defines the predictions; refuse to resume predictions made otherwise.

    Raises:
        ValueError: the folder holds predictions and its ``run.json`` (or its absence) differs from ``settings``;
            the message lists every difference and the two ways out.
    """
    path = folder / RUN_FILE
    settings = json.loads(json.dumps(settings))  # normalise tuples etc.
    if any(folder.glob("*.jsonl")):
        previous = json.loads(path.read_text()) if path.is_file() else {}
        if previous != settings:
            raise ValueError(
                f"{folder} holds predictions made with other settings ({path}):\n"
                + "\n".join(_differences(previous, settings))
                + f"\nThey are not resumed or scored. Use another out_dir (or run_name), or delete {folder} to "
                "start this benchmark over."
            )
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))

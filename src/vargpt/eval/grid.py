"""Picture of a shapes evaluation: generated images above the world's ground truth for the same instructions.

    python -m vargpt.eval.grid logs/eval/<run>/shapes --out docs/demo_grid.png

Reads the ``t2i_predictions.jsonl`` and ``images/`` that ``src/eval.py`` wrote; each column is one held-out
instruction: the model's image (or a gray tile when it drew none) over ``render_scene`` of the asked scene.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from vargpt.data.shapes import Scene, render_scene
from vargpt.eval.callbacks import image_grid


def demo_grid(shapes_dir: Path, n: int = 8, size: int = 64) -> Image.Image:
    records = [json.loads(line) for line in (shapes_dir / "t2i_predictions.jsonl").read_text().splitlines()][:n]
    generated, truth, captions = [], [], []
    for r in records:
        path = shapes_dir / "images" / f"{r['id']}.png"
        generated.append(Image.open(path).convert("RGB") if path.is_file() else None)
        truth.append(render_scene(Scene.from_dict(r["scene"]), size))
        captions.append(r["prompt"])
    return image_grid(generated + truth, captions + ["ground truth"] * len(truth), columns=len(records))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes_dir", type=Path, help="<eval out_dir>/shapes")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("-n", type=int, default=8)
    args = ap.parse_args(argv)
    demo_grid(args.shapes_dir, args.n).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()

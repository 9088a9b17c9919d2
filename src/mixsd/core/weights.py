"""Checks of weight files before a loader reads them: a truncated or foreign `.safetensors` or `.gguf`
file becomes one InputError naming the file and what is wrong with it, instead of a traceback from deep
inside safetensors or the GGUF reader (`header too large`, `unpack_from requires a buffer ...`).

Only the headers are read, and the file's size is compared with the bytes they say the tensors take, so
a check costs milliseconds whatever the size of the model. Damage inside the tensor data itself (flipped
bits) is not detectable without checksums and is not looked for.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

from mixsd.core.files import InputError

REDOWNLOAD = "copy or download it again"


def check_weight_folder(folder: str | os.PathLike) -> None:
    """Check every `.safetensors` file of a model or adapter folder (all shards)."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(path)


def check_safetensors(path: str | os.PathLike) -> None:
    """A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
    byte range, then the data; refuse a file whose header is unreadable or whose data is cut short."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InputError(f"truncated: {size} bytes, too short for a safetensors file", path)
            header_length = struct.unpack("<Q", prefix)[0]
            if header_length > size - 8:
                raise InputError(
                    f"not a safetensors file, or truncated: its first bytes announce a header of "
                    f"{header_length} bytes, the file holds {size} ({REDOWNLOAD})",
                    path,
                )
            raw = handle.read(header_length)
    except OSError as err:
        raise InputError(f"cannot read this weight file ({err.strerror or err})", path) from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        data_end = max(
            (int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
            default=0,
        )
    except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError):
        raise InputError(
            f"not a safetensors file: its header is no tensor table ({REDOWNLOAD})", path
        ) from None
    needed = 8 + header_length + data_end
    if size < needed:
        raise InputError(
            f"truncated: its tensors need {needed} bytes, the file holds {size} ({REDOWNLOAD})", path
        )


# GGUF metadata value types -> size in bytes of the fixed-size ones (8 is a string, 9 an array)
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Truncated(Exception):
    pass


class _Reader:
    """Little-endian reads from a mapped file that stop at its end (`_Truncated`), never past it."""

    def __init__(self, data: Any, size: int):
        self.data, self.size, self.pos = data, size, 0

    def take(self, length: int) -> int:
        if length < 0 or self.pos + length > self.size:
            raise _Truncated
        start, self.pos = self.pos, self.pos + length
        return start

    def unpack(self, fmt: str) -> Any:
        start = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.data, start)[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        start = self.take(length)
        return bytes(self.data[start : start + length]).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _GGUF_SCALAR_SIZES:
            start = self.take(_GGUF_SCALAR_SIZES[kind])
            return bytes(self.data[start : start + _GGUF_SCALAR_SIZES[kind]])
        if kind == _GGUF_STRING:
            return self.string()
        if kind == _GGUF_ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if item_kind in _GGUF_SCALAR_SIZES:
                self.take(count * _GGUF_SCALAR_SIZES[item_kind])
            else:
                if count * 8 > self.size - self.pos:  # every string or array takes at least 8 bytes
                    raise _Truncated
                for _ in range(count):
                    self.value(item_kind)
            return None
        raise ValueError(f"unknown metadata value type {kind} at byte {self.pos - 4}")


def check_gguf(path: str | os.PathLike) -> None:
    """Walk a GGUF file's header (magic, version, metadata, tensor table) within the file's bounds and
    compare the file's size with the end of its last tensor; refuse a foreign, damaged or cut file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 4 or handle.read(4) != b"GGUF":
                raise InputError(
                    "not a GGUF file: it does not start with the bytes GGUF (a damaged download, or "
                    "another format under a .gguf name)",
                    path,
                )
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                needed = _gguf_size(_Reader(data, size))
    except InputError:
        raise
    except OSError as err:
        raise InputError(f"cannot read this GGUF file ({err.strerror or err})", path) from None
    except _Truncated:
        raise InputError(
            f"truncated: the file ends inside its header ({size} bytes) ({REDOWNLOAD})", path
        ) from None
    except ValueError as err:
        raise InputError(f"damaged GGUF header: {err} ({REDOWNLOAD})", path) from None
    if size < needed:
        raise InputError(
            f"truncated: its tensors need {needed} bytes, the file holds {size} ({REDOWNLOAD})", path
        )


def _gguf_size(reader: _Reader) -> int:
    """The size a complete file with this header has: the end of its furthest tensor."""
    reader.take(4)  # the magic
    version = reader.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (this reader knows versions 2 and 3)")
    tensor_count, metadata_count = reader.unpack("<Q"), reader.unpack("<Q")
    alignment = 32
    for _ in range(metadata_count):
        key = reader.string()
        kind = reader.unpack("<I")
        value = reader.value(kind)
        if key == "general.alignment" and kind == 4:
            alignment = struct.unpack("<I", value)[0] or 32
    block_sizes = _ggml_block_sizes()
    data_end = 0
    for _ in range(tensor_count):
        name = reader.string()
        dims = [reader.unpack("<Q") for _ in range(reader.unpack("<I"))]
        kind, offset = reader.unpack("<I"), reader.unpack("<Q")
        if block_sizes is not None:
            if kind not in block_sizes:
                raise ValueError(f"tensor {name!r} has the unknown type {kind}")
            elements = 1
            for dim in dims:
                elements *= dim
            block, block_bytes = block_sizes[kind]
            data_end = max(data_end, offset + elements // block * block_bytes)
        else:
            data_end = max(data_end, offset)
    data_start = -(-reader.pos // alignment) * alignment
    return data_start + data_end


def _ggml_block_sizes() -> dict[int, tuple[int, int]] | None:
    """Tensor type -> (elements per block, bytes per block), from the gguf package (None without it)."""
    try:
        from gguf.constants import GGML_QUANT_SIZES  # gguf is optional: without it, no block sizes
    except ImportError:
        return None
    return {int(kind): (int(block), int(size)) for kind, (block, size) in GGML_QUANT_SIZES.items()}

"""Read and check a GGUF file's header without loading its tensors.

The header holds the metadata (architecture, expert count, ...) and a table of every tensor
(name, shape, quantization type, offset into the data section). From the table the file's
expected size follows, so a truncated download is caught in milliseconds instead of deep
inside transformers. A small reader instead of gguf.GGUFReader, which parses every tokenizer
array (seconds on a real model).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value types: struct format of the scalars; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
            11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a readable GGUF model; the message is one line naming the file."""


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    type: int  # ggml quantization type
    offset: int  # from the start of the data section


@dataclass
class Header:
    path: Path
    version: int
    metadata: dict  # scalar and string values (arrays skipped)
    tensors: list[Tensor] = field(default_factory=list)
    data_start: int = 0  # byte where the tensor data begins
    file_size: int = 0

    @property
    def expected_size(self) -> int:
        """Bytes the file must have to hold every tensor of its table."""
        return self.data_start + max((t.offset + tensor_bytes(t) for t in self.tensors),
                                     default=0)


def _quant_sizes() -> dict[int, tuple[int, int]]:
    """ggml type -> (elements per block, bytes per block), from the gguf package."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


def tensor_bytes(tensor: Tensor) -> int:
    block, size = _quant_sizes()[tensor.type]
    count = 1
    for n in tensor.shape:
        count *= n
    return count // block * size


class _Reader:
    """Little-endian reads that fail with one line when the file ends early."""

    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def _bytes(self, n: int) -> bytes:
        data = self.f.read(n) if n <= self.size else b""
        if len(data) != n:
            raise GGUFError(f"Model file '{self.path}' is truncated: its header ends early "
                            f"(at byte {self.f.tell()} of {self.size}); download it again")
        return data

    def scalar(self, fmt: str):
        return struct.unpack("<" + fmt, self._bytes(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        return self._bytes(self.scalar("Q")).decode("utf-8", errors="replace")

    def skip(self, value_type: int) -> None:
        if value_type == _STRING:
            self._bytes(self.scalar("Q"))
        elif value_type == _ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in _SCALARS:
                self._bytes(count * struct.calcsize(_SCALARS[item_type]))
            else:
                for _ in range(count):
                    self.skip(item_type)
        elif value_type in _SCALARS:
            self._bytes(struct.calcsize(_SCALARS[value_type]))
        else:
            raise GGUFError(f"Model file '{self.path}' has a corrupt header (value type "
                            f"{value_type} at byte {self.f.tell()}); download it again")


def read_header(path: str | Path) -> Header:
    """The metadata and tensor table of a GGUF file; raises GGUFError (one line)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        magic = f.read(4)
        if magic != MAGIC:
            raise GGUFError(f"Model file '{path}' is not a GGUF file (it starts with "
                            f"{magic!r}, not b'GGUF')")
        version = r.scalar("I")
        if version not in (2, 3):
            raise GGUFError(f"Model file '{path}' is GGUF version {version}; only versions "
                            "2 and 3 are supported")
        tensor_count, kv_count = r.scalar("Q"), r.scalar("Q")
        metadata = {}
        for _ in range(kv_count):
            key, value_type = r.string(), r.scalar("I")
            if value_type in _SCALARS:
                metadata[key] = r.scalar(_SCALARS[value_type])
            elif value_type == _STRING:
                metadata[key] = r.string()
            else:
                r.skip(value_type)
        tensors = []
        for _ in range(tensor_count):
            name = r.string()
            shape = tuple(r.scalar("Q") for _ in range(r.scalar("I")))
            tensors.append(Tensor(name, shape, r.scalar("I"), r.scalar("Q")))
        alignment = int(metadata.get("general.alignment") or DEFAULT_ALIGNMENT)
        data_start = -(-f.tell() // alignment) * alignment
    header = Header(path, version, metadata, tensors, data_start, size)
    unknown = next((t for t in tensors if t.type not in _quant_sizes()), None)
    if unknown is not None:
        raise GGUFError(f"Model file '{path}': tensor '{unknown.name}' has unknown type "
                        f"{unknown.type}; the file is corrupt or newer than the gguf package")
    return header


def check(path: str | Path) -> Header:
    """read_header, plus: the file holds a model (tensors) and is as long as its table says."""
    header = read_header(path)
    if not header.tensors:
        raise GGUFError(f"Model file '{path}' holds no tensors: it is not a model")
    if header.file_size < header.expected_size:
        raise GGUFError(f"Model file '{path}' is truncated: its tensors need "
                        f"{header.expected_size} bytes, the file has {header.file_size}; "
                        "download it again")
    return header


def metadata(path: str | Path) -> dict:
    """The scalar and string key/values of a GGUF file's header (arrays skipped)."""
    return read_header(path).metadata

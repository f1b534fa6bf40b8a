"""Direct, thread-parallel chunk I/O for the Zarr format 2 arrays this package writes.

zarr-python 3 runs every synchronous read and write through one event-loop thread, which
serialises Dask's worker threads on chunk decoding and encoding. For plain format-2 arrays
(C order, no filters, a numcodecs compressor or none, ``/`` or ``.`` chunk keys) reading and
writing a chunk is just "file <-> codec <-> ndarray"; this module does that directly, so the
codec work (which releases the GIL) runs in parallel. Metadata stays zarr's: arrays are created
and validated with zarr, and anything unusual falls back to zarr itself.

Writes go to a temporary file renamed over the chunk, so readers never see half a chunk.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np


class ChunkedV2Array:
    """Read/write access to a format-2 Zarr array directory by whole chunks.

    Indexing takes a tuple of slices (step 1) over every axis. Writes must cover whole
    chunks, or the part of an edge chunk inside the array (what ``dask.array.store`` does with
    chunk-aligned blocks).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta = json.loads((self.path / ".zarray").read_text())
        if meta.get("zarr_format") != 2 or meta.get("order", "C") != "C" or meta.get("filters"):
            raise ValueError("not a plain C-order format-2 array without filters")
        self.shape = tuple(int(s) for s in meta["shape"])
        self.chunks = tuple(int(c) for c in meta["chunks"])
        self.dtype = np.dtype(meta["dtype"])
        self.ndim = len(self.shape)
        self.fill_value = meta.get("fill_value") or 0
        self._sep = meta.get("dimension_separator", ".")
        comp = meta.get("compressor")
        self._codec = numcodecs.get_codec(comp) if comp else None

    @classmethod
    def try_open(cls, path: str | os.PathLike[str]) -> ChunkedV2Array | None:
        try:
            return cls(path)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _key(self, idx: tuple[int, ...]) -> Path:
        return self.path / self._sep.join(str(i) for i in idx)

    def _read_chunk(self, idx: tuple[int, ...]) -> np.ndarray:
        try:
            raw = self._key(idx).read_bytes()
        except FileNotFoundError:
            return np.full(self.chunks, self.fill_value, self.dtype)
        data = self._codec.decode(raw) if self._codec else raw
        return np.frombuffer(data, self.dtype).reshape(self.chunks)

    def _write_chunk(self, idx: tuple[int, ...], block: np.ndarray) -> None:
        data = np.ascontiguousarray(block, self.dtype)
        raw = self._codec.encode(data) if self._codec else data.tobytes()
        key = self._key(idx)
        key.parent.mkdir(parents=True, exist_ok=True)
        tmp = key.with_name(f".{key.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(raw)
        os.replace(tmp, key)

    def _bounds(self, key: Any) -> list[tuple[int, int]]:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        out = []
        for k, n in zip(key, self.shape, strict=True):
            if not isinstance(k, slice):
                raise TypeError("only slices are supported")
            start, stop, step = k.indices(n)
            if step != 1:
                raise TypeError("only step-1 slices are supported")
            out.append((start, max(start, stop)))
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        bounds = self._bounds(key)
        out = np.empty([b - a for a, b in bounds], self.dtype)
        if out.size == 0:
            return out
        ranges = [
            range(a // c, (b - 1) // c + 1) for (a, b), c in zip(bounds, self.chunks, strict=True)
        ]
        for idx in np.ndindex(*[len(r) for r in ranges]):
            cidx = tuple(r[i] for r, i in zip(ranges, idx, strict=True))
            chunk = self._read_chunk(cidx)
            src, dst = [], []
            for (a, b), c, ci in zip(bounds, self.chunks, cidx, strict=True):
                lo, hi = max(a, ci * c), min(b, (ci + 1) * c)
                src.append(slice(lo - ci * c, hi - ci * c))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = chunk[tuple(src)]
        return out

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        bounds = self._bounds(key)
        value = np.asarray(value)
        for (a, b), c, n in zip(bounds, self.chunks, self.shape, strict=True):
            if a % c or (b % c and b != n):
                raise ValueError("writes must cover whole chunks")
        ranges = [range(a // c, -(-b // c)) for (a, b), c in zip(bounds, self.chunks, strict=True)]
        for idx in np.ndindex(*[len(r) for r in ranges]):
            cidx = tuple(r[i] for r, i in zip(ranges, idx, strict=True))
            block = np.full(self.chunks, self.fill_value, self.dtype)
            src, dst = [], []
            for (a, _b), c, ci, n in zip(bounds, self.chunks, cidx, self.shape, strict=True):
                lo, hi = ci * c, min((ci + 1) * c, n)
                src.append(slice(lo - a, hi - a))
                dst.append(slice(0, hi - lo))
            block[tuple(dst)] = value[tuple(src)]
            self._write_chunk(cidx, block)

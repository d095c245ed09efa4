"""Tensor codec for the collaboration network: header + payload (lz4 where it pays) +
an optional crc32.

Layout (little endian):
  magic b'DCW1' | wire dtype u8 | ndim u8 | flags u8 | pad u8 | raw length u32 |
  shape ndim x u32 | payload | [crc32 u32 over everything before it, if flags has FLAG_CRC].
The crc is for channels that do not authenticate what they carry (an in-process actor
system): a sealed data-plane frame or a tagged actor message already detects any change
in transit, and a crc32 pass costs about as much as the copy it checks.
The decoded array is always float32; fp16 on the wire halves the bytes at the
cost of precision (about 3 significant digits); int8 quarters them: the payload is
the tensor's minimum and step (two float32) then one uint8 per value,
x ~ min + step * q, so the error is at most step / 2 = (max - min) / 510 per value
(one scale per encoded chunk).
"""
from __future__ import annotations

import functools
import struct
import time
import zlib

import lz4.block
import numpy as np

from decolla import kernels

MAGIC = b"DCW1"
_HEAD = struct.Struct("<4sBBBxI")
_CRC = struct.Struct("<I")
WIRE_DTYPES = {"float32": (0, np.dtype("<f4")), "float16": (1, np.dtype("<f2")),
               "int8": (2, np.dtype("u1"))}
_AFFINE = struct.Struct("<ff")      # int8: minimum, step
_BY_CODE = {code: dt for code, dt in WIRE_DTYPES.values()}
FLAG_LZ4, FLAG_CRC = 1, 2


_HALF_MIN = 256       # values from which the F16C kernel beats numpy's call overhead


@functools.cache
def _half_kernel():
    """decolla.kernels' float16 conversion when this CPU's build converts with vector
    instructions (F16C, NEON), else None (numpy's conversion, ≈ 25x slower on x86:
    0.5 ms for a 224x224x3 image)."""
    try:
        mod = kernels.load("half")
    except ImportError:
        return None
    return mod if mod.HARDWARE else None


class WireError(ValueError):
    """A payload that cannot be decoded: corrupted, truncated or not a DeColla tensor."""


def encode(array: np.ndarray, dtype: str = "float32", compress: bool = True,
           checksum: bool = True) -> bytes:
    """Encode a float array for the wire as `dtype` ('float32' or 'float16'); lz4 when
    `compress` and it makes the payload smaller; a crc32 unless the channel authenticates
    (`checksum` False). One copy of the tensor's bytes."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype must be one of {sorted(WIRE_DTYPES)}, got {dtype!r}")
    code, wire_dt = WIRE_DTYPES[dtype]
    arr = np.asarray(array)
    if arr.ndim > 255:
        raise ValueError("too many dimensions")
    half = _half_kernel() if code == 1 and arr.dtype == np.float32 and arr.size >= _HALF_MIN \
        else None
    if code == 2:
        raw = memoryview(_quantize(arr))
    elif half is not None:
        raw = _byte_view(half.to_half(arr))
    else:
        raw = _byte_view(np.ascontiguousarray(arr, dtype=wire_dt))
    flags = 0
    payload = raw
    if compress and raw.nbytes:
        packed = lz4.block.compress(raw, store_size=False)
        if len(packed) < raw.nbytes:
            payload, flags = packed, FLAG_LZ4
    if checksum:
        flags |= FLAG_CRC
    head = _HEAD.pack(MAGIC, code, arr.ndim, flags, raw.nbytes) + \
        struct.pack(f"<{arr.ndim}I", *arr.shape)
    if not checksum:
        return b"".join((head, payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((head, payload, _CRC.pack(crc)))


def _byte_view(a: np.ndarray) -> memoryview:
    """The bytes of contiguous array `a`, without a copy."""
    return memoryview(a.reshape(-1).view(np.uint8))


def decode(blob) -> np.ndarray:
    """Decode bytes made by `encode` into a float32 array; raise WireError on any damage.
    An uncompressed float32 payload comes back as a read-only view of `blob`, not a copy
    (a copy of a 5 MB tensor costs 0.4 ms on this host, most of it page faults): the
    kernels only read their inputs."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(blob).__name__}")
    view = memoryview(blob).cast("B")
    if len(view) < _HEAD.size:
        raise WireError(f"payload too short ({len(view)} bytes)")
    magic, code, ndim, flags, raw_len = _HEAD.unpack_from(view)
    body = view
    if flags & FLAG_CRC:
        if len(view) < _HEAD.size + _CRC.size:
            raise WireError(f"payload too short ({len(view)} bytes)")
        body, (crc,) = view[:-_CRC.size], _CRC.unpack(view[-_CRC.size:])
        if zlib.crc32(body) != crc:
            raise WireError("payload checksum mismatch (corrupted in transit)")
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}")
    if code not in _BY_CODE:
        raise WireError(f"unknown wire dtype code {code}")
    shape_end = _HEAD.size + 4 * ndim
    if len(body) < shape_end:
        raise WireError("truncated header")
    shape = struct.unpack_from(f"<{ndim}I", body, _HEAD.size)
    wire_dt = _BY_CODE[code]
    extra = _AFFINE.size if code == 2 else 0
    if int(np.prod(shape, dtype=np.int64)) * wire_dt.itemsize + extra != raw_len:
        raise WireError(f"shape {shape} does not match payload length {raw_len}")
    payload = body[shape_end:]
    if flags & FLAG_LZ4:
        try:     # into a bytearray: the float32 array below can use it as it is, writable
            raw = lz4.block.decompress(payload, uncompressed_size=raw_len,
                                       return_bytearray=True)
        except lz4.block.LZ4BlockError as exc:
            raise WireError(f"lz4 decompression failed: {exc}") from exc
    else:
        raw = payload
    if len(raw) != raw_len:
        raise WireError(f"payload length {len(raw)} != {raw_len}")
    if code == 2:
        lo, step = _AFFINE.unpack_from(raw)
        q = np.frombuffer(raw, dtype=wire_dt, offset=_AFFINE.size).reshape(shape)
        out = q.astype(np.float32)
        out *= np.float32(step)
        out += np.float32(lo)
        return out
    half = _half_kernel() if code == 1 and len(raw) >= 2 * _HALF_MIN else None
    if half is not None:
        return half.from_half(raw, shape)
    arr = np.frombuffer(raw, dtype=wire_dt).reshape(shape)
    if wire_dt != np.float32:
        return arr.astype(np.float32)
    return arr


def _quantize(arr: np.ndarray) -> bytes:
    """min, step and uint8 codes of a float array (one affine scale for the whole chunk)."""
    x = np.asarray(arr, dtype=np.float32)
    if x.size == 0:
        return _AFFINE.pack(0.0, 0.0)
    if not np.isfinite(x).all():
        raise ValueError("int8 wire encoding needs finite values")
    lo, hi = float(x.min()), float(x.max())
    step = (hi - lo) / 255.0
    if step <= 0.0:
        q = np.zeros(x.shape, np.uint8)
    else:
        q = np.rint((x.astype(np.float64) - lo) / step)   # float64: step may be tiny
        q = np.clip(q, 0, 255, out=q).astype(np.uint8)
    return _AFFINE.pack(lo, step) + q.tobytes()


@functools.cache
def lz4_costs() -> tuple[float, float]:
    """(seconds of lz4 compress + decompress per raw byte, fraction of bytes it saves) on
    this host, measured once on a tensor like a ReLU's output (half zeros)."""
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal(64 * 1024, dtype=np.float32), 0).tobytes()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        packed = lz4.block.compress(x, store_size=False)
        lz4.block.decompress(packed, uncompressed_size=len(x))
        best = min(best, time.perf_counter() - t)
    return best / len(x), 1.0 - len(packed) / len(x)


def compress_pays(link_bytes_per_s: float) -> bool:
    """Whether lz4 makes a transfer over a link this fast shorter: it saves its share of the
    bytes' wire time and costs a compress at one end and a decompress at the other (taken
    as fast as here). Over loopback or a fast LAN it costs more than it saves."""
    per_byte_s, saved = lz4_costs()
    return link_bytes_per_s > 0 and saved / link_bytes_per_s > per_byte_s


def nbytes(shape, dtype: str = "float32") -> int:
    """Uncompressed wire size of a tensor of `shape`."""
    extra = _AFFINE.size if dtype == "int8" else 0
    return int(np.prod(shape, dtype=np.int64)) * WIRE_DTYPES[dtype][1].itemsize + extra

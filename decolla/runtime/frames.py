"""The data plane's message codec: a message object <-> (type id, control bytes, raw buffers).

Nothing here ever unpickles: control fields are msgpack, and a value that is not a
msgpack scalar, list or dict is one of a closed set of shapes, each an msgpack extension:
a tuple (so keys and plan fields come back hashable), a dataclass whose type is in the
codec's id table (never a name from the wire), a raw buffer, or a Thespian TCP actor
address (the baselines route with them). A dataclass travels as its fields in order;
a wrong id or field count is a `FrameError`.

Bytes fields of at least `BUFFER_MIN` bytes (wire-encoded tensors: StageWork.blobs,
ChunkResult.payload, Halo.blob, LinkProbe.payload, ...) do not go through msgpack: they
are appended to the frame as they are, and the control bytes hold their index.

Frames themselves (header, counter, authentication) are decolla.runtime.session's.
"""
from __future__ import annotations

import dataclasses
import operator
import socket
import struct

import msgpack
import numpy as np
from thespian.actors import ActorAddress
from thespian.system.transport.IPBase import TCPv4ActorAddress

from decolla.cost import ChunkCost
from decolla.plans.data import Chunk, Need, Stage, Swap
from decolla.runtime.messages import (Cancel, ChunkFailed, ChunkJob, ChunkResult, ChunkResults,
                                      Halo, LinkEcho, LinkProbe, StageWork)

BUFFER_MIN = 512                 # bytes values this long or longer travel as raw buffers
EXT_LIST, EXT_OBJECT, EXT_BUFFER, EXT_ADDRESS = 1, 2, 3, 4
_INDEX = struct.Struct("!I")


class FrameError(ValueError):
    """A frame that is malformed, unauthenticated, replayed or of a type not allowed."""


class Codec:
    """Message types (allowed at the top of a frame) and nested dataclasses (allowed
    inside one), each under a fixed id that both ends share. Thread-safe."""

    def __init__(self, messages: dict[int, type], nested: dict[int, type] | None = None):
        nested = nested or {}
        if set(messages) & set(nested):
            raise ValueError(f"type ids used twice: {sorted(set(messages) & set(nested))}")
        self.messages, self.nested = dict(messages), dict(nested)
        self.by_id = {**self.messages, **self.nested}
        self.ids = {cls: i for i, cls in self.by_id.items()}
        if len(self.ids) != len(self.by_id):
            raise ValueError("a type has two ids")
        for cls in self.by_id.values():
            if not dataclasses.is_dataclass(cls):
                raise ValueError(f"{cls.__name__} is not a dataclass")
        self._fields = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in self.ids}
        self._get = {cls: _getter(names) for cls, names in self._fields.items()}

    def extend(self, messages: dict[int, type], nested: dict[int, type] | None = None) -> "Codec":
        """This codec plus more types (ids must not collide)."""
        nested = nested or {}
        taken = set(self.by_id) & (set(messages) | set(nested))
        if taken:
            raise ValueError(f"type ids taken: {sorted(taken)}")
        return Codec({**self.messages, **messages}, {**self.nested, **nested})

    # ---------------------------------------------------------------- encode
    def encode(self, msg) -> tuple[int, bytes, list[bytes]]:
        """(type id, control bytes, raw buffers) of message `msg`."""
        tid = self.ids.get(type(msg))
        if tid is None or tid not in self.messages:
            raise FrameError(f"{type(msg).__name__} is not a data-plane message of this codec")
        buffers: list[bytes] = []

        def default(obj):
            cls = type(obj)
            if cls in self.ids:
                fields = self._values(obj, pack, buffers)
                return msgpack.ExtType(EXT_OBJECT, pack([self.ids[cls], *fields]))
            if isinstance(obj, ActorAddress) and type(obj.addressDetails) is TCPv4ActorAddress:
                return msgpack.ExtType(EXT_ADDRESS, pack(_address_fields(obj.addressDetails)))
            if isinstance(obj, np.generic):                # numpy scalars: sizes, costs
                return obj.item()
            raise FrameError(f"a {cls.__name__} cannot travel on the data plane")

        def pack(value) -> bytes:
            return msgpack.packb(value, default=default, use_bin_type=True)

        return tid, pack(self._values(msg, pack, buffers)), buffers

    def _values(self, obj, pack, buffers: list) -> list:
        """The fields of dataclass `obj` in order: a list as a list (every other sequence
        comes back a tuple), big bytes values (also a dict's) lifted into `buffers`."""
        out = self._get[type(obj)](obj)
        for i, v in enumerate(out):
            kind = type(v)
            if kind is bytes:
                out[i] = _lift(v, buffers)
            elif kind is list:
                out[i] = msgpack.ExtType(EXT_LIST, pack([_lift(x, buffers) for x in v]))
            elif kind is dict:
                out[i] = {k: _lift(x, buffers) for k, x in v.items()}
        return out

    # ---------------------------------------------------------------- decode
    def decode(self, tid: int, control, buffers: list[bytes]):
        """The message of type id `tid` from its control bytes and raw buffers; FrameError
        for anything this codec does not allow."""
        cls = self.messages.get(tid)
        if cls is None:
            raise FrameError(f"type id {tid} is not a data-plane message")

        def ext_hook(code: int, data: bytes):
            if code == EXT_LIST:
                return list(unpack(data))
            if code == EXT_OBJECT:
                values = unpack(data)
                if not values or type(values[0]) is not int or values[0] not in self.by_id:
                    raise FrameError("unknown nested type id")
                return self._build(self.by_id[values[0]], values[1:])
            if code == EXT_BUFFER:
                (i,) = _INDEX.unpack(data)
                return buffers[i]
            if code == EXT_ADDRESS:
                return _address(unpack(data))
            raise FrameError(f"unknown extension {code}")

        def unpack(data):
            return msgpack.unpackb(data, ext_hook=ext_hook, use_list=False,
                                   strict_map_key=False, raw=False)

        try:
            values = unpack(control)
            if type(values) is not tuple:
                raise FrameError("control is not a field list")
            return self._build(cls, values)
        except FrameError:
            raise
        except Exception as exc:     # msgpack's errors, a bad index, an unhashable key...
            raise FrameError(f"malformed {cls.__name__}: {exc!r}") from None

    def _build(self, cls: type, values: tuple):
        want = len(self._fields[cls])
        if len(values) != want:
            raise FrameError(f"{cls.__name__} with {len(values)} fields, not {want}")
        return cls(*values)


def _getter(names: tuple):
    """A function giving an object's `names` attributes as a new list."""
    get = operator.attrgetter(*names)
    return (lambda obj: [get(obj)]) if len(names) == 1 else (lambda obj: list(get(obj)))


def _lift(v, buffers: list):
    if type(v) is bytes and len(v) >= BUFFER_MIN:
        buffers.append(v)
        return msgpack.ExtType(EXT_BUFFER, _INDEX.pack(len(buffers) - 1))
    return v


def _address_fields(a: TCPv4ActorAddress) -> list:
    return [a.sockname[0], a.sockname[1], a.bindname[0]]


def _address(fields) -> ActorAddress:
    """A Thespian TCP actor address, rebuilt as unpickling would (no name lookup)."""
    if (type(fields) is not tuple or len(fields) != 3 or type(fields[0]) is not str
            or type(fields[1]) is not int or not 0 < fields[1] < 65536
            or type(fields[2]) is not str):
        raise FrameError("malformed actor address")
    a = TCPv4ActorAddress.__new__(TCPv4ActorAddress)
    a.af, a.socktype, a.proto = socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
    a.sockname, a.bindname = (fields[0], fields[1]), (fields[2], fields[1])
    return ActorAddress(a)


# The runtime's data-plane messages (the DATA rows of decolla.runtime.channels) and what
# nests in them. An id is forever: a new type takes a new id.
RUNTIME = Codec(
    messages={1: StageWork, 2: Cancel, 3: LinkProbe, 4: Halo, 5: ChunkResult, 6: ChunkResults,
              7: ChunkFailed, 8: LinkEcho},
    nested={16: ChunkJob, 17: Stage, 18: Chunk, 19: Need, 20: Swap, 21: ChunkCost},
)

"""TensorBoard event files written by hand (no tensorflow / tensorboard needed at run time).

A file is a sequence of records:

    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

where data is an `Event` protocol buffer (tensorflow/core/util/event.proto):

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; Image image = 4; }
    Image   { int32 height = 1; int32 width = 2; int32 colorspace = 3; bytes encoded_image_string = 4; }

The first record carries file_version "brain.Event:2". `read_events` decodes what we write (tests).
"""
from __future__ import annotations

import os
import socket
import struct
import time
from typing import Dict, Iterator, List, Optional, Tuple

# ---------------------------------------------------------------------------- CRC-32C (Castagnoli)

_CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------- protobuf encoding

def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def encode_scalar_value(tag: str, value: float) -> bytes:
    return _bytes_field(1, tag.encode("utf-8")) + _key(2, 5) + struct.pack("<f", float(value))


def encode_image_value(tag: str, png: bytes, height: int, width: int, channels: int = 3) -> bytes:
    image = (_key(1, 0) + _varint(height) + _key(2, 0) + _varint(width) + _key(3, 0) + _varint(channels)
             + _bytes_field(4, png))
    return _bytes_field(1, tag.encode("utf-8")) + _bytes_field(4, image)


def encode_event(wall_time: float, step: int, file_version: Optional[str] = None,
                 values: Optional[List[bytes]] = None) -> bytes:
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode("utf-8"))
    if values:
        out += _bytes_field(5, b"".join(_bytes_field(1, v) for v in values))
    return out


def frame(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class EventWriter:
    """Appends events to `<logdir>/events.out.tfevents.<time>.<host>`; flushed after every write."""

    def __init__(self, logdir: str, filename_suffix: str = ""):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}{filename_suffix}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._f.write(frame(event))
        self._f.flush()

    def add_scalars(self, step: int, scalars: Dict[str, float], wall_time: Optional[float] = None) -> None:
        values = [encode_scalar_value(k, v) for k, v in scalars.items()]
        self._write(encode_event(wall_time or time.time(), step, values=values))

    def add_image(self, step: int, tag: str, png: bytes, height: int, width: int) -> None:
        self._write(encode_event(time.time(), step, values=[encode_image_value(tag, png, height, width)]))

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


# ---------------------------------------------------------------------------- reading back (tests, tools)

def _read_varint(buf: bytes, i: int) -> Tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes) -> Iterator[Tuple[int, int, object]]:
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def read_events(path: str) -> List[dict]:
    """Decode a tfevents file: [{"wall_time", "step", "file_version", "scalars": {tag: v}, "images": [tag]}].

    Checks both CRCs of every record and raises ValueError on a mismatch.
    """
    with open(path, "rb") as f:
        data = f.read()
    events, i = [], 0
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        (crc_h,) = struct.unpack("<I", data[i + 8:i + 12])
        body = data[i + 12:i + 12 + n]
        (crc_b,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        if crc_h != masked_crc32c(header) or crc_b != masked_crc32c(body):
            raise ValueError(f"{path}: CRC mismatch in the record at byte {i}")
        i += 16 + n
        event = {"wall_time": None, "step": 0, "file_version": None, "scalars": {}, "images": []}
        for field, _, value in _fields(body):
            if field == 1:
                event["wall_time"] = struct.unpack("<d", value)[0]
            elif field == 2:
                event["step"] = value
            elif field == 3:
                event["file_version"] = value.decode()
            elif field == 5:
                for vf, _, v in _fields(value):
                    if vf != 1:
                        continue
                    tag, simple, image = None, None, None
                    for f2, _, x in _fields(v):
                        if f2 == 1:
                            tag = x.decode()
                        elif f2 == 2:
                            simple = struct.unpack("<f", x)[0]
                        elif f2 == 4:
                            image = x
                    if simple is not None:
                        event["scalars"][tag] = simple
                    if image is not None:
                        event["images"].append(tag)
        events.append(event)
    return events

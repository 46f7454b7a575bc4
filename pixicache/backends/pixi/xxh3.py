"""XXH3-64 (seed 0, the default secret) in pure Python: the hash Pixi's environment file uses.

Pixi records in ``<prefix>/conda-meta/pixi`` an ``environment_lock_file_hash``
computed with ``xxhash_rust::xxh3::Xxh3`` (see :mod:`pixicache.backends.pixi.envfile`).
The agent runs from a bundle of pure-Python wheels on the worker's own
interpreter, so it cannot rely on the ``xxhash`` C extension; this module is the
reference algorithm (XXH3_64bits, xxHash 0.8) for inputs of any length. The test
suite checks it against the ``xxhash`` package byte for byte. Inputs here are a
few kilobytes; speed is not a concern.
"""

from __future__ import annotations

__all__ = ["xxh3_64"]

_M64 = (1 << 64) - 1
_P32_1 = 0x9E3779B1
_P32_2 = 0x85EBCA77
_P32_3 = 0xC2B2AE3D
_P64_1 = 0x9E3779B185EBCA87
_P64_2 = 0xC2B2AE3D27D4EB4F
_P64_3 = 0x165667B19E3779F9
_P64_4 = 0x85EBCA77C2B2AE63
_P64_5 = 0x27D4EB2F165667C5
_PMX1 = 0x165667919E3779F9
_PMX2 = 0x9FB21C651E98DF25

_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)
_STRIPE = 64
_ACCS = 8
_BLOCK_STRIPES = (len(_SECRET) - _STRIPE) // 8  # 16
_BLOCK = _STRIPE * _BLOCK_STRIPES  # 1024


def _r64(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 8], "little")


def _r32(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 4], "little")


def _mul_fold(a: int, b: int) -> int:
    p = (a & _M64) * (b & _M64)
    return (p & _M64) ^ (p >> 64)


def _avalanche(h: int) -> int:
    h ^= h >> 37
    h = (h * _PMX1) & _M64
    return h ^ (h >> 32)


def _xxh64_avalanche(h: int) -> int:
    h ^= h >> 33
    h = (h * _P64_2) & _M64
    h ^= h >> 29
    h = (h * _P64_3) & _M64
    return h ^ (h >> 32)


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _swap64(x: int) -> int:
    return int.from_bytes(x.to_bytes(8, "little"), "big")


def _mix16(data: bytes, i: int, s: int) -> int:
    return _mul_fold(_r64(data, i) ^ _r64(_SECRET, s), _r64(data, i + 8) ^ _r64(_SECRET, s + 8))


def _len_0_16(data: bytes) -> int:
    n = len(data)
    if n > 8:
        lo = _r64(data, 0) ^ (_r64(_SECRET, 24) ^ _r64(_SECRET, 32))
        hi = _r64(data, n - 8) ^ (_r64(_SECRET, 40) ^ _r64(_SECRET, 48))
        acc = (n + _swap64(lo) + hi + _mul_fold(lo, hi)) & _M64
        return _avalanche(acc)
    if n >= 4:
        keyed = ((_r32(data, n - 4) + (_r32(data, 0) << 32)) & _M64) ^ (
            _r64(_SECRET, 8) ^ _r64(_SECRET, 16)
        )
        h = keyed ^ _rotl(keyed, 49) ^ _rotl(keyed, 24)
        h = (h * _PMX2) & _M64
        h ^= (h >> 35) + n
        h = (h * _PMX2) & _M64
        return h ^ (h >> 28)
    if n:
        combined = (data[0] << 16) | (data[n >> 1] << 24) | data[n - 1] | (n << 8)
        return _xxh64_avalanche(combined ^ (_r32(_SECRET, 0) ^ _r32(_SECRET, 4)))
    return _xxh64_avalanche(_r64(_SECRET, 56) ^ _r64(_SECRET, 64))


def _len_17_128(data: bytes) -> int:
    n = len(data)
    acc = (n * _P64_1) & _M64
    if n > 32:
        if n > 64:
            if n > 96:
                acc += _mix16(data, 48, 96) + _mix16(data, n - 64, 112)
            acc += _mix16(data, 32, 64) + _mix16(data, n - 48, 80)
        acc += _mix16(data, 16, 32) + _mix16(data, n - 32, 48)
    acc += _mix16(data, 0, 0) + _mix16(data, n - 16, 16)
    return _avalanche(acc & _M64)


def _len_129_240(data: bytes) -> int:
    n = len(data)
    acc = (n * _P64_1) & _M64
    for i in range(8):
        acc += _mix16(data, 16 * i, 16 * i)
    acc = _avalanche(acc & _M64)
    for i in range(8, n // 16):
        acc += _mix16(data, 16 * i, 16 * (i - 8) + 3)
    acc += _mix16(data, n - 16, 136 - 17)
    return _avalanche(acc & _M64)


def _accumulate_512(acc: list[int], data: bytes, i: int, s: int) -> None:
    for lane in range(_ACCS):
        value = _r64(data, i + 8 * lane)
        key = value ^ _r64(_SECRET, s + 8 * lane)
        acc[lane ^ 1] = (acc[lane ^ 1] + value) & _M64
        acc[lane] = (acc[lane] + (key & 0xFFFFFFFF) * (key >> 32)) & _M64


def _scramble(acc: list[int]) -> None:
    s = len(_SECRET) - _STRIPE
    for lane in range(_ACCS):
        a = acc[lane]
        a ^= a >> 47
        a ^= _r64(_SECRET, s + 8 * lane)
        acc[lane] = (a * _P32_1) & _M64


def _long(data: bytes) -> int:
    n = len(data)
    acc = [_P32_3, _P64_1, _P64_2, _P64_3, _P64_4, _P32_2, _P64_5, _P32_1]
    blocks = (n - 1) // _BLOCK
    for b in range(blocks):
        for stripe in range(_BLOCK_STRIPES):
            _accumulate_512(acc, data, b * _BLOCK + stripe * _STRIPE, stripe * 8)
        _scramble(acc)
    stripes = ((n - 1) - _BLOCK * blocks) // _STRIPE
    for stripe in range(stripes):
        _accumulate_512(acc, data, blocks * _BLOCK + stripe * _STRIPE, stripe * 8)
    _accumulate_512(acc, data, n - _STRIPE, len(_SECRET) - _STRIPE - 7)
    result = (n * _P64_1) & _M64
    for i in range(4):
        result += _mul_fold(acc[2 * i] ^ _r64(_SECRET, 11 + 16 * i), acc[2 * i + 1] ^ _r64(_SECRET, 11 + 16 * i + 8))
    return _avalanche(result & _M64)


def xxh3_64(data: bytes) -> int:
    """XXH3_64bits of ``data`` (seed 0), as an unsigned 64-bit integer.

    >>> hex(xxh3_64(b""))
    '0x2d06800538d394c2'
    """
    n = len(data)
    if n <= 16:
        return _len_0_16(data)
    if n <= 128:
        return _len_17_128(data)
    if n <= 240:
        return _len_129_240(data)
    return _long(data)

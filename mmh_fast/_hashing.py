"""Keyed hashing of sample ids: the one place that turns (seed, id) into
bytes, seeds and uniform numbers. BLAKE2b keyed by the seed, never Python's
``hash()`` (salted per process), so results are stable across processes, runs,
platforms and Python versions."""
from __future__ import annotations

import hashlib
import numbers

import numpy as np
import torch

__all__ = ["id_bytes", "seed_bytes", "keyed_digest", "keyed_uniform", "sample_seed"]


def id_bytes(sample_id) -> bytes:
    """Canonical bytes of a sample id. Integers (python, numpy, 0-d integer
    tensors) are one kind, strings another, bytes a third: ``5``,
    ``np.int64(5)`` and ``torch.tensor(5)`` agree; ``5`` and ``"5"`` do not."""
    if isinstance(sample_id, torch.Tensor):
        if sample_id.numel() != 1 or sample_id.is_floating_point() or sample_id.is_complex():
            raise TypeError(f"a tensor sample id must be a single integer, got {sample_id!r}")
        sample_id = int(sample_id.item())
    if isinstance(sample_id, (bool, np.bool_)):
        raise TypeError("sample ids must be integers, strings or bytes, got a bool")
    if isinstance(sample_id, numbers.Integral):
        return b"i" + str(int(sample_id)).encode("ascii")
    if isinstance(sample_id, str):
        return b"s" + sample_id.encode("utf-8")
    if isinstance(sample_id, (bytes, bytearray)):
        return b"b" + bytes(sample_id)
    raise TypeError(f"sample ids must be integers, strings or bytes, got {type(sample_id).__name__}")


def seed_bytes(seed) -> bytes:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    b = str(int(seed)).encode("ascii")
    if len(b) > 64:
        raise ValueError("seed must have at most 64 digits")
    return b


def keyed_digest(seed, sample_id, person: bytes) -> int:
    """64-bit BLAKE2b of the id keyed by the seed, personalised by ``person``
    (at most 16 bytes) so different uses of one seed are independent."""
    h = hashlib.blake2b(id_bytes(sample_id), digest_size=8, key=seed_bytes(seed), person=person)
    return int.from_bytes(h.digest(), "little")


def keyed_uniform(seed, sample_id, person: bytes) -> float:
    """A U(0, 1) float64 from the top 53 bits of :func:`keyed_digest`:
    (m + 0.5) / 2^53, strictly inside (0, 1) and exact in float64."""
    return ((keyed_digest(seed, sample_id, person) >> 11) + 0.5) / float(1 << 53)


def sample_seed(seed, sample_id, stream: str = "") -> int:
    """A 63-bit generator seed for (seed, sample id, stream)."""
    person = ("seed:" + stream).encode("utf-8")[:16]
    return keyed_digest(seed, sample_id, person) & ((1 << 63) - 1)

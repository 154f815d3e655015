"""mmh_fast.models.batching: OOM detection, halving retries, finite checks and
the default chunk size formula."""
import math
import pickle
import warnings

import pytest
import torch

from _batching_helpers import OOMAbove

from mmh_fast.models import batching
from mmh_fast.models.batching import (NonFiniteOutputError, check_finite, default_batch_size, is_oom,
                                      per_sample_bytes, run_chunked)
from mmh_fast.testing import tiny_unet2d


def test_is_oom_recognises_allocator_messages_only():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))  # not an allocator error type


class _Identity(torch.nn.Module):
    def forward(self, x, t):
        return x


def _affine(start, stop):
    # a deterministic per-item function: chunking must not change it
    return torch.arange(start, stop, dtype=torch.float64) * 3 + 1


def test_run_chunked_halves_on_oom_and_gives_the_unchunked_result():
    net = OOMAbove(_Identity(), limit=3)
    x = torch.randn(23, 5, dtype=torch.float64)

    def fn(a, b):
        return net(x[a:b], None) * 2

    with pytest.warns(UserWarning, match=r"chunks of 2"):
        parts = run_chunked(fn, 23, batch_size=10, what="test net")
    assert torch.equal(torch.cat(parts), x * 2)
    assert max(net.calls) <= 3 and sum(net.calls) == 23
    assert net.calls[0] == 2  # 10 -> 5 -> 2: halved until it fits, then kept
    logged = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_chunked(fn, 23, batch_size=10, what="test net", log=logged.append)
    assert logged == ["out of memory in test net: chunk size halved to 5",
                      "out of memory in test net: chunk size halved to 2"]


def test_run_chunked_without_oom_does_not_warn_and_keeps_order():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parts = run_chunked(_affine, 10, batch_size=4, what="x")
    assert [len(p) for p in parts] == [4, 4, 2]
    assert torch.equal(torch.cat(parts), _affine(0, 10))
    assert run_chunked(_affine, 0, batch_size=4, what="x") == []


def test_run_chunked_reraises_oom_at_one_and_other_errors_at_once():
    err = torch.OutOfMemoryError("CUDA out of memory (fake)")
    calls = []

    def always_oom(a, b):
        calls.append(b - a)
        raise err

    with pytest.raises(torch.OutOfMemoryError) as info:
        run_chunked(always_oom, 5, batch_size=4, what="x")
    assert info.value is err and calls == [4, 2, 1]
    calls.clear()

    def broken(a, b):
        calls.append(b - a)
        raise RuntimeError("shapes do not match")

    with pytest.raises(RuntimeError, match="shapes"):
        run_chunked(broken, 5, batch_size=4, what="x")
    assert calls == [4]
    with pytest.raises(ValueError, match="batch_size"):
        run_chunked(_affine, 5, batch_size=0, what="x")


def test_check_finite_names_output_and_positions():
    t = torch.zeros(6, 3)
    t[1, 2] = float("nan")
    t[4, 0] = float("inf")
    with pytest.raises(NonFiniteOutputError, match=r"the net's eps is not finite .* 2 sample\(s\) at position\(s\) "
                                                   r"11, 14") as info:
        check_finite(t, what="the net's eps", offset=10)
    assert info.value.positions == [11, 14]
    assert isinstance(info.value, ValueError)
    again = pickle.loads(pickle.dumps(info.value))
    assert again.positions == [11, 14] and str(again) == str(info.value)
    with pytest.raises(NonFiniteOutputError) as info:
        check_finite(t.T.contiguous(), what="w", dim=1)
    assert info.value.positions == [1, 4]
    # with index (the point each row belongs to: two copies per point), rows 1 and 4 are points 7 and 9, once each
    t[0, 1] = float("nan")  # row 0: point 7 again
    with pytest.raises(NonFiniteOutputError) as info:
        check_finite(t, what="copies", index=torch.tensor([7, 7, 8, 8, 9, 9]), offset=100)
    assert info.value.positions == [7, 9]
    # finite values whose sum overflows are finite: no error
    check_finite(torch.full((4, 2), 3e38), what="big")
    check_finite(torch.zeros(0, 3), what="empty")
    many = torch.full((20, 2), float("nan"))
    with pytest.raises(NonFiniteOutputError, match=r"\.\.\. \(20 in all\)"):
        check_finite(many, what="all")


def _meta_net(n_params):
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.empty(n_params, device="meta"))
    return m


def test_default_batch_size_follows_the_documented_formula():
    # 10,000 parameters: sqrt = 100; sample of 4 float32 numbers:
    # 0.5 x 4 x 100 x 4 bytes = 800 bytes; x2 passes, x3 backward
    net = _meta_net(10_000)
    assert per_sample_bytes(net, (4,)) == 800
    assert default_batch_size(net, (4,)) == (4 << 30) // 800
    assert default_batch_size(net, (4,), passes=2, backward=True) == (4 << 30) // 4800


def test_default_batch_size_uses_free_cuda_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (8_000_000, 80_000_000))
    assert default_batch_size(_meta_net(10_000), (4,), device="cuda") == 4_000_000 // 800


def test_default_batch_size_monotone_and_at_least_one():
    small, big = tiny_unet2d(channels=(8, 16)), tiny_unet2d(channels=(32, 64))
    assert default_batch_size(big, (3, 8, 8)) <= default_batch_size(small, (3, 8, 8))
    sizes = [default_batch_size(small, (3, s, s)) for s in (8, 16, 64, 256, 1024)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]
    assert default_batch_size(small, (3, 8, 8), passes=2) <= default_batch_size(small, (3, 8, 8))
    assert default_batch_size(small, (3, 8, 8), backward=True) < default_batch_size(small, (3, 8, 8))
    # an SD-sized network (860M parameters, no memory: meta) on 512 x 512 latents
    assert default_batch_size(_meta_net(860_000_000), (4, 512, 512), passes=2, backward=True) == 1
    assert default_batch_size(lambda x, t: x, (3,)) >= 1  # a parameter-free callable
    assert math.isfinite(per_sample_bytes(small, ()))

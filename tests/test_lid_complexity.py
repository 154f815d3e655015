"""png_complexity and png_normalized_lid: the PNG files decode back to the
images (round trip through an independent decoder call), lengths order images
by complexity, value ranges and layouts map to the same bytes."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import mmh_fast
from mmh_fast.lid.complexity import png_bytes, to_uint8_images


def rgb_batch(seed=0, B=4, H=24, W=20):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(B, H, W, 3), dtype=np.uint8)


def decode(b: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(b))
    assert img.format == "PNG"
    return np.asarray(img)


def test_round_trip_uint8_channels_last_and_first():
    u8 = rgb_batch()
    for images in (u8, np.moveaxis(u8, 3, 1), torch.from_numpy(np.moveaxis(u8, 3, 1).copy())):
        files = png_bytes(images)
        assert len(files) == 4
        for f, want in zip(files, u8):
            np.testing.assert_array_equal(decode(f), want)
    lengths = mmh_fast.png_complexity(u8)
    assert lengths.dtype == np.int64 and lengths.tolist() == [len(f) for f in png_bytes(u8)]


def test_round_trip_grayscale_and_rgba():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
    for images in (gray, gray[:, None], gray[..., None]):
        files = png_bytes(images, channels_last=None if images.ndim == 3 else images.shape[-1] == 1)
        for f, want in zip(files, gray):
            np.testing.assert_array_equal(decode(f), want)
    rgba = rng.integers(0, 256, size=(2, 8, 9, 4), dtype=np.uint8)
    for f, want in zip(png_bytes(rgba), rgba):
        np.testing.assert_array_equal(decode(f), want)


def test_compression_level_is_9():
    u8 = np.tile(np.arange(64, dtype=np.uint8), (2, 64, 1))  # compressible ramps
    for f, img in zip(png_bytes(u8), u8):
        buf0, buf9 = io.BytesIO(), io.BytesIO()
        Image.fromarray(img).save(buf0, format="PNG", compress_level=0)
        Image.fromarray(img).save(buf9, format="PNG", compress_level=9)
        assert len(f) == len(buf9.getvalue()) < len(buf0.getvalue())


def test_lengths_order_images_by_complexity():
    rng = np.random.default_rng(2)
    H = W = 32
    constant = np.full((H, W, 3), 128, dtype=np.uint8)
    ramp = np.broadcast_to(np.linspace(0, 255, W).astype(np.uint8)[None, :, None], (H, W, 3)).copy()
    stripes = ((np.arange(W)[None, :, None] // 4) % 2 * 255).astype(np.uint8).repeat(H, 0).repeat(3, 2)
    noise = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    lengths = mmh_fast.png_complexity(np.stack([constant, stripes, ramp, noise]))
    assert lengths[0] < lengths[3] and lengths[1] < lengths[3] and lengths[2] < lengths[3]
    # incompressible noise costs at least its raw size
    assert lengths[3] >= H * W * 3
    # more noise, longer file
    half = constant.copy()
    half[: H // 2] = noise[: H // 2]
    assert lengths[0] < mmh_fast.png_complexity(half[None])[0] < lengths[3]


def test_value_ranges_map_to_the_same_bytes():
    u8 = rgb_batch(3)
    x01 = u8.astype(np.float32) / 255.0
    xm11 = u8.astype(np.float64) / 127.5 - 1.0
    want = mmh_fast.png_complexity(u8).tolist()
    assert mmh_fast.png_complexity(x01).tolist() == want
    assert mmh_fast.png_complexity(xm11).tolist() == want
    assert mmh_fast.png_complexity(torch.from_numpy(xm11)).tolist() == want
    assert mmh_fast.png_complexity(u8.astype(np.float32), value_range=(0, 255)).tolist() == want
    np.testing.assert_array_equal(to_uint8_images(xm11), u8)
    np.testing.assert_array_equal(to_uint8_images(xm11, value_range=(-1, 1)), u8)
    # an explicit range overrides detection: [0, 1] data read as [-1, 1] lands in [128, 255]
    upper = to_uint8_images(x01, value_range=(-1, 1))
    np.testing.assert_array_equal(upper, np.rint((x01.astype(np.float64) + 1) * 127.5).astype(np.uint8))
    assert upper.min() >= 127
    # int images in [0, 255] of another dtype
    assert mmh_fast.png_complexity(u8.astype(np.int64)).tolist() == want


def test_normalized_lid():
    u8 = rgb_batch(4)
    lid = np.array([3.0, 10.0, 0.0, 7.5])
    lengths = mmh_fast.png_complexity(u8)
    np.testing.assert_allclose(mmh_fast.png_normalized_lid(lid, u8), lid / lengths)
    np.testing.assert_allclose(mmh_fast.png_normalized_lid(torch.tensor(lid), lengths), lid / lengths)
    np.testing.assert_allclose(mmh_fast.png_normalized_lid(list(lid), list(lengths)), lid / lengths)


def test_bad_input_errors():
    u8 = rgb_batch(5)
    with pytest.raises(ValueError, match="images must be \\[B, H, W\\]"):
        mmh_fast.png_complexity(u8[None])
    with pytest.raises(ValueError, match="images must be a non-empty batch"):
        mmh_fast.png_complexity(u8[0, :, :, 0])
    with pytest.raises(ValueError, match="images must be a non-empty batch"):
        mmh_fast.png_complexity(u8[:0])
    with pytest.raises(ValueError, match="no channel axis of size 1, 3 or 4"):
        mmh_fast.png_complexity(np.zeros((2, 5, 6, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="could be channels-first or channels-last"):
        mmh_fast.png_complexity(np.zeros((2, 3, 6, 3), dtype=np.uint8))
    assert mmh_fast.png_complexity(np.zeros((2, 3, 6, 3), dtype=np.uint8), channels_last=True).shape == (2,)
    bad = u8.astype(np.float32) / 255
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(ValueError, match="images contain 1 NaN or inf"):
        mmh_fast.png_complexity(bad)
    with pytest.raises(ValueError, match="fit neither \\[0, 1\\] nor \\[-1, 1\\]"):
        mmh_fast.png_complexity(u8.astype(np.float32))
    with pytest.raises(ValueError, match="outside value_range"):
        mmh_fast.png_complexity(u8.astype(np.float32) / 255 * 2, value_range=(0, 1))
    with pytest.raises(ValueError, match="value_range must be finite with lo < hi"):
        mmh_fast.png_complexity(u8.astype(np.float32) / 255, value_range=(1, 0))
    with pytest.raises(ValueError, match="value_range must be a pair"):
        mmh_fast.png_complexity(u8.astype(np.float32) / 255, value_range=3)
    with pytest.raises(ValueError, match="integer images must lie in \\[0, 255\\]"):
        mmh_fast.png_complexity(u8.astype(np.int64) * 2)
    with pytest.raises(TypeError, match="images must be a numpy.ndarray or torch.Tensor"):
        mmh_fast.png_complexity([[[0, 1]]])
    with pytest.raises(TypeError, match="images must be uint8 or floating point"):
        mmh_fast.png_complexity(np.zeros((2, 4, 4), dtype=np.complex64))
    with pytest.raises(ValueError, match="lid has 3 values but there are 4"):
        mmh_fast.png_normalized_lid([1.0, 2.0, 3.0], u8)
    with pytest.raises(ValueError, match="lid contains NaN"):
        mmh_fast.png_normalized_lid([1.0, float("nan"), 3.0, 4.0], u8)
    with pytest.raises(ValueError, match="PNG lengths must be finite and positive"):
        mmh_fast.png_normalized_lid([1.0, 2.0], [100, 0])
    with pytest.raises(ValueError, match="lid must be a non-empty 1-D array"):
        mmh_fast.png_normalized_lid(np.ones((2, 2)), [100, 100])

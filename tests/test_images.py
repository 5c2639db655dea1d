"""Every odd file becomes RGB or a clear error naming it."""

import numpy as np
import pytest
from PIL import Image

from histoclass.data.images import ImageLoadError, inspect_image, load_rgb


def test_grayscale_becomes_rgb(tmp_path):
    p = tmp_path / "gray.png"
    Image.fromarray(np.full((5, 7), 100, np.uint8), "L").save(p)
    img = load_rgb(p)
    assert img.mode == "RGB" and img.size == (7, 5)
    assert np.asarray(img)[0, 0].tolist() == [100, 100, 100]


def test_rgba_is_composited_on_white(tmp_path):
    p = tmp_path / "rgba.png"
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200
    arr[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    Image.fromarray(arr, "RGBA").save(p)
    out = np.asarray(load_rgb(p))
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[3, 0].tolist() == [255, 255, 255]


def test_16_bit_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "deep.png"
    Image.fromarray(np.full((3, 3), 25700, np.uint16)).save(p)
    assert Image.open(p).mode.startswith("I")
    # 25700 / 65535 * 255 = 100 exactly; clipping to 8 bits would give 255.
    assert np.asarray(load_rgb(p))[1, 1].tolist() == [100, 100, 100]


def test_palette_image(tmp_path):
    p = tmp_path / "pal.gif"
    Image.fromarray(np.full((3, 3, 3), 10, np.uint8)).convert("P").save(p)
    assert load_rgb(p).mode == "RGB"


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "empty file"),
    (b"hello, I am a text file", "not an image"),
])
def test_bad_bytes_name_the_file(tmp_path, content, reason):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(ImageLoadError, match=rf"bad\.png: {reason}"):
        load_rgb(p)


def test_truncated_png(tmp_path):
    p = tmp_path / "cut.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:2000])
    with pytest.raises(ImageLoadError, match=r"cut\.png: corrupt or truncated"):
        load_rgb(p)


def test_huge_image_is_refused(tmp_path):
    p = tmp_path / "huge.png"
    Image.new("RGB", (300, 200)).save(p)
    with pytest.raises(ImageLoadError, match=r"huge\.png: image too large: 300x200"):
        load_rgb(p, max_pixels=10_000)


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match=r"nope\.png: no such file"):
        load_rgb(tmp_path / "nope.png")


def test_inspect_hashes_bytes(tmp_path):
    import hashlib

    p = tmp_path / "a.png"
    Image.new("RGB", (3, 2), (1, 2, 3)).save(p)
    info = inspect_image(p)
    assert (info.width, info.height, info.mode) == (3, 2, "RGB")
    assert info.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()

"""Image loading survives what real folders contain; broken files are named."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from utils.data import images
from utils.data.images import ImageError, check_images, list_images, load_image
from utils.errors import KitError


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    (tmp_path / "r.jpg").write_bytes(_jpeg_bytes(img, exif=exif.tobytes()))
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_greyscale_becomes_rgb(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (77, 77, 77)


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255
    arr[0, 0, 3] = 0  # transparent pixel
    arr[1, 1, 3] = 255  # opaque red
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (255, 0, 0)


def test_cmyk_becomes_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    out = load_image(tmp_path / "c.jpg")
    r, g, b = out.getpixel((4, 4))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "d.png"))[..., 0]
    assert out[0, 0] == 0 and out[1, 0] == 255 and 120 < out[0, 1] < 135


def test_huge_image_is_shrunk(tmp_path):
    Image.new("RGB", (5000, 50), "blue").save(tmp_path / "h.png")
    assert load_image(tmp_path / "h.png", max_side=1000).size == (1000, 10)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (300, 300)).save(tmp_path / "b.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="b.png: image has more than"):
        load_image(tmp_path / "b.png")


@pytest.mark.parametrize(
    "name,content,problem",
    [
        ("zero.jpg", b"", "empty file"),
        ("text.jpg", b"this is not an image at all", "not an image"),
        ("trunc.jpg", None, "truncated or corrupt"),
    ],
)
def test_broken_files_name_the_file_and_problem(tmp_path, name, content, problem):
    if content is None:
        full = _jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
        content = full[: len(full) // 2]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / name)
    assert name in str(info.value) and problem in str(info.value)
    assert "\n" not in str(info.value)


def test_listing_skips_non_images_and_hidden_files(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.JPG", format="JPEG")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png"]


def test_listing_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(KitError, match="nope: folder not found"):
        list_images(tmp_path / "nope")


def test_check_images_skips_or_stops(tmp_path, caplog):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"")
    paths = [tmp_path / "ok.png", tmp_path / "bad.png"]
    with caplog.at_level(logging.WARNING):
        assert check_images(paths, strict=False, what="training") == [tmp_path / "ok.png"]
    assert "bad.png" in caplog.text
    with pytest.raises(ImageError, match=r"bad.png: empty file .*gallery images must all be readable"):
        check_images(paths, strict=True, what="gallery")


def test_image_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ImageError("x.png", "empty file")))
    assert str(err) == "x.png: empty file" and err.path == "x.png"
    assert images.MAX_SIDE >= 1024


def test_check_cache_skips_decoding_and_notices_changed_files(tmp_path, monkeypatch):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"")
    paths, cache = [tmp_path / "ok.png", tmp_path / "bad.png"], tmp_path / "check.json"
    assert check_images(paths, strict=False, what="training", cache=cache) == paths[:1]
    calls = []
    monkeypatch.setattr(images, "load_image", lambda p, max_side: calls.append(p))
    assert check_images(paths, strict=False, what="training", cache=cache) == paths[:1]
    with pytest.raises(ImageError, match="bad.png: empty file"):
        check_images(paths, strict=True, what="gallery", cache=cache)
    assert calls == []  # every verdict came from the cache
    (tmp_path / "bad.png").write_bytes(b"now something else")  # size changes: checked again
    check_images(paths, strict=False, what="training", cache=cache)
    assert calls == [tmp_path / "bad.png"]

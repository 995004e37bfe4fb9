"""Image loading survives what real folders contain; broken files are named."""

from __future__ import annotations

import io
import logging
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.helpers.paths import ROOT
from utils.data import images
from utils.data.images import ImageError, check_images, list_images, load_image, scan_folder
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


def test_listing_ignores_hidden_files_junk_and_folders_with_a_line(tmp_path, caplog):
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.JPG", format="JPEG")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "._a.JPG").write_bytes(b"\0")  # macOS resource fork
    (tmp_path / "Thumbs.db").write_bytes(b"\0")
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING):
        assert [p.name for p in list_images(tmp_path, what="query")] == ["a.JPG", "b.png"]
    assert "ignoring 4 hidden, system or sub-folder entries: '.DS_Store', '._a.JPG', 'Thumbs.db', 'sub'" in caplog.text
    listing = scan_folder(tmp_path)
    assert listing.n_entries == 6 and not listing.unknown


@pytest.mark.parametrize("name, problem", [
    ("q6", "no extension ('q6')"),
    ("q7.jfif", "extension '.jfif' is not one the kit reads"),
    ("q8.jpeg ", "extension '.jpeg ' has a space in it"),
    ("q9.avif", "extension '.avif' is not one the kit reads"),
    ("notes.txt", "extension '.txt' is not one the kit reads"),
])
def test_a_query_file_the_kit_will_not_read_stops_the_listing(tmp_path, caplog, name, problem):
    """Every query or gallery file counts: one the kit would not read is named, not dropped."""
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG")
    with pytest.raises(ImageError) as info:
        list_images(tmp_path, what="query")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / name}: {problem}; convert or rename it to one of .bmp ")
    assert "query images must all be readable" in msg and "\n" not in msg
    with caplog.at_level(logging.WARNING):  # training: skipped, one line each
        assert [p.name for p in list_images(tmp_path, what="training", unknown="skip")] == ["ok.png"]
    assert f"skipping training file {tmp_path / name}: {problem}" in caplog.text


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
    assert str(err) == "x.png: empty file" and err.path == "x.png" and err.problem == "empty file"


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


def _write_flat_png(path, width, height, color_type, bit_depth, pixel: bytes, rows_per_block=64):
    """A one-colour PNG written without ever holding its pixels: one compressed block of rows,
    ended by a full flush (byte-aligned, no reference to earlier data), repeated."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    rows = (b"\0" + pixel * width) * rows_per_block
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(rows) + comp.flush(zlib.Z_FULL_FLUSH)
    n, rest = divmod(height, rows_per_block)
    adler = 1
    for _ in range(n):
        adler = zlib.adler32(rows, adler)
    tail = rows[: rest * (width * len(pixel) + 1)]
    adler = zlib.adler32(tail, adler)
    stream = b"\x78\xda" + block * n + comp.compress(tail) + comp.flush(zlib.Z_FINISH) + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b""))
    return path


LOAD_UNDER_3_GIB = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from utils.data.images import ImageError, load_image
try:
    img = load_image(sys.argv[1])
except ImageError as err:
    print("ImageError:", err)
else:
    print("loaded", img.size, img.mode, img.getpixel((0, 0)))
"""


def _load_under_3_gib(path):
    return subprocess.run([sys.executable, "-c", LOAD_UNDER_3_GIB, str(path)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_flat_png_writer_writes_what_pil_reads(tmp_path):
    _write_flat_png(tmp_path / "s.png", 300, 130, 2, 8, bytes((10, 200, 30)))
    arr = np.asarray(Image.open(tmp_path / "s.png"))
    assert arr.shape == (130, 300, 3) and (arr == (10, 200, 30)).all()


def test_16bit_memory_bomb_under_the_pixel_limit_loads_in_3_gib(tmp_path):
    # 20000 x 20000 16-bit greyscale: ~0.8 MB on disk, 0.8 GB decoded; converted at full size in
    # float64 it needed ~11 GB. It must load, shrunk, under a 3 GiB address-space limit.
    png = _write_flat_png(tmp_path / "bomb.png", 20000, 20000, 0, 16, struct.pack(">H", 40000))
    assert png.stat().st_size < 2_000_000
    res = _load_under_3_gib(png)
    assert res.returncode == 0 and res.stderr == "", res.stderr[-2000:]
    assert res.stdout.strip() == "loaded (2048, 2048) RGB (155, 155, 155)"  # 40000 / 65535 * 255


def test_image_too_big_to_decode_is_refused_with_one_line(tmp_path):
    # 17000 x 17000 RGB: under the pixel limit, 1.1 GB decoded (PIL keeps RGB in 4 bytes a pixel)
    png = _write_flat_png(tmp_path / "wide.png", 17000, 17000, 2, 8, bytes((1, 2, 3)))
    res = _load_under_3_gib(png)
    assert res.returncode == 0 and res.stderr == "", res.stderr[-2000:]
    line = res.stdout.strip()
    assert "\n" not in line and line.startswith(f"ImageError: {png}: image would need 1.1 GB to decode (17000x17000, mode RGB")
    assert "shrink it first" in line


def test_palette_and_16bit_images_are_shrunk_in_their_own_mode(tmp_path):
    Image.new("P", (5000, 40), 3).save(tmp_path / "p.png")
    Image.fromarray(np.full((32, 4000), 65535, np.uint16)).save(tmp_path / "d.png")
    assert load_image(tmp_path / "p.png", max_side=1000).size == (1000, 8)
    out = load_image(tmp_path / "d.png", max_side=1000)
    assert out.size == (1000, 8) and out.getpixel((0, 0)) == (255, 255, 255)


def test_broken_links_in_a_folder_stop_the_listing_naming_the_link(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    os.symlink(tmp_path / "ok.png", tmp_path / "good_link.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.jpg")
    with pytest.raises(ImageError) as info:
        list_images(tmp_path, what="query")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'dangling.jpg'}: symbolic link points nowhere (-> {tmp_path / 'gone.png'})")
    assert "query images must all be readable" in msg and "\n" not in msg
    (tmp_path / "dangling.jpg").unlink()
    os.symlink("loop_b.jpg", tmp_path / "loop_a.jpg")
    os.symlink("loop_a.jpg", tmp_path / "loop_b.jpg")
    with pytest.raises(ImageError, match=r"loop_a.jpg: symbolic link loop \(-> loop_b.jpg\)"):
        list_images(tmp_path, what="gallery")
    with pytest.raises(ImageError, match="loop_a.jpg: symbolic link loop"):
        load_image(tmp_path / "loop_a.jpg")


def test_broken_links_can_be_skipped_with_a_line(tmp_path, caplog):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    os.symlink(tmp_path / "ok.png", tmp_path / "good_link.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.jpg")
    os.symlink(tmp_path / "gone.txt", tmp_path / "notes.txt")  # not named like an image: an unknown file
    with caplog.at_level(logging.WARNING):
        listed = list_images(tmp_path, what="training", broken_links="skip", unknown="skip")
    assert [p.name for p in listed] == ["good_link.png", "ok.png"]
    assert f"skipping training image {tmp_path / 'dangling.jpg'}: symbolic link points nowhere" in caplog.text
    assert f"skipping training file {tmp_path / 'notes.txt'}: extension '.txt'" in caplog.text


def test_a_name_with_a_newline_is_named_on_one_line(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "two\nlines.jfif", format="PNG")
    with pytest.raises(ImageError) as info:
        list_images(tmp_path, what="gallery")
    assert str(info.value).startswith(f"{str(tmp_path / 'two')!r}"[:-1] + "\\nlines.jfif': extension '.jfif'")
    assert "\n" not in str(info.value)


def _break(paths) -> None:
    for p in paths:
        p.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")  # a git LFS pointer, not an image


def test_training_identities_without_a_readable_image_leave_the_task_with_a_line(rehearsal_data, tmp_path, caplog):
    """Every training image broken (LFS pointers) died in torch's RandomSampler ('num_samples=0') with a traceback;
    every held-out image broken died in topk ('k=0 must be between 1 and the gallery size 0'); one identity
    with no readable image stayed a class of the margin loss with no image and was counted as trained on."""
    from utils.data.split import SplitParams
    from utils.data.task import prepare_task

    runs = tmp_path / "runs"
    task = prepare_task(rehearsal_data, runs, SplitParams())
    first = task.classes[0]
    _break((rehearsal_data / "train" / first).iterdir())
    task = prepare_task(rehearsal_data, runs, SplitParams())
    assert first not in task.classes and sorted(set(task.train_labels)) == list(range(len(task.classes)))
    assert f"no readable training image of 1 identity, left out of training: {first}" in caplog.text
    _break(p for ident in task.split.val for p in (rehearsal_data / "train" / ident).iterdir())
    with pytest.raises(KitError, match=r"train: no readable validation query image among the held-out identities \['id"):
        prepare_task(rehearsal_data, runs, SplitParams())
    _break((rehearsal_data / "train").glob("*/*"))
    with pytest.raises(KitError, match=r"train: none of its 104 training images can be read \(see the lines above; git LFS"):
        prepare_task(rehearsal_data, runs, SplitParams())

"""List and load images the way real competition folders need.

Handled: EXIF rotation, greyscale, palette and transparency (composited on
white), CMYK, 16-bit and float images (rescaled to 8 bits), very large images
(JPEG decoded reduced; others shrunk by an integer factor in their own mode
before any conversion, then to ``max_side``), and memory bombs under the pixel
limit: an image whose decoded size would pass :data:`MAX_DECODE_BYTES` is
refused with one line before it is decoded. Every file of a folder is
accounted for (:func:`scan_folder`): hidden files, system junk (``Thumbs.db``)
and sub-folders are left out with a line; a file the kit will not read (no
extension, ``.jfif``, ``.avif``, ``.jpeg `` with a trailing space, ``notes.txt``)
and a link named like an image that points nowhere or loops stop a query or
gallery listing naming the file (training images: skipped with a line each),
never dropped silently. A file that cannot be decoded raises
:class:`ImageError` naming it; callers decide whether skipping is safe (a
training image) or not (query, gallery).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.errors import KitError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
)
MAX_SIDE = 2048  # longest side after loading; bigger inputs only cost time
MAX_PIXELS = 400_000_000  # refuse beyond this (a decompression bomb, not a photo)
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
MAX_DECODE_BYTES = 1 << 30  # refuse an image whose decoded pixels need more (e.g. 20000^2 RGB: 1.5 GiB)
UNUSABLE_FILES = ("raise", "skip")  # what list_images does with a broken link or a file it will not read
JUNK_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r", "__macosx"})  # besides any .hidden name
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}  # PIL keeps others in 4


class ImageError(KitError):
    """An image file that cannot be used; the message names the file."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        shown = self.path if self.path.isprintable() else repr(self.path)  # a newline in a name: still one line
        super().__init__(f"{shown}: {problem}")

    def __reduce__(self):  # survive the trip back from a DataLoader worker
        return (ImageError, (self.path, self.problem))


def _broken_link(path: Path) -> str:
    """Why ``path`` is a symbolic link that cannot be followed ('' when it is not one)."""
    if not path.is_symlink():
        return ""
    try:
        os.stat(path)
        return ""
    except OSError as err:
        target = os.readlink(path)
        if err.errno == errno.ELOOP:
            return f"symbolic link loop (-> {target})"
        return f"symbolic link points nowhere (-> {target})"


def is_ignored_name(name: str) -> bool:
    """Hidden files (``.DS_Store``, ``._photo.jpg``) and system junk (``Thumbs.db``): never images of the set."""
    return name.startswith(".") or name.lower() in JUNK_NAMES


def extension_problem(name: str) -> str:
    """Why the kit will not read a file called ``name`` as an image ('' when its extension is one it reads)."""
    suffix = Path(name).suffix
    if suffix.lower() in IMAGE_EXTENSIONS:
        return ""
    if not suffix:
        return f"no extension ({name!r})"
    if suffix.strip().lower() in IMAGE_EXTENSIONS:
        return f"extension {suffix!r} has a space in it"
    return f"extension {suffix!r} is not one the kit reads"


@dataclass
class FolderFiles:
    """Every entry of a folder, sorted by name: what the kit reads and what it does not."""

    images: list[Path]  # files named like an image (a link among them points somewhere)
    unknown: list[tuple[Path, str]]  # (file, why): not hidden, not junk, but not named like an image the kit reads
    broken_links: list[tuple[Path, str]]  # (link named like an image, why it cannot be followed)
    ignored: list[Path]  # hidden files, system junk (see JUNK_NAMES) and sub-folders

    @property
    def n_entries(self) -> int:
        return len(self.images) + len(self.unknown) + len(self.broken_links) + len(self.ignored)


def scan_folder(folder: str | Path) -> FolderFiles:
    """Sort every entry of ``folder`` into images, unknown files, broken links and ignored entries.

    Raises:
        KitError: the folder does not exist or is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise KitError(f"{folder}: folder not found (check --data)")
    out = FolderFiles([], [], [], [])
    for p in sorted(folder.iterdir()):
        if is_ignored_name(p.name) or p.is_dir():
            out.ignored.append(p)
        elif problem := extension_problem(p.name):
            out.unknown.append((p, problem))
        elif problem := _broken_link(p):
            out.broken_links.append((p, problem))
        elif p.is_file():
            out.images.append(p)
        else:  # a FIFO, socket or device named like an image
            out.unknown.append((p, "not a regular file"))
    return out


def list_images(folder: str | Path, what: str = "", broken_links: str = "raise", unknown: str = "raise") -> list[Path]:
    """Image files in ``folder`` sorted by name; every other entry accounted for.

    Hidden files, system junk (``Thumbs.db``) and sub-folders are left out (with
    a warning line when ``unknown="raise"``, i.e. a set whose every file counts).

    Args:
        folder: the folder to list.
        what: name of the set for messages, e.g. ``"gallery"``.
        broken_links: what to do with a link named like an image that points
            nowhere or loops: ``"raise"`` (query and gallery: every image is
            needed) or ``"skip"`` with a warning line (training images).
        unknown: what to do with a file whose extension the kit does not read
            (``q6``, ``a.jfif``, ``b.jpeg `` with a trailing space): ``"raise"``
            (query and gallery) or ``"skip"`` with a warning line (training).

    Raises:
        KitError: the folder does not exist or is not a folder; a bad option.
        ImageError: a broken link or an unknown file, with ``"raise"``.
    """
    for name, value in (("broken_links", broken_links), ("unknown", unknown)):
        if value not in UNUSABLE_FILES:
            raise KitError(f"{name}={value!r}: choose one of {UNUSABLE_FILES}")
    listing = scan_folder(folder)
    what = what or Path(folder).name
    for kind, action, entries in (("image", broken_links, listing.broken_links), ("file", unknown, listing.unknown)):
        for p, problem in entries:
            if action == "raise":
                fix = "fix or remove the link" if kind == "image" else f"convert or rename it to one of {' '.join(sorted(IMAGE_EXTENSIONS))}, or move it out"
                raise ImageError(p, f"{problem}; {fix} ({what} images must all be readable)")
            elif action == "skip":
                log.warning("skipping %s %s %s: %s", what, kind, p, problem)
            else:
                raise KitError(f"{action!r}: choose one of {UNUSABLE_FILES}")
    if listing.ignored:
        names = ", ".join(repr(p.name) for p in listing.ignored[:5]) + (" ..." if len(listing.ignored) > 5 else "")
        (log.warning if unknown == "raise" else log.debug)(
            "%s: ignoring %d hidden, system or sub-folder entr%s: %s", folder, len(listing.ignored),
            "y" if len(listing.ignored) == 1 else "ies", names)
    return listing.images


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without clipping high bit depths."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0 if hi > 255 else 255.0
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = ((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decoded_bytes(img: Image.Image) -> int:
    """Bytes PIL needs to hold ``img``'s pixels once decoded (at its current, possibly drafted, size)."""
    return img.width * img.height * _BYTES_PER_PIXEL.get(img.mode, 4)


def _shrink_in_mode(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink by an integer factor without changing the mode, so no conversion runs at full size."""
    factor = max(img.size) // max_side
    if factor < 2:
        return img
    size = (max(1, img.width // factor), max(1, img.height // factor))
    if img.mode in ("P", "1"):  # other filters would convert to RGB at full size first
        return img.resize(size, Image.Resampling.NEAREST)
    if img.mode.startswith("I;16"):  # Image.reduce does not take 16-bit modes
        return img.resize(size, Image.Resampling.BOX)
    return img.reduce(factor)


def load_image(path: str | Path, max_side: int = MAX_SIDE) -> Image.Image:
    """Open ``path`` as an upright 8-bit RGB image, longest side at most ``max_side``.

    Raises:
        ImageError: missing, empty, not an image, truncated, too many pixels,
            or more than :data:`MAX_DECODE_BYTES` once decoded.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise ImageError(path, _broken_link(path) or "file not found") from None
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format == "JPEG" and max(img.size) > 2 * max_side:
                    img.draft("RGB", (max_side, max_side))
                need = decoded_bytes(img)
                if need > MAX_DECODE_BYTES:
                    raise ImageError(
                        path, f"image would need {need / 2**30:.1f} GB to decode ({img.width}x{img.height}, mode {img.mode}; "
                        f"limit {MAX_DECODE_BYTES / 2**30:.0f} GB per image); shrink it first, e.g. to 4096 px on its longest side",
                    )
                img.load()
                img = _shrink_in_mode(img, max_side)
                img = ImageOps.exif_transpose(img)
                img = _to_8bit_rgb(img)
    except UnidentifiedImageError:
        raise ImageError(path, "not an image PIL can read (wrong extension or corrupt header)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(path, f"image has more than {MAX_PIXELS:,} pixels") from None
    except MemoryError:
        raise ImageError(path, "not enough memory to decode it; shrink it first, e.g. to 4096 px on its longest side") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(path, f"cannot decode ({err}); the file is truncated or corrupt") from None
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return img


def check_images(paths: list[Path], strict: bool, what: str, cache: Path | None = None) -> list[Path]:
    """Decode every image once (reduced, so it is quick) and sort out the broken ones.

    Args:
        paths: files to check.
        strict: raise on the first broken file (query and gallery images: a
            submission needs every one); otherwise log one line per broken file
            and return the good ones (training images).
        what: name of the set for messages, e.g. ``"gallery"``.
        cache: a JSON file of earlier verdicts, keyed by path, size and mtime, so
            that the next model script on the same data decodes nothing again.

    Raises:
        ImageError: ``strict`` and a file is broken.
    """
    from utils.atomic import atomic_write_json
    from utils.progress import track

    seen: dict[str, str] = {}
    if cache is not None and cache.is_file():
        try:
            seen = json.loads(cache.read_text())
        except (json.JSONDecodeError, OSError):
            seen = {}
    good, bad, fresh = [], [], 0
    for p in track(paths, f"checking {what} images"):
        try:
            st = p.stat()
            key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            key = ""
        if key and key in seen:
            problem = seen[key]
        else:
            try:
                load_image(p, max_side=256)
                problem = ""
            except ImageError as err:
                problem = err.problem
            if key:
                seen[key] = problem
                fresh += 1
        if not problem:
            good.append(p)
        elif strict:
            raise ImageError(p, f"{problem} ({what} images must all be readable)")
        else:
            log.warning("skipping %s image %s: %s", what, p, problem)
            bad.append(p)
    if cache is not None and fresh:
        atomic_write_json(cache, seen)
    if bad:
        log.warning("skipped %d broken %s image(s) of %d", len(bad), what, len(paths))
    return good

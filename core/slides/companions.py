"""Confinement: a slide may only name companion files inside its own folder.

Some formats are several files, and the slide's index names the others: a Hamamatsu VMS/VMU
lists its JPEG/NGR images, map and optimisation files (``ImageFile``, ``ImageFile(x,y)``,
``MapFile``, ``OptimisationFile``, ``MacroImage``); a MIRAX ``.mrxs`` has a sibling folder
whose ``Slidedat.ini`` lists its index and data files (``[HIERARCHICAL] INDEXFILE``,
``[DATAFILE] FILE_n``); OpenSlide's DICOM reader opens every instance in the file's folder.
OpenSlide follows those names wherever they lead, so an uploaded slide could make the
server read (and return the pixels of) any file it can open. :func:`check_companions` runs
before OpenSlide sees a slide and refuses any companion that resolves (symlinks followed)
outside the slide's own folder: its cache entry for slides from object storage, the folder
holding it for local paths. Absolute names are refused outright.

Design decisions:
- Index files are recognised by content, not by extension (OpenSlide does the same: a VMS
  named ``.txt`` still opens as one). Key files are parsed permissively, like GLib's
  GKeyFile (groups, ``key = value``, ``#`` comments, a UTF-8 BOM), and every plausible
  reading of a value (raw, trimmed, unescaped) must stay inside, so parser differences can
  only make the check stricter.
- Only files up to ``KEY_FILE_MAX_BYTES`` are probed as VMS/VMU: OpenSlide refuses larger
  key files (64 KiB), so a bigger file cannot be read as one.
- Messages name no path (the log has them); the server's folders are not the caller's business.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NoReturn

from smartpath.core.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

OUTSIDE_MESSAGE = (
    "the slide names a companion file outside its own folder; re-upload the slide with its "
    "companion files in the same folder (multi-file slides must be self-contained)"
)
KEY_FILE_MAX_BYTES = 1 << 20  # 16x OpenSlide's own limit for VMS/VMU key files
SLIDEDAT_MAX_BYTES = 16 << 20  # OpenSlide reads at most 1 MiB of Slidedat.ini
VMS_GROUPS = frozenset({"virtual microscope specimen", "uncompressed virtual microscope specimen"})
VMS_FILE_KEYS = ("imagefile", "mapfile", "optimisationfile", "macroimage")
MRXS_SUFFIX = ".mrxs"
SLIDEDAT = "Slidedat.ini"
DICOM_MAGIC_OFFSET, DICOM_MAGIC = 128, b"DICM"
_ESCAPES = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def check_companions(path: Path) -> None:
    """Refuse a slide whose companion files resolve outside its own folder.

    ``path`` is the slide as OpenSlide will be given it, already resolved: a file (its
    folder is the boundary) or a folder slide (the folder itself is). Raises
    InvalidArgumentError with a message that names no path.
    """
    if path.is_dir():
        _check_links(path, path, recursive=True)
        return
    folder = path.parent
    if path.name.lower().endswith(MRXS_SUFFIX):
        _check_mrxs(path, folder)
    head, size = _head(path)
    if path.suffix.lower() == ".dcm" or head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC:
        _check_links(folder, folder, recursive=False)
    if size <= KEY_FILE_MAX_BYTES:
        _check_vms(path, folder)


def _head(path: Path) -> tuple[bytes, int]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return f.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC)), size


# -- formats -------------------------------------------------------------------------------


def _check_vms(path: Path, folder: Path) -> None:
    """Hamamatsu VMS/VMU: every file key of the specimen group, relative to the file's folder."""
    with open(path, "rb") as f:
        data = f.read(KEY_FILE_MAX_BYTES)
    if b"MICROSCOPE SPECIMEN" not in data.upper():
        return  # no specimen group anywhere: not a VMS/VMU
    for group, key, values in _key_file(data):
        if group in VMS_GROUPS and key.lower().startswith(VMS_FILE_KEYS):
            _require_inside(path, folder, folder, values)


def _check_mrxs(path: Path, folder: Path) -> None:
    """MIRAX: the sibling folder, its Slidedat.ini, and the index and data files it lists,
    all inside the sibling folder (which must itself be inside the slide's folder)."""
    sibling = path.with_name(path.name[: -len(MRXS_SUFFIX)])
    if not sibling.exists() and not sibling.is_symlink():
        return  # OpenSlide will say it is not a MIRAX slide
    data_root = _resolved(sibling)
    if data_root is None or not _within(data_root, folder):
        _refuse(path, sibling, folder)
    slidedat = sibling / SLIDEDAT
    if not slidedat.exists() and not slidedat.is_symlink():
        return
    _require_inside(path, data_root, data_root, [SLIDEDAT])
    try:
        with open(slidedat, "rb") as f:
            data = f.read(SLIDEDAT_MAX_BYTES + 1)
    except OSError as exc:
        logger.warning("cannot read the MIRAX index of %s: %s", path, exc)
        raise InvalidArgumentError(
            "the slide's MIRAX index (Slidedat.ini) cannot be read; re-upload the slide with "
            "its sibling folder"
        ) from None
    if len(data) > SLIDEDAT_MAX_BYTES:
        raise InvalidArgumentError(
            "the slide's MIRAX index (Slidedat.ini) is too large to be one; re-upload the slide"
        )
    for group, key, values in _key_file(data):
        k = key.lower()
        if (group == "hierarchical" and k == "indexfile") or (
            group == "datafile" and k != "file_count"
        ):
            _require_inside(path, data_root, data_root, values)


def _check_links(folder: Path, root: Path, *, recursive: bool) -> None:
    """No symlink in ``folder`` (DICOM instances are found by listing it) leads outside."""

    def fail(exc: OSError) -> None:
        raise exc

    try:
        if recursive:
            entries = [
                Path(dirpath, name)
                for dirpath, dirnames, filenames in os.walk(folder, onerror=fail)
                for name in (*dirnames, *filenames)
            ]
        else:
            with os.scandir(folder) as it:
                entries = [Path(item.path) for item in it]
        links = [entry for entry in entries if entry.is_symlink()]
    except OSError as exc:
        logger.warning("cannot list the folder of slide %s: %s", folder, exc)
        raise InvalidArgumentError("the slide's folder cannot be listed") from None
    for link in links:
        target = _resolved(link)
        if target is None or not _within(target, root):
            _refuse(folder, link, root)


# -- paths ---------------------------------------------------------------------------------


def _require_inside(slide: Path, base: Path, root: Path, values: Iterable[str]) -> None:
    for value in values:
        if not value:
            continue  # OpenSlide fails on an empty name by itself
        if "\x00" in value or os.path.isabs(value) or value.startswith(("/", "\\")):
            _refuse(slide, value, root)
        target = _resolved(base / value)
        if target is None or not _within(target, root):
            _refuse(slide, value, root)


def _resolved(path: Path) -> Path | None:
    """``path`` with every symlink that exists followed; None if it cannot be (a loop)."""
    try:
        return path.resolve(strict=False)
    except (OSError, RuntimeError, ValueError):
        return None


def _within(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _refuse(slide: Path, companion: object, root: Path) -> NoReturn:
    logger.warning("refused slide %s: companion %r leads outside %s", slide, companion, root)
    raise InvalidArgumentError(OUTSIDE_MESSAGE)


# -- key files -----------------------------------------------------------------------------


def _key_file(data: bytes) -> Iterator[tuple[str, str, list[str]]]:
    """(lower-cased group, key, readings of the value) for every ``key=value`` line, read as
    leniently as GLib's GKeyFile (which OpenSlide uses) or more."""
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    group = ""
    for raw in text.split("\n"):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            end = line.rfind("]")
            group = (line[1:end] if end > 0 else line[1:]).strip().lower()
            continue
        key, sep, value = raw.partition("=")
        if not sep:
            continue
        yield group, key.strip(), _readings(value)


def _readings(value: str) -> list[str]:
    """Every way a key-file reader could take ``value``: as is, trimmed, and unescaped."""
    out = {value, value.lstrip(), value.strip(), value.rstrip("\r").lstrip()}
    for v in list(out):
        out.add(_unescape(v))
    return sorted(out)


def _unescape(value: str) -> str:
    """GKeyFile's escapes (``\\s \\n \\t \\r \\\\``); an unknown one keeps its character."""
    out: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch != "\\":
            out.append(ch)
            continue
        nxt = next(chars, "")
        out.append(_ESCAPES.get(nxt, nxt))
    return "".join(out)

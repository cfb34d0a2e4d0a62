"""Per-image captions from the two conventions people already use.

- `metadata.jsonl` in the image folder (the datasets library's `imagefolder` convention): one JSON object per
  line with `file_name` (relative to the folder) and a caption column (`text` by default, else `caption`).
  Every image column (`file_name`, `<column>_file_name`) must name a file inside the folder (`metadata_rows`).
- A sidecar text file beside each image (kohya's convention): `dog1.png` -> `dog1.txt` (or `dog1.caption`).
A metadata line wins over a sidecar file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from customize.data.images import ImageError, list_images

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
CAPTION_COLUMNS = ("text", "caption")  # tried in this order when no column is named
SIDECAR_EXTENSIONS = (".txt", ".caption")


class CaptionError(ValueError):
    """A caption source that cannot be used; the message names the file (and line) and what to do."""


def image_columns(row: dict) -> list[str]:
    """The columns of a metadata line that name image files: `file_name` and `<column>_file_name` (the datasets
    library's imagefolder convention, e.g. conditioning_image_file_name, edited_image_file_name)."""
    return [k for k in row if k == "file_name" or (isinstance(k, str) and k.endswith("_file_name"))]


def resolve_image_name(folder: Path, name, where: str, column: str = "file_name") -> Path:
    """`folder / name` for an image a metadata line names, refusing what is not a path inside the folder: a
    non-string, an absolute path, or one whose `..` parts leave it (symbolic links inside are followed)."""
    if not isinstance(name, str) or not name.strip():
        got = "null" if name is None else f"{type(name).__name__} {name!r}"
        raise CaptionError(f'{where}: "{column}" must be the name of an image file in {folder}, got {got}')
    inside = os.path.normpath(name)
    if os.path.isabs(name) or Path(name).drive or inside == ".." or inside.startswith(".." + os.sep):
        raise CaptionError(f'{where}: "{column}" {name!r} is outside {folder}; metadata.jsonl may only name images '
                           "inside its folder (e.g. 'dog1.png' or 'sub/dog1.png'): copy the image in")
    return folder / inside


def jsonl_lines(path: str | os.PathLike) -> list[tuple[int, str, object]]:
    """(line number, "<path>, line N", parsed value) of every non-empty line of a JSON-lines file; a line that
    is not JSON is a CaptionError (a ValueError) naming the file and the line."""
    path = Path(path)
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            out.append((lineno, where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise CaptionError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    return out


def metadata_rows(folder: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, row) of every line of `folder/metadata.jsonl`, with each image column checked by
    `resolve_image_name` (every reader of the file goes through here, so every image column gets the same rule)
    and the resolved paths under the same keys."""
    folder = Path(folder)
    meta = folder / METADATA_FILE
    rows = []
    for lineno, where, row in jsonl_lines(meta):
        # a line names its image as "file_name", or only as "<column>_file_name" (an InstructPix2Pix triplet:
        # input_image_file_name, edited_image_file_name), which datasets' imagefolder reads as image columns
        if not isinstance(row, dict) or not image_columns(row):
            raise CaptionError(f'{where}: needs a "file_name" entry naming an image in {folder}')
        for column in image_columns(row):
            row[column] = resolve_image_name(folder, row[column], where, column)
        rows.append((lineno, row))
    return rows


def read_metadata(folder: str | os.PathLike, caption_column: str | None = None) -> dict[Path, str | None]:
    """`folder/metadata.jsonl` -> {image path: caption}, in file order. Every line must name an existing image
    inside the folder, and no image twice."""
    folder = Path(folder)
    meta = folder / METADATA_FILE
    out: dict[Path, str | None] = {}
    lines: dict[Path, int] = {}
    for lineno, row in metadata_rows(folder):
        where = f"{meta}, line {lineno}"
        if "file_name" not in row:
            raise CaptionError(f'{where}: needs a "file_name" entry naming an image in {folder} (it has '
                               f"{sorted(row)})")
        path = row["file_name"]
        if not path.is_file():
            raise ImageError(f"{where}: names {str(path.relative_to(folder))!r}, but {path} does not exist; "
                             "fix the file name or remove the line")
        if path in lines:
            raise CaptionError(f"{where}: names {str(path.relative_to(folder))!r} again (line {lines[path]} names "
                               "it too), so one of the two captions would be dropped: keep one line per image")
        lines[path] = lineno
        if caption_column is not None:
            if caption_column not in row:
                raise CaptionError(f"{where}: no {caption_column!r} column (it has {sorted(row)}); "
                                   "pass the right --caption_column")
            caption = row[caption_column]
        else:
            caption = next((row[c] for c in CAPTION_COLUMNS if c in row), None)
        if caption is not None and not isinstance(caption, str):
            raise CaptionError(f"{where}: the caption must be a string, got {type(caption).__name__}")
        out[path] = caption
    return out


def read_paired(folder: str | os.PathLike, names) -> dict[Path, dict[str, Path]]:
    """{image path: {name: paired image path}} from `folder/metadata.jsonl`, where each `name` (e.g.
    "conditioning_image") is the column `<name>_file_name` of every line (the datasets library's imagefolder
    convention); `names` is a list, or {name: column prefix} to read a name from another column. Each path passed `resolve_image_name` in `metadata_rows` (nothing leaves the folder); a missing
    file or column is a one-line error naming the line."""
    folder = Path(folder)
    meta = folder / METADATA_FILE
    if not meta.is_file():
        columns = ", ".join(f'"{n}_file_name"' for n in (names.values() if isinstance(names, dict) else names))
        raise CaptionError(f"{folder} has no {METADATA_FILE}: paired images are named there, one line per image "
                           f'with "file_name" and {columns}')
    names = dict(names) if isinstance(names, dict) else {n: n for n in names}
    out: dict[Path, dict[str, Path]] = {}
    for lineno, row in metadata_rows(folder):
        where = f"{meta}, line {lineno}"
        if "file_name" not in row:
            raise CaptionError(f'{where}: needs a "file_name" entry naming an image in {folder} (it has '
                               f"{sorted(row)})")
        pair = {}
        for name, prefix in names.items():
            column = f"{prefix}_file_name"
            if column not in row:
                raise CaptionError(f"{where}: no {column!r} column (it has {sorted(row)}); every image needs its "
                                   f"{name.replace('_', ' ')}")
            path = row[column]
            if not path.is_file():
                raise ImageError(f"{where}: {column} names {str(path.relative_to(folder))!r}, but {path} does not "
                                 "exist; fix the file name or remove the line")
            pair[name] = path
        out[row["file_name"]] = pair
    return out


def read_sidecar(image: Path) -> str | None:
    for ext in SIDECAR_EXTENSIONS:
        side = image.with_suffix(ext)
        if side.is_file():
            return side.read_text(encoding="utf-8").strip()
    return None


def images_and_captions(folder: str | os.PathLike, caption_column: str | None = None
                        ) -> tuple[list[Path], list[str | None]]:
    """The images of a folder with their captions (None where an image has none).

    With a metadata.jsonl the images are the ones it lists, in its order (images it does not list are left
    out, with a warning); without one, every image in the folder, sorted by name."""
    folder = Path(folder)
    if (folder / METADATA_FILE).is_file():
        meta = read_metadata(folder, caption_column)
        if not meta:
            raise ImageError(f"{folder / METADATA_FILE} lists no images; add lines or remove the file")
        present = {p.resolve() for p in list_images(folder, recursive=True)}
        # the paired images a line names (conditioning_image_file_name, ...) are listed too
        named = {row[c].resolve() for _, row in metadata_rows(folder) for c in image_columns(row)}
        unlisted = present - named
        if unlisted:
            logger.warning("%d image(s) in %s are not in %s and are not used, e.g. %s",
                           len(unlisted), folder, METADATA_FILE, sorted(unlisted)[0].name)
        images = list(meta)
        captions = [c if c is not None else read_sidecar(p) for p, c in meta.items()]
        return images, captions
    images = list_images(folder)
    return images, [read_sidecar(p) for p in images]

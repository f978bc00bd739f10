"""Captioned images for training, read from the layouts diffusers' training guides use.

    a folder with metadata.jsonl    Hugging Face "imagefolder": one JSON object per line,
                                    {"file_name": "0001.png", "text": "a red circle"}; file names
                                    are relative to the folder (metadata.csv works the same way)
    a .jsonl file                   one JSON object per line with an image path and a caption
    a .csv file                     a header line, then one row per image
    "shapes"                        the shapes world's training stream (no files: drawn on demand)

`image_column` / `caption_column` name the fields (the guide's --image_column / --caption_column;
defaults "image" and "text"; in an imagefolder the image field is always "file_name"). Everything
is checked when the list is read, before any model is loaded: a missing file, a missing field or
an empty list is one sentence naming the line.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from minidiff.errors import InputError


@dataclass(frozen=True)
class CaptionedImage:
    """One training pair: an image file (or, for the shapes stream, a scene index) and its caption."""

    image: Path | int
    caption: str

    def load(self) -> PIL.Image.Image:
        """The image as RGB PIL (a shapes scene is drawn from its index in the training stream)."""
        if isinstance(self.image, int):
            from minidiff.training.shapes.data import SHAPES_TRAIN_SEED, training_scene

            return training_scene(SHAPES_TRAIN_SEED, self.image).pil()
        with PIL.Image.open(self.image) as im:
            return im.convert("RGB")


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) for each record of a .jsonl or .csv file; `where` names the line."""
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}, line {i}: not valid JSON ({err.msg}).") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}, line {i}: expected a JSON object with an image and a caption.")
            rows.append((f"{path}, line {i}", row))
        return rows
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [(f"{path}, line {i}", row) for i, row in enumerate(csv.DictReader(f), start=2)]
    raise InputError(f"{path}: a caption list must be a .jsonl or .csv file (or a folder with metadata.jsonl).")


def read_captioned_images(source, image_column: str = "image", caption_column: str = "text") -> list[CaptionedImage]:
    """The pairs of a folder (metadata.jsonl / metadata.csv), a .jsonl or a .csv file."""
    source = Path(source)
    if source.is_dir():
        listing = next((source / n for n in ("metadata.jsonl", "metadata.csv") if (source / n).is_file()), None)
        if listing is None:
            raise InputError(f"{source}: an image folder needs a metadata.jsonl (or metadata.csv) with a file_name "
                             f"and a {caption_column!r} field per image.")
        image_column, root = "file_name", source
    elif source.is_file():
        listing, root = source, source.parent
    else:
        raise InputError(f"{source}: no such folder or caption file.")
    pairs = []
    for where, row in _rows(listing):
        for column in (image_column, caption_column):
            if column not in row or row[column] in (None, ""):
                raise InputError(f"{where}: no {column!r} field (fields: {sorted(row)}); name the columns with "
                                 f"--image_column and --caption_column.")
        image, caption = root / str(row[image_column]), row[caption_column]
        if not isinstance(caption, str):
            raise InputError(f"{where}: the caption must be a string; got {type(caption).__name__}.")
        if not image.is_file():
            raise InputError(f"{where}: image {str(image)!r} does not exist.")
        pairs.append(CaptionedImage(image, caption))
    if not pairs:
        raise InputError(f"{listing}: no images listed.")
    return pairs


def shapes_captioned_images(n: int, start: int = 0) -> list[CaptionedImage]:
    """Scenes start .. start + n - 1 of the shapes training stream, as pairs (drawn on load)."""
    from minidiff.training.shapes.data import SHAPES_TRAIN_SEED, training_caption

    return [CaptionedImage(i, training_caption(SHAPES_TRAIN_SEED, i)) for i in range(start, start + n)]

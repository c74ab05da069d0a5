"""The image store: a folder of one PNG per prompt, written as images are generated, read in chunks.

A folder holds:

- ``NNNNN.png``: the image of prompt ``NNNNN``, written under a temporary name and renamed into
  place, so a file under its final name is complete;
- ``index.d/<part>.jsonl``: one JSON line per written image, appended after its rename:
  ``{"index", "key", "prompt", "seed", "file", "bytes", "sha256"}``. Each writer (a process, a
  torchrun rank) appends to its own ``part``, so several processes fill one folder without locks;
- ``index.json``: the assembled index (entries sorted by ``index``), written atomically by
  :meth:`ImageWriter.finalize` once every prompt has its image. A folder with it is complete.

A killed writer leaves its finished images with their lines; :meth:`ImageWriter.done` keeps those
whose file has the recorded size and SHA-256 and :meth:`ImageWriter.missing` lists the rest, so
generation resumes where it stopped. :class:`ImageFolder` reads a complete folder lazily: slices
load only their PNGs, so metrics stream a 5000-image cell in chunks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ptqbench.errors import UserError
from ptqbench.prompts import PromptSet, seed_for

INDEX = "index.json"
PARTS = "index.d"


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def png_bytes(image: torch.Tensor) -> bytes:
    """The PNG of one uint8 image ``[3, H, W]``."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _verified(folder: Path, entry: dict[str, Any]) -> bool:
    path = folder / entry["file"]
    try:
        if path.stat().st_size != entry["bytes"]:
            return False
        return hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    except (OSError, KeyError):
        return False


class ImageWriter:
    """Writes the images of ``prompts`` into ``folder``; this writer's lines go to ``index.d/<part>.jsonl``.

    One process: ``missing()``, then ``write`` each generated batch, then ``finalize()``. Several
    processes on one folder: each writes its share of ``missing()`` under its own ``part``, and one
    calls ``finalize()`` after all are done (it checks that every prompt has its image).
    """

    def __init__(self, folder: str | Path, prompts: PromptSet, part: str = "0"):
        self.folder, self.prompts, self.part = Path(folder), prompts, str(part)
        self.written = 0  # images this writer wrote

    def _part_files(self) -> list[Path]:
        return sorted((self.folder / PARTS).glob("*.jsonl"))

    def done(self) -> dict[int, dict[str, Any]]:
        """Verified entries by index: the assembled index of a complete folder, else every part's
        lines whose file is complete (size and SHA-256 as recorded) and whose prompt matches."""
        if (self.folder / INDEX).is_file():
            return {e["index"]: e for e in read_index(self.folder)}
        out: dict[int, dict[str, Any]] = {}
        for path in self._part_files():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if self._matches(entry) and _verified(self.folder, entry):
                    out[entry["index"]] = entry
        return out

    def _matches(self, entry: dict[str, Any]) -> bool:
        i = entry.get("index")
        p = self.prompts
        return isinstance(i, int) and 0 <= i < len(p) and entry.get("key") == p.keys[i] and entry.get(
            "prompt") == p.prompts[i]

    def missing(self, indices: Iterable[int] | None = None) -> list[int]:
        """Indices (of ``indices``, default all prompts) without a verified image."""
        done = self.done()
        return [i for i in (range(len(self.prompts)) if indices is None else indices) if i not in done]

    def write(self, indices: Sequence[int], images: torch.Tensor) -> list[dict[str, Any]]:
        """Save uint8 images ``[len(indices), 3, H, W]`` as the PNGs of ``indices``, then append their lines."""
        parts = self.folder / PARTS
        parts.mkdir(parents=True, exist_ok=True)
        entries = []
        for i, img in zip(indices, images, strict=True):
            data = png_bytes(img)
            name = image_name(i)
            _atomic_write(self.folder / name, data)
            key = self.prompts.keys[i]
            entries.append({
                "index": i, "key": key, "prompt": self.prompts.prompts[i], "seed": seed_for(key), "file": name,
                "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            })
        with open(parts / f"{self.part}.jsonl", "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
        self.written += len(entries)
        return entries

    def finalize(self) -> list[dict[str, Any]]:
        """Assemble ``index.json`` from the parts (every prompt must have a verified image)."""
        done = self.done()
        absent = [i for i in range(len(self.prompts)) if i not in done]
        if absent:
            raise RuntimeError(f"{self.folder}: {len(absent)} images missing (first: {absent[:5]})")
        entries = [done[i] for i in range(len(self.prompts))]
        write_index(self.folder, entries)
        return entries


def write_index(folder: str | Path, entries: list[dict[str, Any]]) -> None:
    """Write ``index.json`` atomically (a folder with it is complete)."""
    text = json.dumps(entries, indent=1, ensure_ascii=False) + "\n"
    _atomic_write(Path(folder) / INDEX, text.encode("utf-8"))


def read_index(directory: str | Path) -> list[dict[str, Any]]:
    path = Path(directory) / INDEX
    if not path.is_file():
        raise UserError(f"{path}: missing (an image folder needs index.json next to its PNGs)")
    return json.loads(path.read_text(encoding="utf-8"))


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class ImageFolder:
    """The images of a complete folder, in index order, read lazily as uint8 ``[N, 3, H, W]``.

    ``len``, ``shape``, ``ndim`` and ``dtype`` are known without reading pixels (the first PNG's
    header gives the size); ``folder[i:j]`` reads PNGs ``i..j-1`` only, ``folder[i]`` one image.
    ``generated`` is how many images the call that returned it generated (0 when only read).
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, directory: str | Path, generated: int = 0):
        self.directory = Path(directory)
        self.entries = read_index(self.directory)
        self.generated = generated
        self._size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def shape(self) -> torch.Size:
        if self._size is None:
            if not self.entries:
                self._size = (0, 0)
            else:
                with Image.open(self.directory / self.entries[0]["file"]) as im:
                    self._size = (im.height, im.width)
        return torch.Size((len(self), 3, *self._size))

    @property
    def keys(self) -> list[str]:
        return [e["key"] for e in self.entries]

    @property
    def seeds(self) -> list[int]:
        return [e["seed"] for e in self.entries]

    @property
    def prompts(self) -> list[str]:
        return [e["prompt"] for e in self.entries]

    def __getitem__(self, item: int | slice) -> torch.Tensor:
        if isinstance(item, slice):
            chosen = self.entries[item]
            if not chosen:
                return torch.empty(0, *self.shape[1:], dtype=torch.uint8)
            arrays = [_read_png(self.directory / e["file"]) for e in chosen]
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return torch.from_numpy(_read_png(self.directory / self.entries[item]["file"]).copy()).permute(2, 0, 1)

    def load(self, uint8: bool = True) -> torch.Tensor:
        """All images in memory: uint8, or float32 in [0, 1] (``uint8=False``)."""
        images = self[:] if self.entries else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
        return images if uint8 else images.float().div_(255)


def load_images(directory: str | Path, *, uint8: bool = False) -> torch.Tensor:
    """The images of a complete folder, in index order: ``[N, 3, H, W]``, float32 in [0, 1], or as stored."""
    return ImageFolder(directory).load(uint8)

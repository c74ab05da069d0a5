"""Image generation with fixed seeds, PNG folders, and the cached 16-bit reference images.

A folder of images holds one PNG per prompt and ``index.json``
(``[{"index", "key", "prompt", "seed", "file"}]``). Images are returned exactly as saved
(8-bit values, as uint8 or as float32 in [0, 1]), so a folder read back with :func:`load_images` equals what
was generated. The 16-bit reference images are generated once per (model identity, scheduler,
steps, guidance, resolution, prompt keys and texts, seed rule, dtype) and kept in the
:class:`~ptqbench.cache.Cache` under ``reference/<key>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ptqbench.cache import Cache, cache_key
from ptqbench.cudagraph import cuda_graphs
from ptqbench.errors import UserError
from ptqbench.layers import QuantLinear
from ptqbench.models.base import GenSettings, Pipeline
from ptqbench.prompts import SEED_RULE, PromptSet, seed_for

INDEX = "index.json"


class StageProgress(Protocol):
    """What long stages report to: ``stage(name, total)`` starts a stage, ``advance(n)`` moves it
    (not :data:`ptqbench.method.Progress`, the per-layer callback of ``quantize_layers``)."""

    def stage(self, name: str, total: int | None = None) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class NullProgress:
    """A :class:`StageProgress` that reports nothing."""

    def stage(self, name: str, total: int | None = None) -> None:
        return None

    def advance(self, n: int = 1) -> None:
        return None


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> uint8 (round to nearest), as PNGs store them."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def save_images(images: torch.Tensor, prompts: PromptSet, out_dir: str | Path, start: int = 0) -> list[dict[str, Any]]:
    """Write images ``start..`` of ``prompts`` as PNGs into ``out_dir``; returns their index entries."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for offset, img in enumerate(to_uint8(images)):
        i = start + offset
        name = f"{i:05d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(out / name)
        key = prompts.keys[i]
        entries.append({"index": i, "key": key, "prompt": prompts.prompts[i], "seed": seed_for(key), "file": name})
    return entries


def write_index(out_dir: str | Path, entries: list[dict[str, Any]]) -> None:
    (Path(out_dir) / INDEX).write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def read_index(directory: str | Path) -> list[dict[str, Any]]:
    path = Path(directory) / INDEX
    if not path.is_file():
        raise UserError(f"{path}: missing (an image folder needs index.json next to its PNGs)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_images(directory: str | Path, *, uint8: bool = False) -> torch.Tensor:
    """The images of a folder written by :func:`generate_images`, in index order: ``[N, 3, H, W]``,
    float32 in [0, 1], or as stored (``uint8=True``)."""
    entries = read_index(directory)
    if not entries:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8 if uint8 else torch.float32)
    arrays = [np.asarray(Image.open(Path(directory) / e["file"]).convert("RGB")) for e in entries]
    return _as_requested(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), uint8)


def _as_requested(images: torch.Tensor, uint8: bool) -> torch.Tensor:
    return images.contiguous() if uint8 else images.float().div_(255)


def generate_images(
    pipeline: Pipeline,
    prompts: PromptSet,
    settings: GenSettings,
    out_dir: str | Path,
    progress: StageProgress | None = None,
    *,
    uint8: bool = False,
) -> torch.Tensor:
    """Generate one image per prompt (seed = ``seed_for(key)``), save PNGs and ``index.json``.

    Returns the saved images ``[N, 3, H, W]``: float32 in [0, 1] (8-bit values), or the uint8
    values themselves (``uint8=True``, a quarter of the memory).
    """
    progress = progress or NullProgress()
    seeds = prompts.seeds()
    chunks, entries = [], []
    with cuda_graphs(pipeline.transformer):  # on a GPU, replay the transformer from CUDA graphs
        for start in range(0, len(prompts), settings.batch_size):
            stop = min(start + settings.batch_size, len(prompts))
            images = pipeline.generate(prompts.prompts[start:stop], seeds[start:stop], settings)
            entries += save_images(images, prompts, out_dir, start)
            chunks.append(to_uint8(images))
            progress.advance(stop - start)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_index(out_dir, entries)
    if not chunks:
        return _as_requested(torch.empty(0, 3, settings.resolution, settings.resolution, dtype=torch.uint8), uint8)
    return _as_requested(torch.cat(chunks), uint8)


def model_identity(pipeline: Pipeline) -> dict[str, Any]:
    """What identifies a pipeline's outputs: its info (weights, scheduler, dtype...) with the device type."""
    info = dict(pipeline.info())
    info["device"] = torch.device(pipeline.device).type
    return info


def reference_key(pipeline: Pipeline, prompts: PromptSet, settings: GenSettings) -> str:
    """Cache key of the 16-bit reference images (batch size left out: it changes no image)."""
    return cache_key(
        "reference",
        model_identity(pipeline),
        {"steps": settings.steps, "guidance": settings.guidance, "resolution": settings.resolution},
        list(prompts.keys),
        list(prompts.prompts),
        SEED_RULE,
    )


def reference_images(
    pipeline: Pipeline,
    prompts: PromptSet,
    settings: GenSettings,
    cache: Cache,
    progress: StageProgress | None = None,
    *,
    uint8: bool = False,
) -> tuple[Path, torch.Tensor]:
    """The 16-bit reference images (folder, tensor as :func:`generate_images` returns it): from the
    cache, else generated once and cached.

    ``pipeline.transformer`` must be unquantized when they are generated.
    """
    key = reference_key(pipeline, prompts, settings)
    folder = cache.path("reference", key)
    with cache.lock("reference", key):
        if cache.done("reference", key):
            progress = progress or NullProgress()
            progress.advance(len(prompts))
            return folder, load_images(folder, uint8=uint8)
        if any(isinstance(m, QuantLinear) for m in pipeline.transformer.modules()):
            raise RuntimeError("reference images need the 16-bit transformer: restore_model() it first")
        images = generate_images(pipeline, prompts, settings, folder, progress, uint8=uint8)
        meta = {"model": model_identity(pipeline), "settings": settings.__dict__, "prompt_set": prompts.name}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        cache.mark_done("reference", key)
    return folder, images

"""Fashion-MNIST from its idx files (the Debian package ``dataset-fashion-mnist`` or any folder).

The folder is, in order: the path given (``--data DIR``), ``$PTQBENCH_FASHION_MNIST``, then the
Debian package's ``/usr/share/datasets/fashion-mnist``. Files may be gzipped (``*.gz``) or not.
Images are ``uint8 [N, 28, 28]``, labels ``int64 [N]``; class ``i`` is ``FMNIST_CLASSES[i]`` (the names
the ``fmnist-classes`` prompt set uses).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ptqbench.errors import UserError
from ptqbench.prompts import FMNIST_CLASSES

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "PTQBENCH_FASHION_MNIST"
Split = Literal["train", "test"]
_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049
# Pixel statistics of the training set in [0, 1] (for the classifier's input normalization).
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530


def class_index(prompt: str) -> int:
    """The class of a prompt that names one (case-insensitive, e.g. ``"Ankle boot"`` -> 9)."""
    name = prompt.strip().lower()
    if name not in FMNIST_CLASSES:
        raise UserError(f"prompt {prompt!r}: not a Fashion-MNIST class (valid: {', '.join(FMNIST_CLASSES)})")
    return FMNIST_CLASSES.index(name)


def _locate(folder: Path, stem: str) -> Path | None:
    return next((folder / n for n in (stem, stem + ".gz") if (folder / n).is_file()), None)


def _missing_message(folder: Path, missing: list[str], how: str) -> str:
    return (
        f"Fashion-MNIST: {', '.join(f + '[.gz]' for f in missing)} not found in {folder} ({how}); "
        f"install the Debian package {DEBIAN_PACKAGE} (apt install {DEBIAN_PACKAGE}, files in {DEBIAN_DIR}), "
        f"or pass --data DIR / set ${ENV_VAR} to a folder with the four idx files of "
        "https://github.com/zalandoresearch/fashion-mnist"
    )


def data_dir(path: str | Path | None = None, split: Split | None = None) -> Path:
    """The folder holding the idx files of ``split`` (both splits if None); UserError if absent."""
    if path is not None:
        folder, how = Path(path).expanduser(), "the folder given"
    elif os.environ.get(ENV_VAR):
        folder, how = Path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}"
    else:
        folder, how = DEBIAN_DIR, f"the {DEBIAN_PACKAGE} package's folder"
    stems = [s for k in ([split] if split else list(_FILES)) for s in _FILES[k]]
    missing = [s for s in stems if _locate(folder, s) is None]
    if missing:
        raise UserError(_missing_message(folder, missing, how))
    return folder


def available(path: str | Path | None = None, split: Split | None = None) -> bool:
    try:
        data_dir(path, split)
    except UserError:
        return False
    return True


def _read_idx(file: Path, magic: int) -> np.ndarray:
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rb") as f:
        raw = f.read()
    got = int.from_bytes(raw[0:4], "big")
    if got != magic:
        raise UserError(f"{file}: not an idx file of this kind (magic {got}, expected {magic})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{file}: truncated or corrupt ({body.size} bytes of data for shape {dims})")
    return body.reshape(dims).copy()


def load_split(split: Split, path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of ``"train"`` (60k) or ``"test"`` (10k)."""
    if split not in _FILES:
        raise UserError(f"Fashion-MNIST split {split!r} (valid: {', '.join(_FILES)})")
    folder = data_dir(path, split)
    image_file, label_file = (_locate(folder, stem) for stem in _FILES[split])  # both exist: checked above
    images = _read_idx(image_file, _IMAGE_MAGIC)
    labels = _read_idx(label_file, _LABEL_MAGIC).astype(np.int64)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise UserError(f"{folder}: {split} images {images.shape} do not match labels {labels.shape}")
    return images, labels


def to_model_space(images: np.ndarray | torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 1, size, size]`` in [-1, 1], zero (black) padded."""
    x = torch.as_tensor(np.asarray(images)).float().div(127.5).sub(1.0).unsqueeze(1)
    pad = size - x.shape[-1]
    if pad < 0 or pad % 2:
        raise UserError(f"image size {size}: must be 28 + an even number of pixels")
    return F.pad(x, (pad // 2,) * 4, value=-1.0)


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 1, 28, 28]`` in [0, 1] (the metric input range)."""
    return torch.as_tensor(np.asarray(images)).float().div(255.0).unsqueeze(1)

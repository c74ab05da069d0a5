"""Prompt sets: named lists of (key, prompt) with one stable seed per key.

Sets: ``builtin`` and ``builtin-calib`` (shipped, disjoint), ``mjhq`` and ``mjhq-calib``
(MJHQ-30K ``meta_data.json``), ``sdci`` (``sDCI.yaml``), ``fmnist-classes`` and
``fmnist-calib`` (the Fashion-MNIST class names). The seed of an image is
:func:`seed_for` of its key, so the 16-bit reference and every quantized model see the same noise.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ptqbench.errors import UserError

SEED_RULE = "sha256(key)[:4] big-endian"
MJHQ_REPO, MJHQ_FILE = "playgroundai/MJHQ-30K", "meta_data.json"
SDCI_REPO, SDCI_FILE = "mit-han-lab/svdquant-datasets", "sDCI.yaml"
FMNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)


def seed_for(key: str) -> int:
    """The noise seed of a prompt key: the first 4 bytes of SHA-256(key), same on every machine."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:4], "big")


@dataclass(frozen=True)
class PromptSet:
    """A named, ordered set of prompts; ``keys`` are unique and give the seeds."""

    name: str
    keys: tuple[str, ...]
    prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.prompts):
            raise ValueError(f"prompt set {self.name}: {len(self.keys)} keys but {len(self.prompts)} prompts")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"prompt set {self.name}: keys are not unique")

    def __len__(self) -> int:
        return len(self.keys)

    def seeds(self) -> list[int]:
        return [seed_for(k) for k in self.keys]


# ----------------------------------------------------------------------------- sources


def _shipped(name: str) -> dict[str, str]:
    text = resources.files("ptqbench").joinpath("data/prompts.json").read_text(encoding="utf-8")
    return json.loads(text)[name]


def _take(name: str, items: Mapping[str, str], n: int | None) -> PromptSet:
    keys = list(items)
    if n is not None:
        if n < 1 or n > len(keys):
            raise UserError(f"prompt set {name}: n_prompts={n} is out of range (valid: 1..{len(keys)})")
        keys = keys[:n]
    return PromptSet(name, tuple(keys), tuple(items[k] for k in keys))


def _hub_file(repo: str, filename: str, env: str) -> Path:
    """``filename`` of the hub dataset ``repo`` (download or cache), or a UserError saying how to provide it."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset"))
    except Exception as exc:  # offline, not cached, gated, network: all mean "not available here"
        raise UserError(
            f"prompt file {filename} of the hub dataset {repo} is not available ({type(exc).__name__}); "
            f"download it (huggingface-cli download --repo-type dataset {repo} {filename}) and pass its path "
            f"(prompt set path) or set {env}=/path/to/{filename}"
        ) from None


def _locate(path: str | Path | None, env: str, repo: str, filename: str) -> Path:
    """A local file (``path`` or ``$env``; a folder means the file inside it) or the hub copy."""
    given = path or os.environ.get(env)
    if not given:
        return _hub_file(repo, filename, env)
    p = Path(given).expanduser()
    if p.is_dir():
        p = p / filename
    if not p.is_file():
        raise UserError(f"prompt set path {given}: {p} does not exist (expected {filename} of {repo})")
    return p


def load_mjhq(path: str | Path | None = None) -> dict[str, str]:
    """MJHQ-30K ``meta_data.json`` as {key: prompt}, in file order."""
    p = _locate(path, "PTQBENCH_MJHQ", MJHQ_REPO, MJHQ_FILE)
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
        return {str(k): str(v["prompt"]) for k, v in meta.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{p}: not an MJHQ meta_data.json ({{key: {{'prompt': ...}}}}): {exc}") from None


def mjhq_order(keys: list[str]) -> list[str]:
    """deepcompressor's order: the keys shuffled with ``random.Random(0)``."""
    order = list(keys)
    random.Random(0).shuffle(order)
    return order


def load_sdci(path: str | Path | None = None) -> dict[str, str]:
    """sDCI prompts as {key: prompt} from ``sDCI.yaml`` (a mapping key -> prompt or key -> {prompt: ...})."""
    import yaml

    p = _locate(path, "PTQBENCH_SDCI", SDCI_REPO, SDCI_FILE)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{p}: malformed YAML: {exc}") from None
    if isinstance(data, list):
        data = {f"sdci-{i:05d}": v for i, v in enumerate(data)}
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping key -> prompt, got {type(data).__name__}")
    out = {}
    for k, v in data.items():
        text = v.get("prompt") if isinstance(v, dict) else v
        if not isinstance(text, str):
            raise UserError(f"{p}: entry {k!r} has no prompt text")
        out[str(k)] = text
    return out


def _mjhq(n: int | None, path: str | Path | None, calib: bool) -> PromptSet:
    items = load_mjhq(path)
    name = "mjhq-calib" if calib else "mjhq"
    order = mjhq_order(list(items))
    n = len(order) if n is None else n
    if not 1 <= n <= len(order):
        raise UserError(f"prompt set {name}: n_prompts={n} is out of range (valid: 1..{len(order)})")
    # eval: the first n of the shuffled order; calib: the last n, disjoint from any eval subset it does not overlap
    keys = sorted(order[-n:] if calib else order[:n])
    return PromptSet(name, tuple(keys), tuple(items[k] for k in keys))


def _fmnist(n: int | None, calib: bool) -> PromptSet:
    n = len(FMNIST_CLASSES) if n is None else n
    if n < 1:
        raise UserError(f"prompt set fmnist: n_prompts={n} must be >= 1")
    prefix = "calib/" if calib else ""
    keys, prompts = [], []
    for i in range(n):
        cls, rep = FMNIST_CLASSES[i % len(FMNIST_CLASSES)], i // len(FMNIST_CLASSES)
        keys.append(f"{prefix}{cls}" if rep == 0 else f"{prefix}{cls}#{rep}")
        prompts.append(cls)
    return PromptSet("fmnist-calib" if calib else "fmnist-classes", tuple(keys), tuple(prompts))


_SETS: dict[str, Callable[[int | None, Any], PromptSet]] = {
    "builtin": lambda n, path: _take("builtin", _shipped("builtin"), n),
    "builtin-calib": lambda n, path: _take("builtin-calib", _shipped("builtin-calib"), n),
    "mjhq": lambda n, path: _mjhq(n, path, calib=False),
    "mjhq-calib": lambda n, path: _mjhq(n, path, calib=True),
    "sdci": lambda n, path: _take("sdci", load_sdci(path), n),
    "fmnist-classes": lambda n, path: _fmnist(n, calib=False),
    "fmnist-calib": lambda n, path: _fmnist(n, calib=True),
}
PROMPT_SETS = tuple(_SETS)


def get_prompt_set(name: str, n: int | None = None, path: str | Path | None = None) -> PromptSet:
    """The prompt set ``name`` (first ``n`` prompts, all if None); ``path`` locates external files."""
    if name not in _SETS:
        raise UserError(f"prompt set: unknown name {name!r} (valid: {', '.join(PROMPT_SETS)})")
    return _SETS[name](n, path)

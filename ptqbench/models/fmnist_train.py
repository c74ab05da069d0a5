"""``ptqbench train-default``: retrain the shipped Fashion-MNIST DiT and its classifier.

Reproducible from a fixed seed. The DiT path needs only torch, diffusers, safetensors and numpy
(no mlflow, pandas or plotting), so it runs on a bare GPU machine with ``PYTHONPATH=.``. Writes to
``--out``: ``fmnist_dit.safetensors`` (fp16) and ``fmnist_dit_train.json`` (loss curve, seconds,
steps, seed, config, sample check), ``fmnist_classifier.safetensors`` and
``fmnist_classifier_train.json``, ``fmnist_test_feature_stats.npz`` (the real-image statistics
of ``fd_fmnist``); ``fmnist_dit_samples.png`` when Pillow is importable.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ptqbench.errors import UserError
from ptqbench.metrics.fmnist_metrics import STATS_FILE, compute_real_stats, file_sha256, save_stats
from ptqbench.models import fmnist
from ptqbench.models.fmnist_data import FMNIST_CLASSES, load_split, to_model_space, to_unit

Log = Callable[[str], None]


@dataclass(frozen=True)
class DiTTrainConfig:
    """Rectified-flow training of the DiT (AdamW, linear warm-up, EMA weights are the result).

    Each step: ``sigma ~ U(0, 1)``, ``x = (1 - sigma) x0 + sigma noise``, loss ``|v(x, sigma, c) - (noise - x0)|^2``;
    the class is replaced by the null class with probability ``class_dropout`` (for guidance).
    """

    steps: int = 6000
    batch_size: int = 512
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: int = 200
    class_dropout: float = 0.1
    ema: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.log_every < 1:
            raise UserError("train-default: --steps, --batch-size and log_every must be >= 1")
        if not 0.0 <= self.ema < 1.0 or not 0.0 <= self.class_dropout < 1.0:
            raise UserError("train-default: ema and class_dropout must be in [0, 1)")


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Adam with a one-cycle schedule, random shifts of up to 2 pixels as augmentation."""

    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    width: int = 16
    features: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("train-default: --classifier-epochs and the batch size must be >= 1")


def _versions() -> dict[str, str]:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- DiT


@dataclass
class DiTRun:
    transformer: torch.nn.Module
    tokens: fmnist.LabelTokens
    config: fmnist.DiTConfig
    train: DiTTrainConfig
    loss_curve: list[tuple[int, float]]
    seconds: float
    device: str

    def summary(self) -> dict[str, Any]:
        tail = [loss for _, loss in self.loss_curve[-max(1, len(self.loss_curve) // 10):]]
        return {
            "steps": self.train.steps,
            "seed": self.train.seed,
            "seconds": round(self.seconds, 2),
            "final_loss": round(float(np.mean(tail)), 5),
            "parameters": sum(p.numel() for p in self.transformer.parameters())
            + sum(p.numel() for p in self.tokens.parameters()),
            "device": self.device,
        }


def train_dit(images: np.ndarray, labels: np.ndarray, config: fmnist.DiTConfig, train: DiTTrainConfig,
              device: torch.device, log: Log = print) -> DiTRun:
    """Train from scratch; the same seed on the same device gives the same weights."""
    torch.manual_seed(train.seed)
    transformer, tokens = fmnist.build_transformer(config).to(device), fmnist.LabelTokens(config).to(device)
    params = [*transformer.parameters(), *tokens.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    warmup = max(1, min(train.warmup, train.steps // 5))  # short runs warm up for a fifth of their steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    data = to_model_space(images, config.image_size).to(device)
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(train.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    curve: list[tuple[int, float]] = []
    running = torch.zeros((), device=device)
    transformer.train()
    _sync(device)
    start = time.perf_counter()
    for step in range(1, train.steps + 1):
        idx = torch.randint(0, data.shape[0], (train.batch_size,), generator=gen, device=device)
        x0, c = data[idx], y[idx]
        drop = torch.rand(c.shape, generator=gen, device=device) < train.class_dropout
        c = torch.where(drop, torch.full_like(c, fmnist.NULL_CLASS), c)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        sigma = torch.rand(c.shape, generator=gen, device=device)
        s = sigma.view(-1, 1, 1, 1)
        with autocast:
            v = fmnist.velocity(transformer, tokens, (1 - s) * x0 + s * noise, sigma, c)
        loss = F.mse_loss(v.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        opt.step()
        sched.step()
        decay = min(train.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        running += loss.detach()
        if step % train.log_every == 0 or step == train.steps:
            n = step - (curve[-1][0] if curve else 0)
            curve.append((step, round(float(running.item()) / n, 5)))
            running.zero_()
            log(f"dit step {step}/{train.steps} loss {curve[-1][1]:.4f} ({time.perf_counter() - start:.0f} s)")
    _sync(device)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    return DiTRun(transformer.eval(), tokens.eval(), config, train, curve, seconds, str(device))


def sample_check(run: DiTRun, classifier: fmnist.FMNISTClassifier | None, n: int, device: torch.device,
                 steps: int = 20, guidance: float = 2.0) -> tuple[dict[str, Any], torch.Tensor]:
    """Generate ``n`` images (classes in turn, seeds 0..n-1) and classify them: the accuracy, the images."""
    labels = torch.arange(n) % len(FMNIST_CLASSES)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    size = run.config.image_size
    noise = torch.stack([torch.randn((1, size, size), generator=g) for g in gens])
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        x = fmnist.sample(run.transformer, run.tokens, noise.to(device), labels.to(device), steps, guidance)
    images = fmnist.to_images(x)
    result: dict[str, Any] = {"n": n, "steps": steps, "guidance": guidance}
    if classifier is not None:
        pred, _ = fmnist.classify(classifier, images, device)
        result["class_accuracy"] = round(float((pred == labels).float().mean()), 4)
    return result, images


def save_grid(path: Path, images: torch.Tensor, columns: int = 10) -> Path | None:
    """A PNG grid of ``images`` (rows of ``columns``); None when Pillow is not importable."""
    try:
        from PIL import Image
    except ImportError:
        return None
    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(rows * (h + 2), columns * (w + 2))
    for i in range(n):
        r, c = divmod(i, columns)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = images[i, 0]
    Image.fromarray((grid.numpy() * 255).round().astype(np.uint8), mode="L").save(path)
    return path


# ----------------------------------------------------------------------------- classifier


def _shift(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels in x and y (zero fill)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, 1, h, w + 2 * pad)
    out = padded.gather(2, rows.to(x.device))
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, 1, h, w)
    return out.gather(3, cols.to(x.device))


def evaluate_classifier(model: fmnist.FMNISTClassifier, images: np.ndarray, labels: np.ndarray,
                        device: torch.device) -> float:
    pred, _ = fmnist.classify(model, to_unit(images), device)
    return float((pred == torch.as_tensor(labels)).float().mean())


def train_classifier(train_data: tuple[np.ndarray, np.ndarray], test_data: tuple[np.ndarray, np.ndarray],
                     cfg: ClassifierTrainConfig, device: torch.device,
                     log: Log = print) -> tuple[fmnist.FMNISTClassifier, dict[str, Any]]:
    """Train the classifier from scratch; returns it (eval mode) and its training log."""
    torch.manual_seed(cfg.seed)
    model = fmnist.FMNISTClassifier(cfg.width, cfg.features).to(device)
    x, y = to_unit(train_data[0]), torch.as_tensor(train_data[1])
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = math.ceil(len(x) / cfg.batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * per_epoch)
    epochs = []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order, total = torch.randperm(len(x), generator=gen), 0.0
        for i in range(per_epoch):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            xb = _shift(x[idx], gen).to(device)
            loss = F.cross_entropy(model(xb), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        acc = evaluate_classifier(model, *test_data, device)
        epochs.append({"epoch": epoch + 1, "train_loss": round(total / per_epoch, 5), "test_accuracy": round(acc, 5)})
        log(f"classifier epoch {epoch + 1}/{cfg.epochs} loss {total / per_epoch:.4f} test accuracy {acc:.4f}")
    seconds = time.perf_counter() - start
    with torch.no_grad():  # the weights ship in fp16: the accuracy recorded is theirs
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    acc = evaluate_classifier(model, *test_data, device)
    info = {"config": asdict(cfg), "test_accuracy": round(acc, 5), "test_n": len(test_data[1]),
            "epochs": epochs, "seconds": round(seconds, 2), "device": str(device)}
    return model.eval(), info


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, t, c = fmnist.DiTConfig(), DiTTrainConfig(), ClassifierTrainConfig()
    parser.add_argument("--data", help="folder with the Fashion-MNIST idx files (default: $PTQBENCH_FASHION_MNIST, "
                        "then /usr/share/datasets/fashion-mnist from the Debian package dataset-fashion-mnist)")
    parser.add_argument("--out", required=True, help="folder for the weights and the training logs")
    parser.add_argument("--steps", type=int, default=t.steps, help=f"DiT training steps (default {t.steps})")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=t.seed, help=f"seed of both trainings (default {t.seed})")
    parser.add_argument("--batch-size", type=int, default=t.batch_size, help=f"DiT batch (default {t.batch_size})")
    parser.add_argument("--hidden", type=int, default=d.hidden, help=f"DiT width (default {d.hidden})")
    parser.add_argument("--layers", type=int, default=d.layers, help=f"DiT blocks (default {d.layers})")
    parser.add_argument("--head-dim", type=int, default=d.head_dim, help=f"DiT head size (default {d.head_dim})")
    parser.add_argument("--only", choices=("dit", "classifier"), help="train only one of the two models")
    parser.add_argument("--classifier-epochs", type=int, default=c.epochs, help=f"(default {c.epochs})")
    parser.add_argument("--classifier", help="classifier weights for the DiT's sample check (default: the one "
                        "trained in this run, else the shipped one)")
    parser.add_argument("--check-samples", type=int, default=100,
                        help="images generated after training and classified (0: none; default 100)")


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"train-default --device: {name!r} is not a device (valid: cpu, cuda, cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train-default --device: cuda asked for, but torch sees no GPU (use --device cpu)")
    return device


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _log(msg: str) -> None:
    print(msg, flush=True)


def main(args: argparse.Namespace) -> int:
    device = _device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_data = load_split("train", args.data)
    test_data = load_split("test", args.data)
    classifier = None
    if args.only != "dit":
        cfg = ClassifierTrainConfig(epochs=args.classifier_epochs, seed=args.seed)
        classifier, info = train_classifier(train_data, test_data, cfg, device, _log)
        info["versions"] = _versions()
        file = fmnist.save_classifier(out / fmnist.CLASSIFIER_FILE, classifier.cpu(), info)
        _write_json(out / "fmnist_classifier_train.json", info)
        save_stats(out / STATS_FILE, *compute_real_stats(classifier, args.data), file_sha256(file))
        _log(f"classifier: test accuracy {info['test_accuracy']:.4f} -> {out / fmnist.CLASSIFIER_FILE}")
    if args.only == "classifier":
        return 0
    config = fmnist.DiTConfig(hidden=args.hidden, layers=args.layers, head_dim=args.head_dim)
    train = DiTTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    run = train_dit(*train_data, config, train, device, _log)
    summary = run.summary()
    if args.check_samples > 0:
        if classifier is None:
            try:
                classifier, _ = fmnist.load_classifier(args.classifier)
            except UserError as exc:
                _log(f"sample check without class accuracy: {exc}")
        check, images = sample_check(run, classifier, args.check_samples, device)
        summary["sample_check"] = check
        save_grid(out / "fmnist_dit_samples.png", images)
    fmnist.save_dit(out / fmnist.DIT_FILE, run.transformer, run.tokens, config, summary)
    log = {**summary, "config": asdict(config), "train": asdict(train), "loss_curve": run.loss_curve,
           "versions": _versions()}
    _write_json(out / "fmnist_dit_train.json", log)
    _log(f"dit: {summary['parameters']} parameters, final loss {summary['final_loss']:.4f} in "
         f"{summary['seconds']:.0f} s; sample check {summary.get('sample_check')} -> {out / fmnist.DIT_FILE}")
    return 0

"""ptqbench's ImageReward vs the image-reward 1.5 package on the real ImageReward-v1.0 checkpoint.

Needs the real files (not downloadable in ptqbench's CI): ``ImageReward.pt``, ``med_config.json``
and bert-base-uncased in the Hugging Face cache. Run in an environment where ``import ImageReward``
works (ptqbench's implementation runs there too; checked with transformers 4.46.3), e.g.::

    python -m venv /tmp/irenv && /tmp/irenv/bin/pip install torch torchvision image-reward==1.5 \
        transformers==4.46.3 'tokenizers<0.21' 'huggingface-hub<1' diffusers==0.31.0 'datasets<4' \
        timm==0.6.13 fairscale==0.4.13 openai-clip ftfy 'setuptools<81'
    PYTHONPATH=. /tmp/irenv/bin/python benchmarks/image_reward_parity.py \
        --checkpoint ~/.cache/ImageReward/ImageReward.pt --med-config ~/.cache/ImageReward/med_config.json \
        [--images-dir RUN/images] [--device cuda]

Prints each (prompt, image) reward of both and the max |difference| (expected below 1e-4 in float32).
With ``--images-dir`` (a ptqbench run's images folder with ``index.json``) it scores those images,
otherwise a few synthetic ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars, oil painting", "a red car at night"]


def pairs(images_dir: Path | None) -> list[tuple[str, Image.Image]]:
    if images_dir is None:
        rng = np.random.default_rng(0)
        shapes = [(256, 256), (300, 200), (512, 768)]
        return [(p, Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)))
                for p, s in zip(PROMPTS, shapes, strict=True)]
    index = json.loads((images_dir / "index.json").read_text())
    return [(e["prompt"], Image.open(images_dir / e["file"]).convert("RGB")) for e in index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--med-config", type=Path, required=True)
    parser.add_argument("--images-dir", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    import ImageReward as RM
    from huggingface_hub import try_to_load_from_cache

    from ptqbench.metrics import image_reward as ours

    theirs = RM.load(str(args.checkpoint), device=args.device, med_config=str(args.med_config)).eval()
    vocab = try_to_load_from_cache("bert-base-uncased", "vocab.txt")
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    mine = ours.ImageReward(ours.build_scorer(state).to(args.device), ours.bert_tokenizer(Path(vocab)), args.device)
    worst = 0.0
    with torch.no_grad():
        for prompt, image in pairs(args.images_dir):
            a, b = float(theirs.score(prompt, image)), float(mine.score([prompt], [image])[0])
            worst = max(worst, abs(a - b))
            print(f"{a:+.6f} {b:+.6f} {abs(a - b):.2e}  {prompt[:60]}")
    print(json.dumps({"max_abs_diff": worst}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

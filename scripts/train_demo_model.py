"""Train the built-in demo U-Net (``src/wsiseg/assets/demo_unet.pt``) on synthetic slides.

The network is the users' architecture (``wsiseg.model.Unet``, replicate padding, sigmoid in ``forward``) at base
width 8 with one output channel. Patches are rendered straight from
:class:`wsiseg.data.synthetic.SyntheticSlide` (no files), half centred on tumour, half elsewhere. Deterministic
for a given ``--seed`` on one machine (CPU, 2 threads).

    .venv/bin/python scripts/train_demo_model.py --steps 600 --out src/wsiseg/assets/demo_unet.pt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from wsiseg.data.synthetic import SyntheticSlide
from wsiseg.model import Unet


def sample_batch(
    slides: list[tuple[SyntheticSlide, tuple[np.ndarray, np.ndarray]]], rng: np.random.Generator, batch: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = [], []
    for i in range(batch):
        slide, fields = slides[rng.integers(len(slides))]
        tumour_field = fields[1]
        if i % 2 == 0 and (tumour_field > 0.5).any():
            ys, xs = np.nonzero(tumour_field > 0.5)
            k = rng.integers(len(ys))
            cx = (xs[k] + rng.uniform()) * slide.field_downsample
            cy = (ys[k] + rng.uniform()) * slide.field_downsample
        else:
            ys, xs = np.nonzero(fields[0] > 0.3)
            k = rng.integers(len(ys))
            cx = (xs[k] + rng.uniform()) * slide.field_downsample
            cy = (ys[k] + rng.uniform()) * slide.field_downsample
        x0 = int(np.clip(cx - size / 2, 0, slide.width - size))
        y0 = int(np.clip(cy - size / 2, 0, slide.height - size))
        rgb = slide.render(fields, x0, y0, size, size, 1.0)
        target = slide.sample(fields[1], x0, y0, size, size, 1.0) > 0.5
        target &= slide.sample(fields[0], x0, y0, size, size, 1.0) > 0.5
        images.append(rgb)
        targets.append(target)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    y = torch.from_numpy(np.stack(targets)).float().unsqueeze(1)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("src/wsiseg/assets/demo_unet.pt"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    rng = np.random.default_rng(args.seed)
    slides = []
    for seed in range(1000, 1012):
        slide = SyntheticSlide(6144, 6144, seed=seed)
        slides.append((slide, slide.fields()))
    net = Unet(3, 1, base_width=8)
    optimiser = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, total_steps=args.steps)
    loss_fn = torch.nn.BCELoss()
    start = time.time()
    net.train()
    for step in range(1, args.steps + 1):
        x, y = sample_batch(slides, rng, args.batch, args.size)
        p = net(x).clamp(1e-6, 1 - 1e-6)
        loss = loss_fn(p, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0:
            with torch.no_grad():
                pred = p > 0.5
                dice = (2 * (pred & (y > 0.5)).sum() / (pred.sum() + (y > 0.5).sum()).clamp(min=1)).item()
            print(
                f"step {step:4d}  loss {loss.item():.4f}  batch dice {dice:.3f}  {time.time() - start:.0f} s",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.eval().state_dict(), args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

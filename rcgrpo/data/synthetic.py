"""Built-in synthetic editing examples: a square on a smooth background, its mask, an instruction.

Used by `rcgrpo edit` without `--image`, by the tiny training preset and by tests. Deterministic in
the seed; no files needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

COLORS = {
    "blue": (0.15, 0.25, 0.85),
    "green": (0.2, 0.7, 0.25),
    "yellow": (0.9, 0.85, 0.2),
    "gray": (0.5, 0.5, 0.5),
}


@dataclass
class EditExample:
    """One edit: source image `[3, H, W]` in [0, 1], pixel mask `[H, W]` (1 = edit), instruction."""

    image: torch.Tensor
    mask: torch.Tensor
    instruction: str
    example_id: str
    metadata: dict = field(default_factory=dict)


def square_example(seed: int = 0, size: int = 32, *, color: str | None = None) -> EditExample:
    """A coloured square (side size/4 .. size/2) at a seeded position on a seeded gradient background."""
    gen = torch.Generator().manual_seed(seed)
    names = list(COLORS)
    color = color or names[int(torch.randint(len(names), (1,), generator=gen))]
    side = int(torch.randint(size // 4, size // 2 + 1, (1,), generator=gen))
    top = int(torch.randint(0, size - side + 1, (1,), generator=gen))
    left = int(torch.randint(0, size - side + 1, (1,), generator=gen))
    ys = torch.linspace(0, 1, size)[:, None]
    xs = torch.linspace(0, 1, size)[None, :]
    base = torch.rand(3, generator=gen) * 0.5 + 0.25
    tilt = (torch.rand(3, generator=gen) - 0.5) * 0.4
    image = (base[:, None, None] + tilt[:, None, None] * (ys + xs)[None]).clamp(0, 1)
    image[:, top : top + side, left : left + side] = torch.tensor(COLORS[color])[:, None, None]
    mask = torch.zeros(size, size)
    mask[top : top + side, left : left + side] = 1.0
    return EditExample(image=image, mask=mask, instruction=f"make the {color} square red",
                       example_id=f"square-{seed}", metadata={"color": color, "box": (top, left, side)})


class SquareDataset:
    """`n` seeded square examples (a list-like dataset for the trainer)."""

    def __init__(self, n: int, *, size: int = 32, seed: int = 0):
        self.examples = [square_example(seed + i, size) for i in range(n)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, idx: int) -> EditExample:
        return self.examples[idx]


def redness_reward(edited, sources, masks, instructions, metadata):
    """Demo task reward `[B]`: mean of R − (G + B)/2 over the edit region, in [−1, 1].

    Signature of every rcgrpo reward: edited/sources `[B, 3, H, W]` in [0, 1], masks `[B, 1, H, W]`.
    """
    img = edited.float()
    m = masks.float().to(img.device)[:, 0]
    red = img[:, 0] - 0.5 * (img[:, 1] + img[:, 2])
    return (red * m).sum((-1, -2)) / m.sum((-1, -2)).clamp_min(1e-6)

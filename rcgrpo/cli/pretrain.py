"""`rcgrpo pretrain-tiny`: train the tiny MiniBench editor from a seed (VAE, then flow matching on
generated (source, instruction) → target pairs), as the shipped `tiny-editor` was trained.

    rcgrpo pretrain-tiny --output-dir runs/tiny-editor --work-dir runs/tiny-editor.work      (~47 min, 1 thread)

The defaults reproduce the shipped weights bit for bit (seed 0); see rcgrpo.minibench.pretrain.
"""
from __future__ import annotations

from .parsing import parse


def main(argv: list[str], prog: str = "rcgrpo pretrain-tiny") -> int:
    import logging

    from ..minibench.pretrain import PretrainConfig, run_pretrain

    config = parse((PretrainConfig,), argv, prog, description=__doc__.splitlines()[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path = run_pretrain(config)
    print(f"tiny editor written to {path}")
    return 0

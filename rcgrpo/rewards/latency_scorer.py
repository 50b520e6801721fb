"""A cheap deterministic stand-in for EditScore behind the reward server, with a set latency.

    RCGRPO_SCORER_LATENCY_S=0.2 python -m rcgrpo.reward_server --scorer rcgrpo.rewards.latency_scorer:score --port 8801

For checking a set-up of several servers, fail-over and the overlap of rewards with rollouts without a
GPU (the tests and `benchmarks/test_bench_reward_overlap.py` use it). Each edited image scores the
mean of its red channel minus the mean of its green channel, in [-1, 1] (the images are decoded from
8-bit PNGs, so every server gives the same score for the same image), after a wait of
`$RCGRPO_SCORER_LATENCY_S` seconds per image (default 0), as a model's time per image would be.
"""
from __future__ import annotations

import os
import time

import numpy as np

LATENCY_ENV = "RCGRPO_SCORER_LATENCY_S"


def latency_per_image() -> float:
    """Seconds `score` waits per image: `$RCGRPO_SCORER_LATENCY_S` (ValueError unless a number ≥ 0)."""
    text = os.environ.get(LATENCY_ENV, "").strip() or "0"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"${LATENCY_ENV} must be a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise ValueError(f"${LATENCY_ENV} must be ≥ 0, got {text!r}")
    return value


def score(*, edited, sources=None, instructions=None) -> list[float]:
    """One float per PIL image of `edited`: mean red − mean green (pixels / 255)."""
    time.sleep(latency_per_image() * len(edited))
    out = []
    for image in edited:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
        out.append(float(pixels[..., 0].mean() - pixels[..., 1].mean()))
    return out


__all__ = ["LATENCY_ENV", "latency_per_image", "score"]

"""Reward lookup and composition: names → callables, and their weighted sum."""
from __future__ import annotations

import importlib
import math
from typing import Iterable

import torch

from .background import PSNR_CAP_DB, background_psnr, background_ssim
from .checks import RewardFn, check_reward_output, reward_name
from .clip import ClipLocalImageReward, ClipLocalTextReward
from .editscore import EditScoreClient
from .pool import EditScorePool, split_urls


class WeightedReward:
    """The weighted sum `Σ_k w_k · f_k(...)` of reward callables, every part validated.

    `compute_all(...)` returns `{name: values [B]}` for every function (names from `reward_name`, made
    unique with `_2`, `_3`, ...); `__call__` returns the weighted sum and keeps the parts in
    `self.components` for logging. It is `asynchronous` when every part is.
    """

    name = "weighted"

    def __init__(self, rewards: Iterable[tuple[RewardFn, float]]):
        self.rewards: list[tuple[str, RewardFn, float]] = []
        seen: dict[str, int] = {}
        for idx, item in enumerate(rewards):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"WeightedReward: item {idx} must be a (reward_fn, weight) pair, got {item!r}")
            fn, weight = item
            fn = resolve_reward(fn) if isinstance(fn, str) else fn
            if not callable(fn):
                raise ValueError(f"WeightedReward: item {idx} ({fn!r}) is not callable")
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise ValueError(f"WeightedReward: weight of item {idx} must be a number, got {weight!r}") from None
            if not math.isfinite(weight):
                raise ValueError(f"WeightedReward: weight of item {idx} must be finite, got {weight}")
            base = reward_name(fn)
            seen[base] = seen.get(base, 0) + 1
            name = base if seen[base] == 1 else f"{base}_{seen[base]}"
            self.rewards.append((name, fn, weight))
        if not self.rewards:
            raise ValueError("WeightedReward: give at least one (reward_fn, weight) pair")
        self.components: dict[str, torch.Tensor] = {}

    @property
    def asynchronous(self) -> bool:
        return all(getattr(fn, "asynchronous", False) is True for _name, fn, _w in self.rewards)

    @property
    def retry_count(self) -> int:
        return sum(int(getattr(fn, "retry_count", 0) or 0) for _name, fn, _w in self.rewards)

    @property
    def weights(self) -> dict[str, float]:
        return {name: w for name, _fn, w in self.rewards}

    def compute_all(self, edited, sources, masks, instructions, metadata) -> dict[str, torch.Tensor]:
        batch = edited.shape[0]
        out = {}
        for name, fn, _w in self.rewards:
            out[name] = check_reward_output(fn(edited, sources, masks, instructions, metadata), batch, name).cpu()
        return out

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for name, _fn, weight in self.rewards:
            part = weight * components[name]
            total = part if total is None else total + part
        return total.float()

    def __call__(self, edited, sources, masks, instructions, metadata) -> torch.Tensor:
        self.components = self.compute_all(edited, sources, masks, instructions, metadata)
        return self.combine(self.components)


REWARD_NAMES = ("background_psnr", "background_ssim", "clip_lct", "clip_lci", "editscore")


_REGISTERED: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make `name` (a config's `reward_funcs` entry, `--reward-funcs`) resolve to `fn`; benchmarks and
    plugins register their rewards this way (MiniBench registers "minibench" when imported)."""
    if not name or ":" in name or not callable(fn):
        raise ValueError(f"register_reward: expected a plain name and a callable, got {name!r}, {fn!r}")
    _REGISTERED[name] = fn


def resolve_reward(name_or_callable, **kwargs) -> RewardFn:
    """A reward callable from a name, a `"module:function"` path, or a callable (returned as is).

    Names: `background_psnr` (kwargs: cap_db), `background_ssim`, `clip_lct` (ClipLocalTextReward
    kwargs, e.g. model=, processor=), `clip_lci` (ClipLocalImageReward kwargs), `editscore`
    (`url` is required: one URL gives an EditScoreClient, several (a list, or separated by commas or
    spaces) an EditScorePool; other kwargs are theirs). `"pkg.module:attr"` imports `attr` (called with
    kwargs when it is a class or factory and kwargs are given).
    """
    if callable(name_or_callable) and not isinstance(name_or_callable, str):
        if kwargs:
            raise ValueError(f"resolve_reward: keyword arguments {sorted(kwargs)} given with a callable")
        return name_or_callable
    if not isinstance(name_or_callable, str):
        raise ValueError(f"resolve_reward: expected a reward name or callable, got {type(name_or_callable).__name__}")
    name = name_or_callable.strip()
    if name == "background_psnr":
        if kwargs:
            cap = kwargs.pop("cap_db", PSNR_CAP_DB)
            if kwargs:
                raise ValueError(f"resolve_reward: background_psnr takes only cap_db, got {sorted(kwargs)}")

            def psnr(edited, sources, masks, instructions=None, metadata=None):
                return background_psnr(edited, sources, masks, instructions, metadata, cap_db=cap)

            psnr.__name__ = "background_psnr"
            return psnr
        return background_psnr
    if name == "background_ssim":
        if kwargs:
            raise ValueError(f"resolve_reward: background_ssim takes no options, got {sorted(kwargs)}")
        return background_ssim
    if name == "clip_lct":
        return ClipLocalTextReward(**kwargs)
    if name == "clip_lci":
        return ClipLocalImageReward(**kwargs)
    if name in _REGISTERED and not kwargs:
        return _REGISTERED[name]
    if name == "editscore":
        if "url" not in kwargs:
            raise ValueError("resolve_reward: 'editscore' needs url=http://host:port of a running reward server")
        urls = split_urls(kwargs.pop("url"), "resolve_reward: editscore url")
        return EditScoreClient(urls[0], **kwargs) if len(urls) == 1 else EditScorePool(urls, **kwargs)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"resolve_reward: cannot import {name!r} ({exc})") from None
        if kwargs or isinstance(obj, type):
            obj = obj(**kwargs)
        if not callable(obj):
            raise ValueError(f"resolve_reward: {name!r} is not callable")
        return obj
    raise ValueError(f"resolve_reward: unknown reward {name!r}; choose one of {', '.join(REWARD_NAMES)}, "
                     "a 'module:function' path, or pass a callable")


def reward_funcs_from_config(config) -> list:
    """[(name, callable)] for `config.reward_funcs` (an `RCGRPOConfig`): the names of `resolve_reward`,
    "redness" (the built-in toy task), a registered name (`register_reward`: "minibench" once
    `rcgrpo.minibench` is imported) or 'module:function'; options come from the config's fields.
    'editscore' is an `EditScorePool` over the URLs of `editscore_url` (one URL is a pool of one: a
    restart of the server is waited for, up to `editscore_timeout`)."""
    funcs = []
    for name in map(str, config.reward_funcs):
        if name == "redness":
            from ..data.synthetic import redness_reward

            funcs.append((name, redness_reward))
        elif name in _REGISTERED:
            funcs.append((name, _REGISTERED[name]))
        elif name == "minibench":
            raise ValueError("reward 'minibench' registers itself when rcgrpo.minibench is imported (the rcgrpo "
                             "command does it)")
        elif name == "editscore":
            if not config.editscore_url:
                raise ValueError("reward 'editscore' needs --editscore-url http://host:port of a running reward server")
            funcs.append((name, EditScorePool(config.editscore_url, timeout=config.editscore_timeout,
                                              batch_size=config.editscore_batch_size)))
        elif name in ("clip_lct", "clip_lci"):
            funcs.append((name, resolve_reward(name, model=config.clip_model)))
        else:
            funcs.append((name, resolve_reward(name)))
    return funcs


__all__ = ["REWARD_NAMES", "WeightedReward", "register_reward", "resolve_reward", "reward_funcs_from_config"]

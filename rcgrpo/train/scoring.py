"""The rewards of one training step, remote ones off the critical path.

    scoring = RewardScheduler(reward_funcs, overlap=True, max_in_flight=4, phases=phases)
    scoring.begin_step()
    for each group:   ... roll out, decode ...
        scoring.submit(key, edited, sources, masks, instructions, metadata)   # as soon as it is decoded
    results = scoring.collect()            # key → {name: Tensor[G]} or the exception of that group
    ... advantages, update ...

Which rewards leave the critical path: a reward callable whose attribute `asynchronous` is True (the
EditScore client and pool of `rcgrpo.rewards` set it) declares that it is slow I/O, safe to call from
a background thread concurrently with itself, and that it takes CPU tensors. With `overlap` on, such
a reward runs in a background thread while the trainer rolls out the next group of the same step;
every other reward (local, cheap: PSNR, CLIP, ...) runs inline in `submit`, as before. With `overlap`
off, every reward runs inline in `submit`, in the order given. Asynchronous rewards get CPU tensors
either way, so both modes call every reward on the same values.

Bounds: at most `max_in_flight` background calls (one per group and asynchronous reward) are pending
per process; `submit` first waits for the oldest when that many are. Errors: an inline reward's
error propagates from `submit`, as before; a background call's error is kept and returned by
`collect` as that group's result, so it surfaces at the step that owns the group (the trainer
applies `bad_reward_policy` to `POLICY_ERRORS` there, exactly as to inline ones). `collect` waits for
every call of the step before it returns, so no call outlives its step.

Determinism: a reward's values depend only on its inputs (the group's images, the same in both
modes: rollouts never read rewards); background threads touch neither the model nor any random
generator; `collect` returns each group's components in `reward_funcs` order whatever order the
calls finished in. So the rewards, advantages and updates equal the synchronous path's bit for bit.

Accounting per step: `wait_s` = seconds the calling thread spent on rewards (inline calls, waits for
a free in-flight slot, and the wait in `collect` after the last rollout); `retries` = how many
requests the asynchronous rewards resent during the step (their `retry_count` attributes).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import time

import torch

from ..rewards.checks import check_reward_output
from ..rewards.pool import RewardsUnavailableError


class BadRewardError(RuntimeError):
    """A reward function returned a malformed or non-finite value."""


POLICY_ERRORS = (BadRewardError, RewardsUnavailableError)
"""The reward failures `bad_reward_policy` applies to (skip the group or stop); any other stops the run."""

RESERVED_NAMES = ("retries",)  # `reward/retries` is the retry count in the step metrics


def is_asynchronous(fn) -> bool:
    """True when the reward callable declares `asynchronous = True` (see the module docstring)."""
    return getattr(fn, "asynchronous", False) is True


def check_reward(values, batch: int, name: str) -> torch.Tensor:
    """`rcgrpo.rewards.check_reward_output` on the CPU; lists/arrays are accepted; failures raise BadRewardError."""
    if not isinstance(values, torch.Tensor):
        try:
            values = torch.as_tensor(values, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise BadRewardError(f"reward {name!r} returned {type(values).__name__}; expected a float tensor [{batch}]") from None
    try:
        return check_reward_output(values.detach(), batch, name).cpu()
    except ValueError as exc:
        raise BadRewardError(str(exc)) from None


class RewardScheduler:
    """Runs a step's reward calls: inline or in background threads (see the module docstring).

    Args:
        reward_funcs: `[(name, callable, weight)]` in the order the rewards are combined.
        overlap: run asynchronous rewards in background threads (False: everything inline).
        max_in_flight: most background calls pending at once (≥ 1).
        phases: a `rcgrpo.train.phases.Phases`; inline calls and waits are marked `reward`.
    """

    def __init__(self, reward_funcs, *, overlap: bool = True, max_in_flight: int = 4, phases=None):
        if max_in_flight < 1:
            raise ValueError(f"max_reward_requests_in_flight: expected an int ≥ 1, got {max_in_flight}")
        for name, _fn, _w in reward_funcs:
            if name in RESERVED_NAMES:
                raise ValueError(f"reward function name {name!r} is reserved (reward/{name} is a step metric)")
        self.reward_funcs = list(reward_funcs)
        self.asynchronous = [is_asynchronous(fn) for _, fn, _ in self.reward_funcs]
        self.overlap = bool(overlap) and any(self.asynchronous)
        self.max_in_flight = int(max_in_flight)
        self.phases = phases
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._inline: dict = {}  # key → {name: values}
        self._background: collections.OrderedDict = collections.OrderedDict()  # (key, name) → Future
        self._order: list = []  # keys in submission order
        self.wait_s = 0.0
        self.retries = 0
        self._retries_at_start = 0

    # ------------------------------------------------------------------ a step
    def begin_step(self) -> None:
        """Reset the step's accounting (`wait_s`, `retries`) and drop what an aborted step left (its
        background calls finish unread)."""
        for future in self._background.values():
            future.cancel()
        self._inline.clear()
        self._background.clear()
        self._order.clear()
        self.wait_s = 0.0
        self.retries = 0
        self._retries_at_start = self._retry_total()

    def submit(self, key, edited, sources, masks, instructions, metadata) -> None:
        """Start the rewards of one group: `edited`/`sources` `[G, 3, H, W]`, `masks` `[G, 1, H, W]`,
        `instructions`/`metadata` lists of G. Inline rewards run now (their errors propagate)."""
        if key in self._inline:
            raise ValueError(f"rewards of group {key!r} were already submitted in this step")
        group = edited.shape[0]
        cpu = (edited.cpu(), sources.cpu(), masks.cpu(), instructions, metadata)
        args = (edited, sources, masks, instructions, metadata)
        values = {}
        with self._timed():
            for (name, fn, _w), remote in zip(self.reward_funcs, self.asynchronous):
                if not (remote and self.overlap):
                    values[name] = check_reward(fn(*(cpu if remote else args)), group, name)
        self._inline[key] = values
        self._order.append(key)
        if not self.overlap:
            return
        for (name, fn, _w), remote in zip(self.reward_funcs, self.asynchronous):
            if remote:
                self._make_room()
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max_workers=self.max_in_flight, thread_name_prefix="rcgrpo-reward")
                self._background[(key, name)] = self._executor.submit(_call, fn, name, group, cpu)

    def collect(self) -> dict:
        """{key: {name: Tensor[G]} in `reward_funcs` order, or the exception that group's rewards raised},
        in submission order, once every call of the step has finished. Clears the step's groups."""
        with self._timed():
            concurrent.futures.wait(list(self._background.values()))
        results = {}
        for key in self._order:
            values, error = self._inline[key], None
            for name, _fn, _w in self.reward_funcs:
                future = self._background.get((key, name))
                if future is None:
                    continue
                exc = future.exception()
                if exc is not None:
                    error = error or exc
                else:
                    values[name] = future.result()
            results[key] = error if error is not None else {name: values[name] for name, _, _ in self.reward_funcs}
        self._inline.clear()
        self._background.clear()
        self._order.clear()
        self.retries = self._retry_total() - self._retries_at_start
        return results

    def close(self) -> None:
        """Stop the background threads (a later `submit` starts new ones)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ------------------------------------------------------------------ helpers
    def _make_room(self) -> None:
        """Wait for the oldest pending background calls until fewer than `max_in_flight` are pending."""
        pending = [f for f in self._background.values() if not f.done()]
        if len(pending) < self.max_in_flight:
            return
        with self._timed():
            for future in pending[: len(pending) - self.max_in_flight + 1]:
                concurrent.futures.wait([future])

    @contextlib.contextmanager
    def _timed(self):
        start = time.perf_counter()
        with self.phases("reward") if self.phases is not None else contextlib.nullcontext():
            try:
                yield
            finally:
                self.wait_s += time.perf_counter() - start

    def _retry_total(self) -> int:
        return sum(int(getattr(fn, "retry_count", 0) or 0) for _, fn, _ in self.reward_funcs)


def _call(fn, name: str, group: int, args) -> torch.Tensor:
    return check_reward(fn(*args), group, name)


__all__ = ["POLICY_ERRORS", "BadRewardError", "RewardScheduler", "check_reward", "is_asynchronous"]

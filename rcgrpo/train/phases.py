"""Named phases of an RC-GRPO step, marked by the trainer itself, for profilers and the dry run.

    phases = Phases()
    with phases("rollout"):                 # a torch.profiler.record_function range "rcgrpo/rollout"
        ...                                 # and phase_start / phase_end calls on every listener

The trainer marks: `rollout` (the pipeline's Euler loop, ACD capture included), `acd` (each ACD op
call, inside `rollout`), `decode`, `reward`, `advantages`, `update` (anchor predictions, surrogate
policy, backward), `anchor_forward` and `distances` (inside `update`), `optimizer` (clipping and
the AdamW step) and `diagnostics` (the no-grad pass after the update that measures how far it moved
the policy, config `log_policy_kl`). Any `torch.profiler` session sees these ranges; the dry run adds a listener that times
them and reads peak memory. The backward of the distances runs inside `loss.backward()`; the trainer
brackets it with `wrap_inputs` / `wrap_outputs`, so listeners see it as `distances` too.

A listener is any object with `phase_start(name)` and `phase_end(name, error)` (`error` is the
exception leaving the phase, or None). Listeners are called in the order they were added.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch

PHASE_NAMES = ("rollout", "acd", "decode", "reward", "advantages", "update", "anchor_forward", "distances",
               "optimizer", "diagnostics")


class PhaseListener(Protocol):
    def phase_start(self, name: str) -> None: ...

    def phase_end(self, name: str, error: BaseException | None) -> None: ...


class Phases:
    """Marks phases for `torch.profiler` (always) and for the registered listeners."""

    def __init__(self, listeners: tuple[PhaseListener, ...] | list[PhaseListener] = ()):
        self.listeners: list[PhaseListener] = list(listeners)

    def add_listener(self, listener: PhaseListener) -> None:
        self.listeners.append(listener)

    def remove_listener(self, listener: PhaseListener) -> None:
        self.listeners.remove(listener)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        with torch.profiler.record_function(f"rcgrpo/{name}"):
            for listener in self.listeners:
                listener.phase_start(name)
            error: BaseException | None = None
            try:
                yield
            except BaseException as exc:
                error = exc
                raise
            finally:
                for listener in reversed(self.listeners):
                    listener.phase_end(name, error)

    def wrap_inputs(self, inputs: torch.Tensor, name: str) -> torch.Tensor:
        """`inputs`, whose gradient leaving through them (in backward) ends phase `name`. Without
        listeners, or when `inputs` needs no grad, `inputs` itself."""
        if not self.listeners or not (torch.is_grad_enabled() and inputs.requires_grad):
            return inputs
        return _BackwardMark.apply(inputs, lambda: self._end(name))

    def wrap_outputs(self, outputs: torch.Tensor, name: str) -> torch.Tensor:
        """`outputs`, whose gradient arriving at them (in backward) starts phase `name`."""
        if not self.listeners or not (torch.is_grad_enabled() and outputs.requires_grad):
            return outputs
        return _BackwardMark.apply(outputs, lambda: self._start(name))

    def _start(self, name: str) -> None:
        for listener in self.listeners:
            listener.phase_start(name)

    def _end(self, name: str) -> None:
        for listener in reversed(self.listeners):
            listener.phase_end(name, None)


class _BackwardMark(torch.autograd.Function):
    """Identity whose backward calls `callback` before passing the gradient on."""

    @staticmethod
    def forward(ctx, tensor, callback):
        ctx.callback = callback
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return grad, None


__all__ = ["PHASE_NAMES", "PhaseListener", "Phases"]

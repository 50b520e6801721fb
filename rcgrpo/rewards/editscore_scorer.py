"""The reward server's EditScore scorer: `editscore.EditScore` (the `editscore` package, 0.2) behind the
reward-server scorer signature `scorer(edited=[PIL], sources=[PIL], instructions=[str]) -> [float]`.

What EditScore computes (read from editscore 0.2): for an edit it asks the backbone two questions,
each answered as `{"reasoning": "...", "score": [a, b]}` with scores in 0..score_range:
- semantic consistency (SC), shown the source and the edited image and the instruction:
  `[editing success, degree of over-editing]`;
- perceptual quality (PQ), shown the edited image only: `[naturalness, artifacts]`.
Per pass, SC = min(SC scores)/(score_range/10) and PQ = min(PQ scores)/(score_range/10), both on a
0-10 scale, and `overall = sqrt(SC · PQ)`. `evaluate` returns `prompt_following` (SC's first score),
`consistency` (SC's second), `perceptual_quality` (PQ) and `overall`, each averaged over `num_pass`
passes (pass i samples with seed `seed + i`).

**The reward is `overall`** (0-10), as in the paper; `key` can pick another field. The trainer
standardizes each task reward over the minibatch before combining (SPEC §6), so its scale does not matter.

Guards we add around editscore 0.2:
- when the backbone's answer cannot be parsed three times, EditScore makes up a random score
  (`random.randint`, reasoning "guess_if_cannot_parse"); such a result is refused here (the request
  fails with 500 and the server log says why) instead of becoming a random reward. With
  `num_pass > 1` EditScore only reports the last pass's reasoning, so a guess in an earlier pass
  cannot be seen;
- EditScore raises `ValueError("rate_limit_exceeded")` when the OpenAI-compatible service says so:
  answered 503 with Retry-After, so the client backs off and retries;
- `batched` uses `EditScore.batch_evaluate` (one backbone call for the whole request; the vLLM
  backbones have it) and reads its `O_score`, which is `overall`'s formula; a batched answer that
  could not be parsed is refused in the same way (batch_evaluate would substitute score_range/2).

`evaluate` shows the PQ question the edited image only; editscore 0.2's `batch_evaluate` shows it both
images (its `prepare_input(image_prompt, PQ_prompt)`), so batched scores can differ from unbatched ones.

Backbones (editscore 0.2): `openai` (any OpenAI-compatible chat-completions endpoint, `url`; the
API key comes from an environment variable, never the command line; runs anywhere), `qwen25vl`,
`qwen3vl` (transformers, need CUDA: inputs are moved to "cuda"; qwen-vl-utils needs torchvision),
`qwen25vl_vllm`, `qwen3vl_vllm` (vLLM), `internvl3_5` (lmdeploy; its `inference` takes no `seed`,
which `EditScore.evaluate` passes, so editscore 0.2 cannot score with it: refused at start-up).
Only `openai` is tested here (against a stub server); the GPU backbones are untested on CPU.
"""
from __future__ import annotations

import inspect
import math
import os
from typing import Any

from .score_queue import ScorerUnavailable

EDITSCORE_BACKBONES = ("openai", "qwen25vl", "qwen25vl_vllm", "qwen3vl", "qwen3vl_vllm", "internvl3_5")
EDITSCORE_KEYS = ("overall", "prompt_following", "consistency", "perceptual_quality")
CUDA_BACKBONES = ("qwen25vl", "qwen25vl_vllm", "qwen3vl", "qwen3vl_vllm", "internvl3_5")
LORA_BACKBONES = ("qwen25vl", "qwen25vl_vllm", "qwen3vl", "qwen3vl_vllm")
BATCH_BACKBONES = ("qwen25vl_vllm", "qwen3vl_vllm")
DEFAULT_OPENAI_URL = "https://api.openai.com/v1/chat/completions"

_GUESS_MARK = "guess_if_cannot_parse"
_BATCH_PARSE_FAILURES = ("Failed to parse after all strategies", "Input was empty.")


class EditScoreParseError(RuntimeError):
    """EditScore could not parse the backbone's answer and would have made a score up."""


def editscore_kwargs(*, backbone: str, model_name_or_path: str, url: str = "", api_key: str | None = None,
                     lora_path: str = "", score_range: int = 25, num_pass: int = 1, temperature: float = 0.7,
                     seed: int = 42, reduction: str = "average_last", tensor_parallel_size: int = 1,
                     max_model_len: int = 1536, max_num_seqs: int = 32, max_num_batched_tokens: int = 1536,
                     cache_dir: str = "") -> dict[str, Any]:
    """The keyword arguments of `editscore.EditScore(...)` (0.2) for these settings; ValueError for bad ones."""
    if backbone not in EDITSCORE_BACKBONES:
        raise ValueError(f"EditScore backbone {backbone!r}: expected one of {', '.join(EDITSCORE_BACKBONES)}")
    if not model_name_or_path:
        raise ValueError("EditScore needs a model: --editscore-model (a local path or hub id of the backbone; "
                         "for the openai backbone, the served model's name)")
    if score_range < 1 or num_pass < 1 or tensor_parallel_size < 1:
        raise ValueError(f"EditScore: score_range ({score_range}), num_pass ({num_pass}) and tensor_parallel_size "
                         f"({tensor_parallel_size}) must be at least 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"EditScore: temperature must be a finite number ≥ 0, got {temperature}")
    if reduction not in ("average_last", "average_first"):
        raise ValueError(f"EditScore: reduction must be average_last or average_first, got {reduction!r}")
    if lora_path and backbone not in LORA_BACKBONES:
        raise ValueError(f"EditScore backbone {backbone} does not load LoRA weights (--editscore-lora); "
                         f"LoRA works with {', '.join(LORA_BACKBONES)}")
    if url and backbone != "openai":
        raise ValueError(f"--editscore-url is the chat-completions endpoint of the openai backbone; backbone {backbone} "
                         "runs the model in this process")
    if backbone == "openai" and url and not url.startswith(("http://", "https://")):
        raise ValueError(f"--editscore-url must be an http(s) URL of a chat-completions endpoint, got {url!r}")
    kwargs: dict[str, Any] = dict(backbone=backbone, model_name_or_path=model_name_or_path, score_range=score_range,
                                  num_pass=num_pass, temperature=temperature, seed=seed, reduction=reduction,
                                  tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                                  max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  lora_path=lora_path or None, cache_dir=cache_dir or None)
    if backbone == "openai":
        kwargs.update(openai_url=url or DEFAULT_OPENAI_URL, key=api_key)
    return kwargs


class EditScoreScorer:
    """A reward-server scorer around `editscore.EditScore`; the score of each edit is its result's `key`.

    `model` lets a caller pass an EditScore object it built (tests); otherwise it is built from
    `editscore_kwargs(**settings)`. Construction checks what it can before loading weights.
    """

    requires_sources = True

    def __init__(self, *, key: str = "overall", batched: bool = False, model=None, **settings):
        if key not in EDITSCORE_KEYS:
            raise ValueError(f"EditScore result field {key!r}: expected one of {', '.join(EDITSCORE_KEYS)}")
        if batched and key != "overall":
            raise ValueError("--editscore-batched returns only the overall score (batch_evaluate's O_score); "
                             f"drop --editscore-key {key}")
        self.key = key
        self.batched = bool(batched)
        if model is None:
            kwargs = editscore_kwargs(**settings)
            backbone = kwargs["backbone"]
            if batched and backbone not in BATCH_BACKBONES:
                raise ValueError(f"--editscore-batched needs a backbone with batched inference "
                                 f"({', '.join(BATCH_BACKBONES)}), not {backbone}")
            if backbone in CUDA_BACKBONES:
                import torch

                if not torch.cuda.is_available():
                    raise RuntimeError(f"EditScore backbone {backbone} needs a CUDA GPU (editscore moves its inputs "
                                       "to 'cuda'); on a machine without one use --editscore-backbone openai")
            try:
                from editscore import EditScore
            except ImportError as exc:
                raise RuntimeError(f"--scorer editscore needs the 'editscore' package ({exc}); install it with "
                                   "pip install 'rcgrpo[editscore]' on the reward model's machine") from None
            model = EditScore(**kwargs)
        self.model = model
        self.backbone = getattr(model, "backbone", "?")
        self._check_backbone()

    def _check_backbone(self) -> None:
        backend = getattr(self.model, "model", None)
        if backend is None:
            raise RuntimeError(f"EditScore built no model for backbone {self.backbone!r}")
        method = "batch_inference" if self.batched else "inference"
        fn = getattr(backend, method, None)
        if fn is None:
            raise ValueError(f"EditScore backbone {self.backbone} has no {method}(); "
                             + ("drop --editscore-batched" if self.batched else "it cannot score"))
        params = inspect.signature(fn).parameters
        takes_seed = "seed" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        if not takes_seed:
            raise RuntimeError(f"EditScore backbone {self.backbone}: its {method}() takes no 'seed', which EditScore "
                               "passes; this editscore version cannot score with this backbone")

    def __call__(self, *, edited, sources, instructions) -> list[float]:
        if sources is None:
            raise ValueError("EditScore needs the source images")
        if self.batched:
            return self._batched(edited, sources, instructions)
        scores = []
        for src, out, text in zip(sources, edited, instructions):
            result = self._evaluate([src, out], text)
            for field in ("SC_reasoning", "PQ_reasoning"):
                if str(result.get(field, "")).startswith(_GUESS_MARK):
                    raise EditScoreParseError(
                        f"EditScore could not parse the {self.backbone} backbone's answer and guessed a random score "
                        f"({field}: {str(result[field])[:300]!r})")
            if self.key not in result:
                raise RuntimeError(f"EditScore result has no {self.key!r} field: {sorted(result)}")
            scores.append(float(result[self.key]))
        return scores

    def _evaluate(self, images, text) -> dict:
        try:
            return self.model.evaluate(images, text)
        except ValueError as exc:
            if "rate_limit_exceeded" in str(exc):
                raise ScorerUnavailable("the EditScore backbone's service reported a rate limit") from None
            raise

    def _batched(self, edited, sources, instructions) -> list[float]:
        results = self.model.batch_evaluate([[s, e] for s, e in zip(sources, edited)], list(instructions))
        scores = []
        for index, result in enumerate(results):
            for field in ("SC_score_reasoning", "PQ_score_reasoning"):
                if str(result.get(field, "")).startswith(_BATCH_PARSE_FAILURES):
                    raise EditScoreParseError(f"EditScore could not parse the {self.backbone} backbone's answer for "
                                              f"example {index} ({field}: {str(result[field])[:300]!r})")
            scores.append(float(result["O_score"]))
        return scores


def api_key_from_env(name: str) -> str | None:
    """The API key in environment variable `name` (None when unset or empty)."""
    if not name:
        return None
    return os.environ.get(name) or None


__all__ = ["BATCH_BACKBONES", "CUDA_BACKBONES", "DEFAULT_OPENAI_URL", "EDITSCORE_BACKBONES", "EDITSCORE_KEYS",
           "EditScoreParseError", "EditScoreScorer", "api_key_from_env", "editscore_kwargs"]

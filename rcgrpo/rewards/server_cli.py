"""`python -m rcgrpo.reward_server`: the reward server's options, scorer construction and start-up.

    python -m rcgrpo.reward_server --scorer editscore --editscore-backbone qwen25vl \\
        --editscore-model Qwen/Qwen2.5-VL-7B-Instruct --editscore-lora EditScore/EditScore-7B \\
        --editscore-score-range 25 --editscore-num-pass 1
    python -m rcgrpo.reward_server --scorer editscore --editscore-backbone openai --editscore-model gpt-4.1 \\
        --editscore-url https://api.openai.com/v1/chat/completions      # key from $OPENAI_API_KEY
    python -m rcgrpo.reward_server --scorer my_package.my_module:score  # any function

**Which EditScore field is the reward**: `overall` of `EditScore.evaluate` (0-10, the geometric mean
of the semantic-consistency and perceptual-quality scores, averaged over `--editscore-num-pass`
passes), as in the paper; `--editscore-key` picks another field (see `rcgrpo.rewards.editscore_scorer`).

**How the trainer uses it**: `rcgrpo train --reward-funcs editscore --editscore-url http://127.0.0.1:8765`
builds an `EditScoreClient` that sends each batch of (source, edited, instruction) to POST /score;
the returned scores are the task reward `R_task` (weighted by `--reward-weights` when several reward
functions are listed), standardized over the minibatch and combined with ACD as
`r = w_task·z(R_task) + w_acd·z(R_acd)` (SPEC §6). With `--token` (or `$RCGRPO_REWARD_TOKEN`) set on
the server, give the trainer the same token in `$RCGRPO_REWARD_TOKEN`, or put it in the URL as the
password (`http://trainer:<token>@host:8765`; saved configs keep the URL redacted).

A `module:function` scorer is called as `function(edited=[PIL.Image], sources=[PIL.Image] or None,
instructions=[str])` and returns one float per edited image; a function or class attribute
`requires_sources = True` makes the server refuse requests without sources. Server errors are in
`rcgrpo.rewards.server`. Exit status 2 for bad options, 1 when the server cannot start.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Literal

from .protocol import MiB, RequestLimits
from .server import DEFAULT_PORT, TOKEN_ENV, RewardServer, Scorer, ServerSettings, serve

log = logging.getLogger("rcgrpo.reward_server")

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
Backbone = Literal["openai", "qwen25vl", "qwen25vl_vllm", "qwen3vl", "qwen3vl_vllm", "internvl3_5"]


def _opt(help_text: str, **kwargs):
    return field(metadata={"help": help_text}, **kwargs)


@dataclass
class RewardServerOptions:
    """The flags of `python -m rcgrpo.reward_server` (`--name` or `--name_with_underscores`)."""

    host: str = _opt("address to bind; 127.0.0.1 serves this machine only", default="127.0.0.1")
    port: int = _opt("port; 0 picks a free one (printed at start-up)", default=DEFAULT_PORT)
    scorer: str = _opt("'editscore' or 'package.module:function'", default="editscore")
    token: str = _opt(f"require this bearer token from clients; prefer ${TOKEN_ENV}, which is read when this is "
                      "empty (command lines are visible to other users)", default="")
    max_request_mb: float = _opt("largest request body in MiB (413 beyond)", default=64.0)
    max_image_pixels: int = _opt("largest image, width x height, read from its PNG header (413 beyond)",
                                 default=RequestLimits.max_image_pixels)
    max_request_pixels: int = _opt("pixel budget of one request over all its images (413 beyond)",
                                   default=RequestLimits.max_request_pixels)
    max_images: int = _opt("most images (edited + sources) in one request (413 beyond)",
                           default=RequestLimits.max_images)
    max_json_depth: int = _opt("deepest JSON nesting accepted (400 beyond); requests need 2",
                               default=RequestLimits.max_json_depth)
    deadline: float = _opt("seconds from accepting a connection to answering it: queue waits past it get 503, "
                           "scoring past it 504", default=300.0)
    receive_deadline: float = _opt("seconds to receive the whole request (line, headers, body): slower senders "
                                   "get 408", default=30.0)
    max_connections: int = _opt("connections served at once; more wait in the listen backlog", default=32)
    max_queue: int = _opt("requests waiting for the scorer besides the running one (503 + Retry-After beyond)",
                          default=16)
    backlog: int = _opt("listen backlog (the kernel caps it at net.core.somaxconn)", default=1024)
    verbose: bool = _opt("log every request", default=False)
    editscore_backbone: Backbone = _opt("EditScore backbone (editscore 0.2); openai runs anywhere, the others need "
                                        "CUDA", default="qwen25vl")
    editscore_model: str = _opt("backbone model: local path or hub id (openai: the served model's name)", default="")
    editscore_url: str = _opt("openai backbone: the chat-completions endpoint (default "
                              "https://api.openai.com/v1/chat/completions)", default="")
    editscore_api_key_env: str = _opt("openai backbone: environment variable holding the API key",
                                      default="OPENAI_API_KEY")
    editscore_lora: str = _opt("LoRA weights on the backbone (qwen backbones), e.g. EditScore/EditScore-7B",
                               default="")
    editscore_score_range: int = _opt("the range the backbone scores in (EditScore models: 25)", default=25)
    editscore_num_pass: int = _opt("passes averaged per edit (self-ensembling)", default=1)
    editscore_temperature: float = _opt("sampling temperature of the backbone", default=0.7)
    editscore_seed: int = _opt("sampling seed (pass i uses seed + i)", default=42)
    editscore_reduction: Literal["average_last", "average_first"] = _opt(
        "average_last: mean of per-pass overall scores; average_first: overall of the mean scores",
        default="average_last")
    editscore_key: Literal["overall", "prompt_following", "consistency", "perceptual_quality"] = _opt(
        "which field of EditScore's result is the reward", default="overall")
    editscore_batched: bool = _opt("score a request in one batch_evaluate call (vLLM backbones)", default=False)
    editscore_tensor_parallel_size: int = _opt("vLLM/lmdeploy tensor parallel size", default=1)
    editscore_max_model_len: int = _opt("vLLM max_model_len", default=1536)
    editscore_max_num_seqs: int = _opt("vLLM max_num_seqs", default=32)
    editscore_max_num_batched_tokens: int = _opt("vLLM max_num_batched_tokens", default=1536)
    editscore_cache_dir: str = _opt("vLLM backbones: where the LoRA-merged model is cached", default="")

    def limits(self) -> RequestLimits:
        if not self.max_request_mb > 0:
            raise ValueError(f"--max-request-mb must be positive, got {self.max_request_mb}")
        return RequestLimits(max_request_bytes=int(self.max_request_mb * MiB), max_json_depth=self.max_json_depth,
                             max_images=self.max_images, max_image_pixels=self.max_image_pixels,
                             max_request_pixels=self.max_request_pixels).validate()

    def settings(self) -> ServerSettings:
        return ServerSettings(token=self.token or os.environ.get(TOKEN_ENV, ""), deadline_s=self.deadline,
                              receive_deadline_s=self.receive_deadline, max_connections=self.max_connections,
                              max_queue=self.max_queue, backlog=self.backlog, verbose=self.verbose).validate()

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{f.name.replace('_', '-')} {value}: expected a finite number")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        self.limits()
        self.settings()
        if self.scorer == "editscore":
            from .editscore_scorer import editscore_kwargs

            editscore_kwargs(**self.editscore_settings())
        elif ":" not in self.scorer:
            raise ValueError(f"--scorer {self.scorer!r}: expected 'editscore' or 'module:function'")

    def editscore_settings(self) -> dict:
        from .editscore_scorer import api_key_from_env

        return dict(backbone=self.editscore_backbone, model_name_or_path=self.editscore_model,
                    url=self.editscore_url, api_key=api_key_from_env(self.editscore_api_key_env),
                    lora_path=self.editscore_lora, score_range=self.editscore_score_range,
                    num_pass=self.editscore_num_pass, temperature=self.editscore_temperature,
                    seed=self.editscore_seed, reduction=self.editscore_reduction,
                    tensor_parallel_size=self.editscore_tensor_parallel_size,
                    max_model_len=self.editscore_max_model_len, max_num_seqs=self.editscore_max_num_seqs,
                    max_num_batched_tokens=self.editscore_max_num_batched_tokens,
                    cache_dir=self.editscore_cache_dir)


def load_function_scorer(spec: str) -> Scorer:
    """The callable named by `"package.module:function"` (ValueError naming what failed)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--scorer {spec!r}: expected 'editscore' or 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--scorer {spec!r}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ValueError(f"--scorer {spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def build_scorer(options: RewardServerOptions) -> tuple[Scorer, str]:
    """(scorer, name) for the options: an `EditScoreScorer` (loads the model) or the named function."""
    if options.scorer == "editscore":
        from .editscore_scorer import EditScoreScorer

        scorer = EditScoreScorer(key=options.editscore_key, batched=options.editscore_batched,
                                 **options.editscore_settings())
        return scorer, f"editscore:{options.editscore_backbone}"
    return load_function_scorer(options.scorer), options.scorer


def parse_options(argv: list[str] | None = None) -> RewardServerOptions:
    """Options from the command line (argparse usage errors exit with status 2)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(RewardServerOptions, prog="python -m rcgrpo.reward_server",
                              description="HTTP reward server for rcgrpo (JSON, never pickle)")
    (options,) = parser.parse_args_into_dataclasses(args=argv)
    return options


def main(argv: list[str] | None = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = parse_options(argv)
    try:
        options.validate()
        limits, settings = options.limits(), options.settings()
        scorer, name = build_scorer(options)
    except ValueError as exc:
        print(f"reward_server: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the model could not load: one line, exit 1
        print(f"reward_server: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    try:
        server = RewardServer((options.host, options.port), scorer, scorer_name=name, settings=settings, limits=limits)
    except OSError as exc:
        print(f"reward_server: error: cannot listen on {options.host}:{options.port} ({exc})", file=sys.stderr)
        return 1
    if options.host not in _LOOPBACK:
        auth = "token required" if settings.token else "NO token: anyone who can reach it can use it (set --token)"
        print(f"reward_server: warning: listening on {options.host}, reachable from other machines; {auth}",
              file=sys.stderr)
    print(f"rcgrpo reward server ({name}) listening on {server.url}", flush=True)
    serve(server)
    return 0


__all__ = ["RewardServerOptions", "build_scorer", "load_function_scorer", "main", "parse_options"]

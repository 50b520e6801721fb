"""`DryRunSettings`: what one dry run builds and runs (the options of `rcgrpo dryrun`).

Light on purpose (torch is imported only where a check needs it), so `rcgrpo dryrun --help` is fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from .archs import ARCHS


def _opt(default, text: str, **kwargs):
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class DryRunSettings:
    """What one dry run builds and runs (the options of `rcgrpo dryrun`; validated by `validate`)."""

    arch: Literal["flux-kontext-dev", "qwen-image-edit", "qwen-image-edit-plus"] = _opt(
        "flux-kontext-dev", "model architecture (configs of public checkpoints; qwen-image-edit-plus: the 2509 "
                            "QwenImageEditPlusPipeline)")
    resolution: int = _opt(1024, "edit height and width in pixels (multiple of 16; Qwen-Image-Edit: of 32)")
    group: int = _opt(12, "G: candidates per group")
    groups: int = _opt(1, "groups per step on this device (groups_per_step x gradient_accumulation_steps)")
    anchors: int = _opt(4, "B: anchors (< G)")
    steps: int = _opt(28, "T: Euler ODE steps of the rollout")
    train_steps: int = _opt(8, "transitions trained (first n, high noise first)")
    train_step_chunk: int = _opt(8, "train transitions per backward pass")
    gradient_checkpointing: bool = _opt(False, "recompute block activations in backward")
    offload_states: bool = _opt(False, "keep rollout states on the CPU during the update")
    vae_slicing: bool = _opt(False, "decode the G finals one at a time")
    source_resolution: Optional[int] = _opt(None, "Qwen-Image-Edit: side of the source image's area in pixels "
                                                  "(default: the pipelines' 1024)")
    cfg_batch: bool = _opt(True, "Qwen-Image-Edit: true CFG's two passes in one transformer call (--no-cfg-batch: "
                                 "two calls)")
    offload_text_encoder: bool = _opt(False, "Qwen-Image-Edit: the real run keeps its 7B text encoder in CPU memory "
                                             "between encodings (the dry run builds none; this changes the "
                                             "full-model estimate and its advice)")
    depth_scale: float = _opt(1.0, "fraction of the double and single blocks kept (at least 1 each; width unchanged)")
    acd: bool = _opt(True, "the ACD reward (--no-acd: w_acd = 0)")
    attention: Literal["acd", "eager"] = _opt("acd", "ACD mass from the fused op (acd) or from materialized attention "
                                                     "weights (eager)")
    device: Optional[str] = _opt(None, "cpu or cuda (default: cuda when available)")
    dtype: Literal["bf16", "fp32"] = _opt("bf16", "model dtype")
    lora_rank: int = _opt(32, "LoRA rank")
    text_len: Optional[int] = _opt(None, "text tokens of the random prompt embeddings: FLUX T5 tokens (default 512); "
                                         "Qwen-Image-Edit: the instruction's tokens (default 128), to which the "
                                         "template's vision and special tokens are added")
    seed: int = _opt(0, "seed of the random weights, noises and anchors")
    force: bool = _opt(False, "run even when the memory model's estimate exceeds the device memory")
    estimate_only: bool = _opt(False, "print the memory model and the options that make the full model fit one H100, "
                                      "without building or running anything")
    json: Optional[str] = _opt(None, "also write the report as JSON to this file")

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"--arch {self.arch!r}: unknown architecture; choose one of {sorted(ARCHS)}")
        if not (isinstance(self.depth_scale, (int, float)) and math.isfinite(self.depth_scale)
                and 0 < self.depth_scale <= 1):
            raise ValueError(f"--depth-scale {self.depth_scale!r}: must be in (0, 1] "
                             "(the fraction of double and single blocks kept)")
        if self.resolution < 64 or self.resolution % 16:
            raise ValueError(f"--resolution {self.resolution}: must be a multiple of 16 (8x VAE downsampling, "
                             "then 2x2 latent packing) and at least 64")
        qwen = ARCHS[self.arch]["family"] == "qwen-image-edit"
        if qwen and self.resolution % 32:
            raise ValueError(f"--resolution {self.resolution}: must be a multiple of 32 for {self.arch} (the pipelines "
                             "round sizes to 32 px)")
        if not qwen:
            for flag, value, default in (("--source-resolution", self.source_resolution, None),
                                         ("--no-cfg-batch", self.cfg_batch, True),
                                         ("--offload-text-encoder", self.offload_text_encoder, False)):
                if value != default:
                    raise ValueError(f"{flag}: applies to the Qwen-Image-Edit architectures, not {self.arch}")
        if self.source_resolution is not None and (self.source_resolution < 64 or self.source_resolution % 32):
            raise ValueError(f"--source-resolution {self.source_resolution}: must be a multiple of 32 and at least 64")
        if self.groups < 1:
            raise ValueError(f"--groups {self.groups}: must be at least 1")
        if self.group < 2:
            raise ValueError(f"--group {self.group}: must be at least 2 (the reference and one perturbed candidate)")
        if not 1 <= self.anchors <= self.group - 1:
            raise ValueError(f"--anchors {self.anchors}: must be between 1 and --group - 1 = {self.group - 1} "
                             "(anchors are drawn from the perturbed candidates)")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps}: must be at least 1")
        if not 1 <= self.train_steps <= self.steps:
            raise ValueError(f"--train-steps {self.train_steps}: must be between 1 and --steps {self.steps}")
        if self.train_step_chunk < 1:
            raise ValueError(f"--train-step-chunk {self.train_step_chunk}: must be at least 1")
        if self.lora_rank < 1:
            raise ValueError(f"--lora-rank {self.lora_rank}: must be at least 1")
        max_text = ARCHS[self.arch].get("max_text_len", ARCHS[self.arch]["text_len"])
        if self.text_len is not None and not 1 <= self.text_len <= max_text:
            what = "instruction tokens" if qwen else "T5 tokens"
            raise ValueError(f"--text-len {self.text_len}: must be between 1 and {max_text} ({what})")
        if self.attention not in ("acd", "eager"):
            raise ValueError(f"--attention {self.attention!r}: choose 'acd' or 'eager'")
        if not self.acd and self.attention == "eager":
            raise ValueError("--attention eager computes the ACD mass eagerly; it cannot be combined with --no-acd")
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"--dtype {self.dtype!r}: choose 'bf16' or 'fp32'")
        if self.device is not None:
            if not (self.device in ("cpu", "cuda") or self.device.startswith("cuda:")):
                raise ValueError(f"--device {self.device!r}: choose 'cpu' or 'cuda'")
            import torch

            if self.device.startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(f"--device {self.device}: CUDA is not available on this machine")
        if self.json is not None and Path(self.json).is_dir():
            raise ValueError(f"--json {self.json!r}: is a directory; give a file path")

    @property
    def torch_dtype(self):
        import torch

        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    def torch_device(self):
        import torch

        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def effective_text_len(self) -> int:
        return self.text_len if self.text_len is not None else ARCHS[self.arch]["text_len"]


__all__ = ["DryRunSettings"]

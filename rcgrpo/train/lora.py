"""The trainable LoRA: peft adapters on the editor's attention projections, fp32 master weights.

    add_lora(transformer, config) -> [parameters]   adds the adapter (seeded), freezes everything else
    lora_state_dict(transformer)  -> {key: tensor}  the adapter's tensors (fp32, CPU), peft's keys
"""
from __future__ import annotations

import torch


def add_lora(transformer, config) -> list[torch.Tensor]:
    """Add a LoRA of `config.lora_rank` / `lora_alpha` on `config.lora_target_modules` (unless the model
    already carries one), initialised from `config.seed`; only the `lora_` parameters train, in fp32."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    if not getattr(transformer, "peft_config", None):
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                          target_modules=list(config.lora_target_modules))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            transformer.add_adapter(lora)
    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name and param.dtype != torch.float32:
            param.data = param.data.float()  # master weights of the adapter stay fp32
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"no LoRA parameters were created for target modules {config.lora_target_modules}")
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return params


def lora_parameter_names(transformer) -> list[str]:
    return [n for n, _ in transformer.named_parameters() if "lora_" in n]


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


__all__ = ["add_lora", "lora_parameter_names", "lora_state_dict"]

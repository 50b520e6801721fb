"""Training: the config, the trainer, its checkpoints, data, phases and reports.

- `config`: `RCGRPOConfig` (every knob, documented and validated) and the presets;
- `trainer`: `RCGRPOTrainer`, the RC-GRPO loop over a stock pipeline with a peft LoRA;
- `checkpoints`: checkpoint and LoRA files, complete or absent;
- `data`: dataset items as edit examples, the datasets a config names;
- `phases`: the named phases the trainer marks (profiler ranges and listeners);
- `report`: the before/after report; `diagnostics`: Fig. 5 from `metrics.jsonl`.

`python -m rcgrpo.train` is `rcgrpo train` (what `accelerate launch -m rcgrpo.train` runs).
"""

"""The diffusers integration: a stock `FluxKontextPipeline` driven by rcgrpo.

- `pipeline`: loading pipelines (tiny offline models, local directories, hub ids) and LoRA weights;
- `rollout`: the pipeline's own deterministic Euler loop with every state recorded, one-step
  velocity predictions, decoding;
- `attention`: the ACD attention processor and its recorder (`attach_acd`, `capture`);
- `heatmap`: ACD mass drawn over images.
"""

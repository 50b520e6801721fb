"""Editor families behind one interface (`rcgrpo.editors.base.Editor`), one subpackage per family.

- `base`: the interface (`Editor`, `ModelDefaults`, `RolloutResult`);
- `loading`: `load_editor(--model)`, `editor_for_pipeline(pipe)`, the family of a `model_index.json`;
- `flux_kontext`, `qwen_image_edit`: the families;
- `acd`: the ACD recorder (any family's drop-in processors); `heatmap`: ACD mass drawn over images;
- `lora`: LoRA files checked against a model, loaded, written in diffusers' format;
- `latents`: measures on packed latents (background drift); `compare`: global vs RDP on one example.
"""

"""CompBench local-editing evaluation that gives the numbers of the official `eval_all.py`, example for example.

- `compbench`: the official directory layout, read and validated (`CompBenchDataset`);
- `compbench_synthetic`: a small generated directory in that layout, for tests and demos;
- `generate`: the edits to score, one per example, cached by what produced them (sidecar keys);
- `metrics`: per-example PSNR / SSIM / LPIPS of the background, LC-T and LC-I of the edit region;
- `clip_official`: CLIP preprocessing and caption tokenization as the official run did them;
- `lpips`: the SqueezeNet LPIPS network, with or without torchvision; weight export and loading;
- `evaluate`: generation + scoring + skipped examples → `results.json`;
- `results`: aggregation (macro average, the official rounding) and `results.md` with its conventions.
"""

"""CompBench local-editing evaluation as the official `eval_all.py` computes it.

- `compbench`: the official directory layout, read and validated (`CompBenchDataset`);
- `compbench_synthetic`: a small generated directory in that layout, for tests and demos;
- `generate`: the edits to score, one per example, resumable;
- `metrics`: per-example PSNR / SSIM / LPIPS of the background, LC-T and LC-I of the edit region;
- `lpips`: the SqueezeNet LPIPS network, with or without torchvision;
- `evaluate`: generation + scoring + aggregation → `results.json`;
- `results`: the Markdown table (`results.md`).
"""

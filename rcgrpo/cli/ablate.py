"""`rcgrpo ablate`: the paper's Table 2 variants (global / RDP / RDP + ACD, and a random-reward control)
on MiniBench, several seeds, one budget; results.json, results.md and Fig. 5 (see rcgrpo.minibench.ablate).

    rcgrpo ablate --output-dir runs/ablate                       (the full protocol: 4 variants × 3 seeds)
    rcgrpo ablate --output-dir /tmp/a --seeds 0 --max-steps 2 --eval-per-task 2     (a plumbing check)
"""
from __future__ import annotations

from .parsing import parse
from .validation import check_output_dir


def main(argv: list[str], prog: str = "rcgrpo ablate") -> int:
    from ..minibench.ablate import AblationConfig, run_ablation

    cfg = parse((AblationConfig,), argv, prog, description=__doc__.splitlines()[0])
    cfg.validate()
    check_output_dir(cfg.output_dir, "--output-dir")
    results = run_ablation(cfg, log=lambda msg: print(msg, flush=True))
    from ..minibench.ablate import format_markdown

    print(format_markdown(results), end="")
    return 0

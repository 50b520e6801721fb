"""`rcgrpo dryrun`: one RC-GRPO iteration of a full-size model with random weights (time, memory)."""
from __future__ import annotations

from .parsing import parse

DESCRIPTION = ("One RC-GRPO iteration (rollout, ACD, decode, reward, update) of a full-size model with random "
               "weights: per-phase time and peak memory, and a memory model.")


def main(argv: list[str], prog: str = "rcgrpo dryrun") -> int:
    from ..dryrun.settings import DryRunSettings

    settings = parse((DryRunSettings,), argv, prog, description=DESCRIPTION)
    settings.validate()
    from ..dryrun.report import format_estimate, format_report, write_json
    from ..dryrun.run import dry_run, estimate_only

    if settings.estimate_only:
        report = estimate_only(settings)
        print(format_estimate(report), flush=True)
        if settings.json:
            print(f"wrote {write_json(report, settings.json)}")
        return 0

    report = dry_run(settings, log=lambda msg: print(msg, flush=True))
    print(format_report(report), flush=True)
    if settings.json:
        path = write_json(report, settings.json)
        print(f"wrote {path}")
    if report["error"]:
        raise RuntimeError(f"dry run ran out of memory in phase {'/'.join(report['error']['phase'])}: "
                           f"{report['error']['message']} (see the memory model and suggestions above)")
    return 0

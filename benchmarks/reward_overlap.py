#!/usr/bin/env python3
"""One command for the reward-overlap benchmark: runs `benchmarks/test_bench_reward_overlap.py` with
pytest-benchmark, then writes STEM.json (pytest-benchmark's, with every step's times) and STEM.md.

    .venv/bin/python benchmarks/reward_overlap.py --out benchmarks/results/reward-overlap-$(date +%F)
    .venv/bin/python benchmarks/reward_overlap.py --render STEM.json      # only the Markdown, again

The Markdown has, per latency (1 process, 1 server), the median step time of `sync` and `overlap`, the
time from the start of a step until all its rewards are in ("to advantages"), the time the step waited
for rewards, and from the `sync` provider of the same run the rollouts alone (R) and the rewards alone
(S, scored one group after the other); then the ratios: overlap step / sync step, and the overlapped
time to advantages against max(R, S) (the issue's target: ≤ 1.1) and against R + S/n, the best a
step of n groups can do when only the last group's rewards are exposed. Then the 2-process table:
1 vs 3 servers. Environment knobs are those of the test file (latencies, rounds, groups).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(stem: Path, pytest_args: list[str]) -> int:
    stem.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", str(HERE / "test_bench_reward_overlap.py"), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={stem.with_suffix('.json')}", *pytest_args]
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=HERE.parent).returncode


def _fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def _load(state, count: int = 3) -> str:
    load = (state or {}).get("loadavg_1_5_15")
    return "-" if not load else ", ".join(f"{x:.1f}" for x in load[:count])


def rows_threads(data: dict) -> str:
    threads = {b["extra_info"].get("torch_threads") for b in data.get("benchmarks", [])} - {None}
    return ", ".join(map(str, sorted(threads))) or "?"


def render(path: Path) -> str:
    data = json.loads(path.read_text())
    machine = data.get("machine_info", {})
    rc = machine.get("rcgrpo", {})
    start, end = rc.get("cpu_state_at_start", {}), data.get("rcgrpo", {}).get("cpu_state_at_end", {})
    versions = rc.get("versions", {})
    device = rc.get("device", {})
    lines = [f"# Reward overlap benchmark ({path.name})", "",
             f"- date: {data.get('datetime')}, commit {data.get('commit_info', {}).get('id', '?')[:12]}"
             f"{' (dirty)' if data.get('commit_info', {}).get('dirty') else ''}",
             f"- machine: {device.get('cpu_model') or machine.get('cpu', {}).get('brand_raw', '?')}, "
             f"{start.get('cpu_count', '?')} logical CPUs, {machine.get('system', '?')} {machine.get('release', '')}; "
             f"device {device.get('gpu_name') or device.get('bench_device', '?')}; python {versions.get('python')}, "
             f"torch {versions.get('torch')}, diffusers {versions.get('diffusers')}",
             f"- load average (1, 5, 15 min) at start {_load(start)}, at end {_load(end)}; torch threads in the "
             f"benchmark process: {rows_threads(data)}", ""]
    rows = [b for b in data.get("benchmarks", []) if b.get("extra_info", {}).get("op") == "reward_overlap"]
    if rows:
        info = rows[0]["extra_info"]
        lines += ["## One process, one server: synchronous vs overlapped", "",
                  f"G = {info['group_size']}, n = {info['groups_per_step']} groups per step, {info['timed_steps']} "
                  "timed steps, medians in seconds. \"to advantages\": from the start of the step until every "
                  "reward is in; R: the provider's own rollouts (to advantages − reward wait); S: the rewards "
                  "scored one group after the other (the reward wait of `sync` at that latency). The issue's "
                  "target: overlapped to advantages ≤ 1.1 × max(R, S); R + S/n is the least a step of n groups "
                  "can take when only its last group's rewards are exposed.", "",
                  "| latency s/image | reward s/group | provider | step | to advantages | reward wait | R | S | "
                  "sync step / step | to advantages / max(R, S) | to advantages / (R + S/n) | load (1 min) |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        by_latency: dict[float, dict[str, dict]] = {}
        for b in rows:
            by_latency.setdefault(b["extra_info"]["latency_s_per_image"], {})[b["extra_info"]["provider"]] = b["extra_info"]
        for latency in sorted(by_latency):
            group = by_latency[latency]
            sync = group.get("sync")
            s = sync.get("perf/reward_wait_s_median") if sync else None
            for provider in ("sync", "overlap"):
                e = group.get(provider)
                if e is None:
                    continue
                n = e["groups_per_step"]
                adv, r = e.get("rollout_time_s_median"), e.get("rollouts_alone_s_median")
                ratio = sync["time_s_median"] / e["time_s_median"] if sync and e.get("time_s_median") else None
                target = adv / max(r, s) if r and s is not None else None
                ideal = adv / (r + s / n) if r and s is not None else None
                lines.append(f"| {latency:g} | {e['reward_s_per_group']:g} | {provider} | {_fmt(e.get('time_s_median'))} | "
                             f"{_fmt(adv)} | {_fmt(e.get('perf/reward_wait_s_median'))} | {_fmt(r)} | {_fmt(s)} | "
                             f"{_fmt(ratio, 2)} | {_fmt(target, 2)} | {_fmt(ideal, 2)} | {_load(e.get('cpu_state'), 1)} |")
        lines.append("")
    two = [b for b in data.get("benchmarks", []) if b.get("extra_info", {}).get("op") == "reward_servers"]
    if two:
        info = two[0]["extra_info"]
        base = next((b["extra_info"] for b in two if b["extra_info"]["provider"] == "sync_1_server"), None)
        one = next((b["extra_info"] for b in two if b["extra_info"]["provider"] == "overlap_1_server"), None)
        lines += [f"## Two processes (torchrun, {info.get('device')}): 1 vs {max(b['extra_info']['servers'] for b in two)} "
                  f"servers, latency {info['latency_s_per_image']:g} s/image", "",
                  "Per step the slower rank's time; medians in seconds over the timed steps.", "",
                  "| provider | servers | overlap | step | to advantages | reward wait | retries/step | vs sync_1_server | "
                  "vs overlap_1_server |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for b in two:
            e = b["extra_info"]
            vs_sync = base["time_s_median"] / e["time_s_median"] if base else None
            vs_one = one["time_s_median"] / e["time_s_median"] if one else None
            retries = statistics.median(s["reward/retries"] for s in e["per_step"]) if e.get("per_step") else None
            lines.append(f"| {e['provider']} | {e['servers']} | {e['overlap']} | {_fmt(e.get('time_s_median'))} | "
                         f"{_fmt(e.get('rollout_time_s_median'))} | {_fmt(e.get('perf/reward_wait_s_median'))} | "
                         f"{_fmt(retries, 0)} | {_fmt(vs_sync, 2)}x | {_fmt(vs_one, 2)}x |")
        lines.append("")
    failed = data.get("rcgrpo", {}).get("failed", [])
    if failed:
        lines += ["## Failed", ""] + [f"- {f['test']} ({f['when']}): {f['error']}" for f in failed] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="STEM of the outputs (STEM.json, STEM.md)")
    parser.add_argument("--render", type=Path, help="only write the Markdown of this JSON (next to it)")
    args, pytest_args = parser.parse_known_args(argv)
    if args.render:
        path = args.render
    else:
        if args.out is None:
            parser.error("give --out STEM or --render JSON")
        code = run(args.out, pytest_args)
        path = args.out.with_suffix(".json")
        if not path.is_file():
            print(f"no results: pytest exited with {code}", file=sys.stderr)
            return code or 1
    md = path.with_suffix(".md")
    md.write_text(render(path))
    print(f"wrote {path} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

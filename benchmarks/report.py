#!/usr/bin/env python3
"""Turn pytest-benchmark JSON from `pytest benchmarks/` into a Markdown report and a PNG bar chart.

    python benchmarks/report.py RESULT.json [MORE.json ...] [--baseline sdpa|eager] [--out DIR] [--name STEM]

Writes DIR/STEM.md and DIR/STEM.png (DIR defaults to the first JSON's folder, STEM to its name).
Several JSON files (e.g. one per suite, as benchmarks/gpu_check.sh writes them) are merged.

Per benchmark group: provider, median, IQR, rounds, speed-up vs the baseline provider of the same
group (baseline median / provider median, so > 1 is faster; both measured in the same run),
TFLOP/s (attention) or GB/s (distances), peak memory. The baseline is --baseline when the group has
it, else the first of eager, sdpa, torch_ref that it has. The GRPO-iteration group gets a second
table with the time shares of the ops. Skipped and failed benchmarks are listed with their reasons.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

FALLBACK_BASELINES = ("eager", "sdpa", "torch_ref")


def load(paths: list[Path]) -> dict:
    merged = {"benchmarks": [], "skipped": [], "failed": [], "sources": []}
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        merged["sources"].append(path.name)
        for key in ("machine_info", "commit_info", "datetime"):
            merged.setdefault(key, data.get(key))
        extra = data.get("rcgrpo", {})
        merged["skipped"].extend(extra.get("skipped", []))
        merged["failed"].extend(extra.get("failed", []))
        merged.setdefault("cpu_state_at_end", extra.get("cpu_state_at_end"))
        for bench in data.get("benchmarks", []):
            bench["_source"] = path.name
            merged["benchmarks"].append(bench)
    # Ratios compare providers of one run only: a group found in several files is split by file.
    sources_of: dict[str, set] = {}
    for bench in merged["benchmarks"]:
        sources_of.setdefault(bench.get("group") or bench["name"], set()).add(bench["_source"])
    for bench in merged["benchmarks"]:
        group = bench.get("group") or bench["name"]
        if len(sources_of[group]) > 1:
            bench["group"] = f"{group} [{bench['_source']}]"
    return merged


def provider_of(bench: dict) -> str:
    return bench.get("extra_info", {}).get("provider") or bench.get("param") or bench["name"]


def groups_of(benchmarks: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for bench in benchmarks:
        groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
    return groups


def pick_baseline(benches: list[dict], wanted: str) -> dict | None:
    by_provider = {provider_of(b): b for b in benches}
    for name in (wanted, *FALLBACK_BASELINES):
        if name in by_provider:
            return by_provider[name]
    return None


def _num(value, fmt: str, missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, fmt)


def _val(value) -> str:
    """Plain decimal with about 3 significant digits (no scientific notation)."""
    if value is None or not math.isfinite(value):
        return "–"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}" if magnitude >= 1e-3 else f"{value:.2e}"


def _pct(value) -> str:
    return _num(None if value is None else 100 * value, ".1f") + ("%" if value is not None else "")


def group_unit(benches: list[dict]) -> tuple[str, float]:
    return ("s", 1.0) if max(b["stats"]["median"] for b in benches) >= 1.0 else ("ms", 1e3)


def group_table(benches: list[dict], baseline: dict | None) -> list[str]:
    unit, factor = group_unit(benches)
    has_tflops = any("tflops" in b.get("extra_info", {}) for b in benches)
    has_gbps = any("gbps" in b.get("extra_info", {}) for b in benches)
    base_name = provider_of(baseline) if baseline else None
    header = ["provider", f"median ({unit})", f"IQR ({unit})", "rounds",
              f"speed-up vs {base_name}" if base_name else "speed-up"]
    if has_tflops:
        header.append("TFLOP/s")
    if has_gbps:
        header.append("GB/s")
    has_copy = any("fraction_of_copy_bw" in b.get("extra_info", {}) for b in benches)
    if has_copy:
        header.append("% of copy BW")
    has_sdpa = any("sdpa_backend" in b.get("extra_info", {}) or "auto_mode" in b.get("extra_info", {}) for b in benches)
    if has_sdpa:
        header.append("SDPA backend")
    header.append("peak mem (MB)")
    rows = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for b in sorted(benches, key=lambda b: b["stats"]["median"]):
        s, e = b["stats"], b.get("extra_info", {})
        provider = provider_of(b)
        if baseline is None:
            ratio = "–"
        elif b is baseline:
            ratio = "1.00× (baseline)"
        else:
            ratio = f"{baseline['stats']['median'] / s['median']:.2f}×"
        cells = [f"`{provider}`", _val(s["median"] * factor), _val(s.get("iqr", float("nan")) * factor),
                 str(s.get("rounds", "")), ratio]
        if has_tflops:
            cells.append(_val(e.get("tflops")))
        if has_gbps:
            cells.append(_val(e.get("gbps")))
        if has_copy:
            cells.append(_pct(e.get("fraction_of_copy_bw")))
        if has_sdpa:
            cells.append(sdpa_cell(e))
        mem = _num(e.get("peak_mem_mb"), ".1f")
        if e.get("peak_mem_error"):
            mem = "n/a"
        cells.append(mem)
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def sdpa_cell(e: dict) -> str:
    """Which SDPA backend ran: torch's choice, and the CUDA kernel names where profiled."""
    if "auto_mode" in e and "sdpa_backend" not in e:
        return f"mode {e['auto_mode']} (no SDPA)"
    parts = [str(e.get("sdpa_backend") or "–")]
    if "auto_mode" in e:
        parts.insert(0, f"mode {e['auto_mode']}:")
    kernels = e.get("sdpa_cuda_kernels")
    if isinstance(kernels, list) and kernels:
        parts.append("(" + kernels[0][:48] + ")")
    return " ".join(parts)


ACD_PROVIDERS = ("triton_fused", "triton_sdpa_mass", "auto")
SDPA_FLOORS = ("sdpa", "sdpa_cudnn")


def target_lines(benches: list[dict]) -> list[str]:
    """The GPU targets of issue 20, from this group's medians: ACD attention <= 1.05x the fastest SDPA
    without ACD; region distances fwd+bwd >= 70% of the copy bandwidth."""
    by = {provider_of(b): b for b in benches}
    lines = []
    floors = [by[p] for p in SDPA_FLOORS if p in by]
    if floors and any(p in by for p in ACD_PROVIDERS):
        fastest = min(floors, key=lambda b: b["stats"]["median"])
        cells = []
        for p in ACD_PROVIDERS:
            if p in by:
                ratio = by[p]["stats"]["median"] / fastest["stats"]["median"]
                cells.append(f"`{p}` {ratio:.2f}× {'(meets)' if ratio <= 1.05 else '(misses)'}")
        lines += ["", f"Target ACD attention ≤ 1.05× the fastest SDPA without ACD (`{provider_of(fastest)}` here): "
                  + ", ".join(cells)]
    if "copy" in by and any(b.get("extra_info", {}).get("mode") == "fwd+bwd" for b in benches):
        cells = [f"`{provider_of(b)}` {_pct(b['extra_info'].get('fraction_of_copy_bw'))}"
                 for b in benches if "fraction_of_copy_bw" in b.get("extra_info", {})]
        if cells:
            lines += ["", "Target region distances fwd+bwd ≥ 70% of the copy bandwidth: " + ", ".join(cells)]
    return lines


def shares_table(benches: list[dict]) -> list[str]:
    with_shares = [b for b in benches if "acd_attention_share" in b.get("extra_info", {})]
    if not with_shares:
        return []
    rows = ["", "Time shares inside one iteration (per step: op time / the step's own time; median over the timed steps):", "",
            "| provider | backends used | step median (s) | rollout | ACD attention (calls/step) | ACD over SDPA (est.) "
            "| region_sq_dists fwd+bwd |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for b in with_shares:
        e = b["extra_info"]
        used = ", ".join(f"{k}: {'/'.join(v)}" for k, v in e.get("backends_used", {}).items()) or "–"
        rows.append(
            f"| `{provider_of(b)}` | {used} | {_val(e.get('step_median_s', e.get('step_mean_s')))} | {_pct(e.get('rollout_share'))} | "
            f"{_pct(e.get('acd_attention_share'))} ({_num(e.get('acd_attention_calls_per_step'), '.0f')}) | "
            f"{_pct(e.get('acd_overhead_share_est'))} | {_pct(e.get('region_sq_dists_share'))} |")
    return rows


def telemetry_table(benches: list[dict]) -> list[str]:
    rows = []
    for b in benches:
        t = b.get("extra_info", {}).get("telemetry") or {}
        if not t.get("available"):
            continue
        if not rows:
            rows = ["| group | provider | SM MHz (mean) | mem MHz | power W (mean/max) | temp °C (max) | "
                    "GPU util % (mean) | mem used MB (max) | throttle reasons |",
                    "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        rows.append(
            f"| {b.get('group')} | `{provider_of(b)}` | {_num(t.get('sm_clock_mhz_mean'), '.0f')} | "
            f"{_num(t.get('mem_clock_mhz_mean'), '.0f')} | {_num(t.get('power_w_mean'), '.0f')}/"
            f"{_num(t.get('power_w_max'), '.0f')} | {_num(t.get('temperature_c_max'), '.0f')} | "
            f"{_num(t.get('util_gpu_pct_mean'), '.0f')} | {_num(t.get('memory_used_mb_max'), '.0f')} | "
            f"{hex(t['throttle_reasons_or']) if t.get('throttle_reasons_or') is not None else '–'} |")
    return rows


def header_lines(data: dict, baseline: str) -> list[str]:
    machine = data.get("machine_info") or {}
    extra = machine.get("rcgrpo", {})
    versions = extra.get("versions", {})
    device = extra.get("device", {})
    gpu = extra.get("gpu", {})
    commit = data.get("commit_info") or {}
    cpu = machine.get("cpu", {})
    lines = [
        "# rcgrpo benchmark report",
        "",
        f"- date: {data.get('datetime', '?')} (sources: {', '.join(data['sources'])})",
        f"- commit: {str(commit.get('id', '?'))[:12]}{' (dirty)' if commit.get('dirty') else ''} "
        f"on {commit.get('branch', '?')}",
        f"- machine: {machine.get('system', '?')} {machine.get('machine', '')}, CPU {cpu.get('brand_raw') or device.get('cpu_model')} "
        f"× {cpu.get('count', '?')} logical cores",
        f"- benchmark device: {device.get('bench_device', '?')}"
        + (f", GPU {device.get('gpu_name')} ({_num(device.get('gpu_memory_gb'), '.0f')} GiB, sm_{device.get('gpu_capability', '?').replace('.', '')})"
           if device.get("gpu_name") else ""),
    ]
    if gpu.get("available"):
        lines.append(f"- NVIDIA driver {gpu.get('driver')}, power limit {_num(gpu.get('power_limit_w'), '.0f')} W, "
                     f"max SM clock {gpu.get('sm_clock_max_mhz')} MHz")
    lines.append(
        f"- versions: python {versions.get('python', machine.get('python_version'))}, torch {versions.get('torch')} "
        f"(CUDA {versions.get('torch_cuda')}), triton {versions.get('triton')}, diffusers {versions.get('diffusers')}, "
        f"pytest-benchmark {versions.get('pytest_benchmark')}")
    backends = versions.get("rcgrpo_kernels_backends")
    if isinstance(backends, dict):
        lines.append("- rcgrpo_kernels backends here: " + ", ".join(
            f"{k} {'yes' if v is None else 'no'}" for k, v in backends.items()))
    start = extra.get("cpu_state_at_start", {}).get("loadavg_1_5_15")
    end = (data.get("cpu_state_at_end") or {}).get("loadavg_1_5_15")
    if start or end:
        fmt = lambda la: "/".join(f"{x:.1f}" for x in la) if la else "?"  # noqa: E731
        during = [b["extra_info"]["cpu_state"]["loadavg_1_5_15"][0] for b in data["benchmarks"]
                  if (b.get("extra_info", {}).get("cpu_state") or {}).get("loadavg_1_5_15")]
        span = f"; 1-min load after each benchmark {min(during):.1f} to {max(during):.1f}" if during else ""
        cores = extra.get("cpu_state_at_start", {}).get("cpu_count")
        lines.append(f"- load average (1/5/15 min) at start {fmt(start)}, at end {fmt(end)}{span}"
                     + (f" on {cores} cores" if cores else ""))
    timing = extra.get("timing")
    if timing:
        lines.append(f"- timing: benchmark.pedantic, {timing.get('warmup_rounds')} warm-up round(s) after an untimed "
                     f"compile call, rounds sized to ~{timing.get('target_s')} s per provider "
                     f"(min {timing.get('min_rounds')}, max {timing.get('max_rounds')}); CUDA runs synchronize inside the timed call")
    lines += [
        "",
        f"Speed-up = baseline median / provider median, both from this run (> 1: faster than the baseline). "
        f"Baseline: `{baseline}` where the group has it, else the first of {', '.join(FALLBACK_BASELINES)}. "
        "Peak memory: growth over one call, inputs excluded (method per benchmark in the JSON's "
        "extra_info.peak_mem_method).",
    ]
    return lines


def render_markdown(data: dict, baseline: str, png_name: str | None) -> str:
    lines = header_lines(data, baseline)
    groups = groups_of(data["benchmarks"])
    if png_name:
        lines += ["", f"![median time per provider]({png_name})"]
    for group, benches in groups.items():
        lines += ["", f"## {group}", ""]
        lines += group_table(benches, pick_baseline(benches, baseline))
        lines += target_lines(benches)
        lines += shares_table(benches)
    telemetry = telemetry_table(data["benchmarks"])
    if telemetry:
        lines += ["", "## GPU telemetry (NVML, sampled every 50 ms during the timed rounds)", ""] + telemetry
    if data["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"- `{s['test'].split('::')[-1]}`: {s['reason']}" for s in data["skipped"]]
    if data["failed"]:
        lines += ["", "## Failed", ""]
        lines += [f"- `{f['test'].split('::')[-1]}` ({f.get('when')}): {f.get('error')}" for f in data["failed"]]
    if not data["benchmarks"]:
        lines += ["", "No benchmark results in the input."]
    return "\n".join(lines) + "\n"


def render_png(data: dict, baseline: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        print(f"report: no PNG ({type(exc).__name__}: {exc})", file=sys.stderr)
        return False
    groups = groups_of(data["benchmarks"])
    if not groups:
        return False
    heights = [0.9 + 0.38 * len(b) for b in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (group, benches) in zip(axes[:, 0], groups.items()):
        base = pick_baseline(benches, baseline)
        unit, factor = group_unit(benches)
        ordered = sorted(benches, key=lambda b: b["stats"]["median"])
        names = [provider_of(b) for b in ordered]
        values = [b["stats"]["median"] * factor for b in ordered]
        errors = [b["stats"].get("iqr", 0.0) * factor / 2 for b in ordered]
        colors = ["#d62728" if b is base else "#1f77b4" for b in ordered]
        ax.barh(names, values, xerr=errors, color=colors, capsize=2)
        ax.invert_yaxis()
        ax.set_xlabel(f"median ({unit}); red = baseline" if base is not None else f"median ({unit})")
        ax.set_title(group, fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
        right = max(v + e for v, e in zip(values, errors)) if values else 1
        for i, b in enumerate(ordered):
            label = _val(values[i])
            if base is not None and b is not base:
                label += f"  ({base['stats']['median'] / b['stats']['median']:.2f}×)"
            ax.text(values[i] + errors[i] + right * 0.015, i, label, va="center", fontsize=7)
        ax.set_xlim(0, right * 1.35)
    commit = (data.get("commit_info") or {}).get("id", "")[:10]
    device = (data.get("machine_info") or {}).get("rcgrpo", {}).get("device", {})
    fig.suptitle(f"rcgrpo benchmarks — {device.get('gpu_name') or device.get('cpu_model') or ''} — "
                 f"{str(data.get('datetime', ''))[:10]} {commit}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="pytest-benchmark JSON file(s)")
    parser.add_argument("--baseline", default="sdpa", choices=["sdpa", "eager", "torch_ref"],
                        help="provider the speed-ups refer to (groups without it fall back to eager, sdpa, torch_ref)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first JSON's folder)")
    parser.add_argument("--name", default=None, help="output file stem (default: the first JSON's stem)")
    parser.add_argument("--no-png", action="store_true", help="skip the bar chart")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        print(f"report: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        data = load(args.results)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        print(f"report: not pytest-benchmark JSON ({exc})", file=sys.stderr)
        return 2
    out = args.out or args.results[0].parent
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or args.results[0].stem
    png = out / f"{stem}.png"
    made_png = False if args.no_png else render_png(data, args.baseline, png)
    md = out / f"{stem}.md"
    md.write_text(render_markdown(data, args.baseline, png.name if made_png else None))
    print(f"report: wrote {md}" + (f" and {png}" if made_png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

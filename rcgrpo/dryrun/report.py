"""The dry run's report: a table on the terminal and a JSON file."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..io.files import atomic_write_text
from .memory import GIB

def gib(value) -> str:
    if value is None:
        return "-"
    if abs(value) < 1024**2:
        return f"{value / 1024:.1f} KiB"
    if abs(value) < 0.1 * GIB:
        return f"{value / 1024**2:.1f} MiB"
    return f"{value / GIB:.2f} GiB"


def _estimate_table(mem: dict) -> list[str]:
    """The memory model's terms: this run's and (when it differs) the full model's, with the formulas."""
    lines = []
    full = mem.get("full_depth")
    header = f"{'  term':<38}{'this run':>12}" + (f"{'full model':>12}" if full else "") + "   formula"
    lines.append(header)
    full_terms = {t["key"]: t for t in full["estimate"]["terms"]} if full else {}
    own_terms = {t["key"]: t for t in mem["estimate"]["terms"]}
    peak_phase = mem["estimate"]["peak_phase"]
    for t in mem["estimate"]["terms"] + [t for k, t in full_terms.items() if k not in own_terms]:
        mark = "*" if t["key"] in own_terms and peak_phase in t["phases"] else " "
        own = gib(t["bytes"]) if t["key"] in own_terms else "-"
        row = f"{mark} {t['label']:<36}{own:>12}"
        if full:
            row += f"{gib(full_terms[t['key']]['bytes']) if t['key'] in full_terms else '-':>12}"
        lines.append(row + "   " + t["formula"])
    est_peak = mem["estimate"]["peak_bytes"]
    row = f"  {'estimated peak':<36}{gib(est_peak):>12}"
    if full:
        row += f"{gib(full['estimate']['peak_bytes']):>12}"
    lines.append(row + "   max over phases: " + ", ".join(
        f"{k} {gib(v)}" for k, v in mem["estimate"]["phase_peaks_bytes"].items()))
    return lines


def _full_model_lines(mem: dict) -> list[str]:
    """Whether the full model fits the reference GPUs, and the options that make it fit one H100."""
    lines = []
    full = mem.get("full_depth")
    if full:
        fits = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in full["fits"].items())
        what = "all blocks on one GPU"
        if full.get("text_encoder") == "device":
            what += ", the text encoder's weights on it (--offload-text-encoder: only while encoding)"
        elif full.get("text_encoder") == "offloaded":
            what += ", the text encoder on it only while encoding"
        lines.append(f"  full model ({what}) at these settings: estimated {gib(full['estimate']['peak_bytes'])} "
                     f"({full['estimate']['peak_phase']}); fits {fits}")
    advice = mem.get("h100_advice")
    if advice:
        lines.append(f"  to fit one {advice['gpu']}, the full model needs (cumulative; estimated peak after each):")
        sized = [sug for sug in advice["suggestions"] if sug.get("peak_bytes") is not None]
        for sug in advice["suggestions"]:
            if sug.get("peak_bytes") is not None:
                lines.append(f"    {sug['change']}: {gib(sug['peak_bytes'])} ({sug['peak_phase']})"
                             + (" - fits" if sug["fits"] else ""))
            else:
                lines.append(f"    {sug['change']}: saves about {gib(sug.get('saves_bytes'))}")
        if not sized or not sized[-1]["fits"]:
            lines.append("    not enough: lower --resolution or --anchors")
    return lines


def format_estimate(r: dict) -> str:
    """The report of `rcgrpo dryrun --estimate-only`: the memory model, nothing measured."""
    st, mem = r["settings"], r["memory"]
    tok = mem["estimate"]["inputs"]["tokens"]
    lines = [f"rcgrpo dryrun --estimate-only: {st['arch']} at {st['resolution']}x{st['resolution']} px, G={st['group']}, "
             f"B={st['anchors']}, T={st['steps']}, train steps {st['train_steps']} (chunk {st['train_step_chunk']}); "
             f"tokens: text {tok['text']} + target {tok['image']} + context {tok['context']} = {tok['total']}", "",
             f"memory model (bytes live at the peak phase '{mem['estimate']['peak_phase']}' marked *)"]
    lines += _estimate_table(mem)
    lines += _full_model_lines(mem)
    return "\n".join(lines)


def format_report(r: dict) -> str:
    cfg, st, mem = r["config"], r["settings"], r["memory"]
    dev = r["device"]
    depth = cfg["depth"]
    tok = cfg["tokens"]
    blocks = f"blocks {depth['double']}/{depth['double_full']} double"
    if depth["single_full"]:
        blocks += f" + {depth['single']}/{depth['single_full']} single"
    tokens = f"text {tok['text']} + target {tok['image']} + context {tok['context']} = {tok['total']}"
    if "negative" in tok:
        tokens += f" (negative prompt: {tok['negative']} text tokens)"
    lines = [
        f"rcgrpo dryrun: {cfg['arch']} with random weights on {dev['type']} ({dev['name']})",
        f"  {blocks} (depth-scale {st['depth_scale']:g}), {r['built']['transformer_params'] / 1e9:.3f} B params, "
        f"{cfg['dtype']}; LoRA r={st['lora_rank']} ({r['built']['lora_params'] / 1e6:.1f} M params)",
        f"  {st['resolution']}x{st['resolution']} px, G={st['group']}, B={st['anchors']}, T={st['steps']}, "
        f"train steps {st['train_steps']} (chunk {st['train_step_chunk']}), grad ckpt {'on' if st['gradient_checkpointing'] else 'off'}, "
        f"offload states {'on' if st['offload_states'] else 'off'}, ACD "
        + (f"{cfg['acd_backend']} over {cfg['acd_layers']} layers" if cfg['acd_backend'] else "off")
        + f", distances {cfg['distance_backend']}",
        f"  tokens: {tokens}; setup: model {r['setup_s']['build_model']:.1f} s, trainer {r['setup_s']['trainer']:.1f} s",
        "",
        f"{'phase':<26}{'time (s)':>10}{'calls':>7}{'share':>8}{'peak mem':>12}{'estimate':>12}",
    ]
    depth_of = {}
    for p in r["phases"]:
        level = 0 if p["parent"] is None else depth_of[p["parent"]] + 1
        depth_of[p["key"]] = level
        name = "  " * level + p["label"]
        peak = "-" if p["peak_bytes"] is None else gib(p["peak_bytes"])
        est = gib(p["estimate_bytes"]) if p["estimate_bytes"] is not None else ""
        lines.append(f"{name:<26}{p['time_s']:>10.3f}{p['calls']:>7}{100 * p['share']:>7.1f}%{peak:>12}{est:>12}")
    lines += [
        "",
        f"ACD share of the iteration: {100 * r['acd_share']:.2f}%   distance share: {100 * r['distance_share']:.2f}%",
        "",
        f"memory model (bytes live at the peak phase '{mem['estimate']['peak_phase']}' marked *)",
    ]
    lines += _estimate_table(mem)
    ratio = mem["estimate_over_measured"]
    lines += [
        f"  measured peak: {gib(mem['measured_peak_bytes'])} in {mem['measured_peak_phase']} ({mem['measure']}); "
        f"estimate/measured = {ratio:.2f}" if ratio else f"  measured peak: {gib(mem['measured_peak_bytes'])}",
    ]
    if mem["reserved_peak_bytes"] is not None:
        lines.append(f"  CUDA reserved peak: {gib(mem['reserved_peak_bytes'])}")
    total = mem["device_total_bytes"]
    lines.append(f"  fits the device: {'yes' if mem['fits'] else 'NO'} (measured {gib(mem['measured_peak_bytes'])} "
                 f"of {gib(total)} {'GPU memory' if dev['type'] == 'cuda' else 'RAM'})")
    lines += _full_model_lines(mem)
    if mem["suggestions"]:
        lines.append("  suggestions (estimated peak after the change):")
        for sug in mem["suggestions"]:
            if sug.get("peak_bytes") is not None:
                lines.append(f"    {sug['change']}: {gib(sug['peak_bytes'])} ({sug['peak_phase']})"
                             + (" - fits" if sug["fits"] else ""))
            else:
                lines.append(f"    {sug['change']}: saves about {gib(sug.get('saves_bytes'))}")
    if r["metrics"]:
        m = r["metrics"]
        lines.append("")
        lines.append("iteration metrics: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items() if v is not None))
    if r["warnings"]:
        lines.append("warnings during the iteration: " + " | ".join(r["warnings"][:3]))
    if r["error"]:
        lines.append(f"FAILED: {r['error']['type']} in phase {'/'.join(r['error']['phase'])}: {r['error']['message']}")
    return "\n".join(lines)


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json(report: dict, path) -> Path:
    """The report as JSON (non-finite floats as null), written atomically."""
    return atomic_write_text(path, json.dumps(_finite(report), indent=2, default=_json_default, allow_nan=False) + "\n")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


__all__ = ["format_estimate", "format_report", "gib", "write_json"]

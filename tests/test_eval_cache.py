"""`rcgrpo eval`'s generation cache (keyed on what produced each edit), `--model` with ModelDefaults,
and `EvalArguments` through HfArgumentParser and the `rcgrpo` dispatcher."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from rcgrpo.cli.eval import EvalArguments, parse_eval_args, run_eval
from rcgrpo.eval import evaluate as evaluate_module
from rcgrpo.eval.compbench import CompBenchDataset
from rcgrpo.eval.compbench_synthetic import write_compbench_example_dir
from rcgrpo.eval.evaluate import evaluate
from rcgrpo.eval.generate import (GenerationSettings, file_sha256, model_identity, output_path, plan_generation,
                                  read_key, sidecar_path)
from rcgrpo.testing import TINY_DEFAULTS
from test_eval_official import one_thread  # noqa: F401 - autouse: one torch thread

FAST = dict(clip_model=None, eval_size=32, log=None)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("compbench")
    write_compbench_example_dir(root, n_per_task=1, size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def tiny_pipe():
    from rcgrpo.testing import tiny_kontext_pipeline

    return tiny_kontext_pipeline(0)


def _lora(pipe, path, seed):
    from diffusers import FluxKontextPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=f"a{seed}")
    FluxKontextPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer,
                                                                                                 adapter_name=f"a{seed}"))
    pipe.transformer.delete_adapters(f"a{seed}")
    return path / "pytorch_lora_weights.safetensors"


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*.png"))}


def test_model_defaults_sidecars_and_reuse(bench, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    res = evaluate(bench, out, model="tiny", **FAST)
    gen = res["settings"]["generation"]
    # no setting given: the model's ModelDefaults
    assert (gen["steps"], gen["height"], gen["max_sequence_length"], gen["guidance_scale"]) == (
        TINY_DEFAULTS.num_inference_steps, TINY_DEFAULTS.resolution, TINY_DEFAULTS.max_sequence_length,
        TINY_DEFAULTS.guidance_scale)
    assert (gen["generated"], gen["regenerated_stale"], gen["reused"]) == (3, 0, 0)
    pngs = _mtimes(out / "outputs")
    assert len(pngs) == 3 and all(Image.open(p).size == (32, 32) for p in pngs)
    rec = CompBenchDataset(bench).records[0]
    key = read_key(output_path(out / "outputs", rec))
    assert key["model"] == "tiny" and key["lora_sha256"] is None and key["example"] == rec.id
    assert key["source_sha256"] == file_sha256(rec.source_path) and key["instruction"] == rec.instruction
    assert json.loads((out / "generation.json").read_text())["steps"] == TINY_DEFAULTS.num_inference_steps

    # every setting explicit and every edit fresh: the pipeline is not even loaded
    def no_load(*_a, **_k):
        raise AssertionError("the pipeline should not be loaded")

    monkeypatch.setattr(evaluate_module, "_load_editor", no_load)
    res = evaluate(bench, out, model="tiny", steps=TINY_DEFAULTS.num_inference_steps, guidance_scale=2.5,
                   resolution=32, max_sequence_length=TINY_DEFAULTS.max_sequence_length, **FAST)
    assert res["settings"]["generation"]["reused"] == 3 and _mtimes(out / "outputs") == pngs
    # other steps: every edit is stale; --stale-outputs refuse stops before loading anything
    with pytest.raises(ValueError, match=r"3 edit\(s\) .* generated otherwise, e\.g\. .*steps: 4 → 2"):
        evaluate(bench, out, model="tiny", steps=2, guidance_scale=2.5, resolution=32, max_sequence_length=16,
                 stale_outputs="refuse", **FAST)
    monkeypatch.undo()
    res = evaluate(bench, out, model="tiny", steps=2, **FAST)
    assert (res["settings"]["generation"]["regenerated_stale"], res["settings"]["generation"]["reused"]) == (3, 0)
    assert read_key(output_path(out / "outputs", rec))["steps"] == 2
    # a deleted edit is regenerated identically (per-example seeds); an edit without its sidecar (a run
    # killed between the two writes) is regenerated, not trusted
    victim = output_path(out / "outputs", rec)
    before = _pixels(victim)
    victim.unlink()
    sidecar_path(output_path(out / "outputs", CompBenchDataset(bench).records[1])).unlink()
    gen = evaluate(bench, out, model="tiny", steps=2, **FAST)["settings"]["generation"]
    assert (gen["generated"], gen["regenerated_stale"], gen["reused"]) == (1, 1, 1)
    assert np.array_equal(_pixels(victim), before)


def test_a_retrained_lora_at_the_same_path_is_regenerated(bench, tmp_path, tiny_pipe):
    lora_dir = tmp_path / "lora"
    first = _lora(tiny_pipe, lora_dir, seed=1)
    common = dict(model="tiny", lora=str(lora_dir), steps=1, tasks=["add"], **FAST)
    res = evaluate(bench, tmp_path / "eval", **common)
    out_file = res["examples"][0]["output"]
    old = _pixels(out_file)
    assert read_key(output_path(tmp_path / "eval" / "outputs", CompBenchDataset(bench, tasks=["add"]).records[0]))[
        "lora_sha256"] == file_sha256(first)
    base = evaluate(bench, tmp_path / "base", model="tiny", steps=1, tasks=["add"], **FAST)
    assert np.abs(_pixels(base["examples"][0]["output"]) - old).max() > 0  # the LoRA changes the edit
    _lora(tiny_pipe, lora_dir, seed=2)  # "retrained": same path, new weights
    with pytest.raises(ValueError, match="lora_sha256"):
        evaluate(bench, tmp_path / "eval", stale_outputs="refuse", **common)
    res = evaluate(bench, tmp_path / "eval", **common)
    assert res["settings"]["generation"]["regenerated_stale"] == 1
    assert np.abs(_pixels(out_file) - old).max() > 0
    assert res["settings"]["generation"]["lora"] == str(lora_dir / "pytorch_lora_weights.safetensors")


def test_another_spelling_of_the_same_model_path_is_recognised(bench, tmp_path, tiny_pipe):
    model_dir = tmp_path / "models" / "kontext"
    model_dir.mkdir(parents=True)
    link = tmp_path / "link"
    os.symlink(model_dir, link)
    spellings = [str(model_dir), str(model_dir) + "/", str(tmp_path / "models" / ".." / "models" / "kontext"), str(link)]
    assert len({model_identity(s) for s in spellings}) == 1
    assert model_identity("org/name") == "org/name" and model_identity("tiny", ("tiny",)) == "tiny"
    common = dict(pipeline=tiny_pipe, model_defaults=TINY_DEFAULTS, steps=1, tasks=["add"], **FAST)
    evaluate(bench, tmp_path / "eval", model=spellings[0], **common)
    for spelling in spellings[1:]:
        gen = evaluate(bench, tmp_path / "eval", model=spelling, **common)["settings"]["generation"]
        assert (gen["reused"], gen["generated"], gen["regenerated_stale"]) == (1, 0, 0), spelling
    other = tmp_path / "models" / "other"
    other.mkdir()
    gen = evaluate(bench, tmp_path / "eval", model=str(other), **common)["settings"]["generation"]
    assert gen["regenerated_stale"] == 1


def test_plan_reports_what_differs(bench, tmp_path):
    ds = CompBenchDataset(bench)
    settings = GenerationSettings(model="m", lora_sha256=None, steps=2, guidance_scale=2.5, seed=0, height=32,
                                  width=32, max_sequence_length=16)
    plan = plan_generation(ds.records, tmp_path, settings)
    assert len(plan.missing) == 3 and not plan.fresh and not plan.stale
    path = output_path(tmp_path, ds.records[0])
    path.parent.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(path)
    plan = plan_generation(ds.records, tmp_path, settings)
    assert plan.stale[0][1] == "no generation key stored beside it"
    sidecar_path(path).write_text(json.dumps({**plan.keys[ds.records[0].id], "seed": 7}))
    assert "seed: 7 → 0" in plan_generation(ds.records, tmp_path, settings).stale[0][1]


def test_arguments_parse_and_the_dispatcher(bench, tmp_path, capsys):
    args = parse_eval_args(["--data", str(bench), "--output-dir", str(tmp_path / "o"), "--model", "tiny",
                            "--steps", "1", "--fail-on-skipped", "--stale-outputs", "refuse", "--tasks", "add"])
    assert isinstance(args, EvalArguments) and args.fail_on_skipped and args.stale_outputs == "refuse"
    assert args.task_list() == ["add"] and args.resolution is None and args.eval_size == 512
    with pytest.raises(SystemExit):
        parse_eval_args(["--data", "x", "--output-dir", "y", "--stale-outputs", "sometimes"])
    with pytest.raises(ValueError, match="--steps: expected a positive integer"):
        EvalArguments(data="x", output_dir="y", steps=0)
    with pytest.raises(ValueError, match="--tasks"):
        EvalArguments(data="x", output_dir="y", tasks="add,paint").task_list()
    old = EvalArguments(data="x", output_dir="y", tiny=True)  # the deprecated alias
    assert old.model == "tiny" and "deprecated" in capsys.readouterr().err
    with pytest.raises(ValueError, match="contradicts"):
        EvalArguments(data="x", output_dir="y", tiny=True, model="org/other")
    assert run_eval(parse_eval_args(["--data", str(bench), "--output-dir", str(tmp_path / "o"), "--tiny", "--steps", "1",
                                     "--tasks", "add", "--clip-model", str(tmp_path / "no-clip"), "--eval-size", "32"])) == 0
    assert "| Add | 1 |" in capsys.readouterr().out

    from rcgrpo.cli import main

    def cli(*argv):
        code = main(["eval", *map(str, argv)])
        return code, capsys.readouterr()

    code, cap = cli("--data", tmp_path / "nowhere", "--output-dir", tmp_path / "o", "--model", "tiny")
    assert code == 2 and "CompBench directory not found" in cap.err
    code, cap = cli("--data", bench, "--output-dir", tmp_path / "o")
    assert code == 2 and "--model tiny|tiny-editor|PATH|HUB_ID" in cap.err
    code, cap = cli("--data", bench, "--output-dir", tmp_path / "o", "--model", "tiny", "--tasks", "add,paint")
    assert code == 2 and "--tasks" in cap.err
    code, cap = cli("--data", bench, "--output-dir", tmp_path / "o", "--model", "tiny", "--steps", "0")
    assert code == 2 and "--steps" in cap.err
    code, cap = cli("--data", bench, "--output-dir", tmp_path / "o", "--model", "tiny", "--strict",
                    "--clip-model", tmp_path / "no-clip", "--limit", "1", "--steps", "1")
    assert code == 2 and "no-clip" in cap.err
    code, cap = cli("--data", bench, "--output-dir", tmp_path / "o", "--model", "tiny", "--lora", tmp_path / "no-lora")
    assert code == 2 and "no-lora" in cap.err
    code, cap = cli("--data", bench, "--output-dir", tmp_path / "o2", "--model", "tiny", "--steps", "1", "--tasks", "add",
                    "--clip-model", tmp_path / "no-clip", "--eval-size", "32")
    assert code == 0 and "| Add | 1 |" in cap.out

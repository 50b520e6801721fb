"""RC-GRPO on the second editor family: the tiny Qwen-Image-Edit pipeline through the same trainer.

The Kontext-side twins of these tests live in test_trainer.py / test_distributed.py (two processes equal
one process with two groups, for both families); the family's own pieces (rollout = stock pipeline, the
drop-in processor, ACD on the instruction's tokens) in test_qwen_image_edit.py.
"""
import json

import pytest
import torch

from rcgrpo.data.synthetic import SquareDataset, redness_reward
from rcgrpo.editors.qwen_image_edit import QwenImageEditor
from rcgrpo.testing import TINY_QWEN_DEFAULTS, TINY_QWEN_SOURCE_AREA, tiny_qwen_edit_pipeline, tiny_qwen_editor
from rcgrpo.train.config import preset
from rcgrpo.train.trainer import RCGRPOTrainer

SIZE = 64


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(out, **overrides):
    values = dict(model="tiny-qwen", resolution=SIZE, group_size=4, num_anchors=2, groups_per_step=1,
                  num_inference_steps=2, max_steps=2, guidance_scale=4.0, acd_layers=2, w_acd=0.5,
                  learning_rate=2e-2, checkpoint_every=1, keep_checkpoints=2, sample_every=0, report_to="none",
                  train_size=4, eval_size=0, output_dir=str(out), max_sequence_length=TINY_QWEN_DEFAULTS.max_sequence_length,
                  reward_funcs=["redness"], reward_weights=[1.0])
    values.update(overrides)
    return preset("tiny", **values)


def trainer(out, **overrides):
    return RCGRPOTrainer(tiny_qwen_editor(), config(out, **overrides), [("redness", redness_reward)],
                         SquareDataset(4, size=SIZE))


def _final_image(editor, noise, example):
    source = example.image[None].to(editor.dtype)
    result = editor.rollout(source, example.instruction, noise, num_steps=2, guidance_scale=4.0, height=SIZE,
                            width=SIZE, max_sequence_length=TINY_QWEN_DEFAULTS.max_sequence_length,
                            negative_prompt=TINY_QWEN_DEFAULTS.negative_prompt)
    return result.images


def test_qwen_training_writes_a_lora_that_the_stock_pipeline_loads_and_reproduces(tmp_path):
    tr = trainer(tmp_path / "run")
    metrics = tr.train()
    assert tr.step == 2 and metrics["acd_mean"] is not None and metrics["approx_kl"] is not None
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["reward_mean"] is not None for r in rows)

    example = SquareDataset(1, size=SIZE, seed=5)[0]
    n_img, channels = tr.editor.latent_shape(SIZE, SIZE)
    noise = torch.randn(2, n_img, channels, generator=torch.Generator().manual_seed(0))
    trained = _final_image(tr.editor, noise, example)

    pipe = tiny_qwen_edit_pipeline(0)  # a fresh stock pipeline: the LoRA comes only from the file
    base = _final_image(QwenImageEditor(pipe, TINY_QWEN_DEFAULTS, source_area=TINY_QWEN_SOURCE_AREA,
                                        condition_area=TINY_QWEN_SOURCE_AREA), noise, example)
    assert (trained - base).abs().max() > 1e-3, "the LoRA should change the edit"
    pipe.load_lora_weights(str(tmp_path / "run" / "lora"))  # diffusers' own loader
    loaded = _final_image(QwenImageEditor(pipe, TINY_QWEN_DEFAULTS, source_area=TINY_QWEN_SOURCE_AREA,
                                          condition_area=TINY_QWEN_SOURCE_AREA), noise, example)
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-4)


def test_qwen_resume_continues_exactly_where_the_run_stopped(tmp_path):
    straight = trainer(tmp_path / "straight", max_steps=2)
    straight.train()
    first = trainer(tmp_path / "split", max_steps=1)
    first.train()
    resumed = trainer(tmp_path / "split", max_steps=2)
    assert resumed.resume(tmp_path / "split") and resumed.step == 1
    resumed.train()
    for a, b in zip(straight.lora_parameters, resumed.lora_parameters):
        assert torch.equal(a, b)
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in rows(tmp_path / "split")] == [r["loss"] for r in rows(tmp_path / "straight")]


def test_rcgrpo_train_command_runs_the_qwen_family(tmp_path, capsys):
    """`rcgrpo train --model tiny-qwen`: through the CLI's memory pre-flight (Qwen-Image's memory model,
    the loaded text encoder and source area) to a LoRA the stock loader reads."""
    from diffusers import QwenImageEditPipeline

    from rcgrpo.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--preset", "tiny", "--model", "tiny-qwen", "--resolution", str(SIZE), "--max-steps", "1",
               "--output-dir", str(out), "--report-to", "none"])
    assert rc in (0, None), capsys.readouterr().err
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = tiny_qwen_edit_pipeline()
    assert isinstance(pipe, QwenImageEditPipeline)
    pipe.load_lora_weights(str(out / "lora"))
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())

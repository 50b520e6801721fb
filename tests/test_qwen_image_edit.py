"""Qwen-Image-Edit behind the Editor interface: the tiny pipelines, the instruction's token weights, the
rollout against the stock pipelines, the true-CFG velocity, LoRA through the stock loader and ACD.

Tiny pipelines (`rcgrpo.testing.tiny_qwen_edit_pipeline`): VAE factor 8, so a 64×96 px edit is 4×6 = 24
target tokens of C = 16 channels. The stock pipelines resize the source to about 1024² px (4096 source
tokens); most tests run both sides at a small source area instead: our rollout with `source_area`, the
stock pipeline with its area constants patched. The op runs on its torch backend.
"""
import numpy as np
import pytest
import torch
from diffusers.models.transformers import transformer_qwenimage
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module
from PIL import Image

import rcgrpo
from rcgrpo.editors.acd import detach_acd
from rcgrpo.editors.qwen_image_edit import QwenACDAttnProcessor, QwenImageEditor
from rcgrpo.editors.qwen_image_edit.attention import attention_modules
from rcgrpo.editors.qwen_image_edit.source import STOCK_CONDITION_AREA, STOCK_SOURCE_AREA
from rcgrpo.editors.latents import euler_step
from rcgrpo.testing import tiny_qwen_edit_pipeline

INSTRUCTION = "make the hat red"
SOURCE_AREA = 64 * 64  # a 48x80 source becomes 64x96 px: 4x6 = 24 source tokens
CONDITION_AREA = 56 * 56
HEIGHT, WIDTH = 64, 96
N_IMG, C = 24, 16
GROUP = 2
SCALE = 4.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine two threads can be 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipes():
    return {False: tiny_qwen_edit_pipeline(0), True: tiny_qwen_edit_pipeline(0, plus=True)}


@pytest.fixture(scope="module")
def source():
    """(PIL image, the same image as a [1, 3, H, W] tensor in [0, 1]): 48x80 px."""
    pixels = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    return Image.fromarray(pixels), torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def noises():
    return torch.randn(GROUP, N_IMG, C, generator=torch.Generator().manual_seed(1))


def editor(pipe, **kwargs):
    kwargs.setdefault("source_area", SOURCE_AREA)
    kwargs.setdefault("condition_area", CONDITION_AREA)
    return QwenImageEditor(pipe, **kwargs)


def run(ed, image, noises, *, steps=2, scale=SCALE, negative=" ", **kwargs):
    return ed.rollout(image, INSTRUCTION, noises, num_steps=steps, guidance_scale=scale, height=HEIGHT, width=WIDTH,
                      max_sequence_length=64, negative_prompt=negative, **kwargs)


def stock_small(pipe, image, noises, monkeypatch, *, steps=2, scale=SCALE, negative=" "):
    """The stock pipeline with its source areas patched to ours; returns (images, states [G, T+1, N, C])."""
    real = edit_module.calculate_dimensions
    monkeypatch.setattr(edit_module, "calculate_dimensions",
                        lambda area, ratio: real(SOURCE_AREA if area == STOCK_SOURCE_AREA else area, ratio))
    monkeypatch.setattr(plus_module, "VAE_IMAGE_SIZE", SOURCE_AREA)
    monkeypatch.setattr(plus_module, "CONDITION_IMAGE_SIZE", CONDITION_AREA)
    states = [noises]

    def record(_pipe, _i, _t, tensors):
        states.append(tensors["latents"].clone())
        return {}

    images = pipe(image=image, prompt=INSTRUCTION, negative_prompt=negative, true_cfg_scale=scale, height=HEIGHT,
                  width=WIDTH, num_inference_steps=steps, latents=noises, num_images_per_prompt=noises.shape[0],
                  output_type="pt", callback_on_step_end=record).images
    monkeypatch.undo()
    return images, torch.stack(states, dim=1)


# ------------------------------------------------------------------------------------------
# the tiny pipelines
# ------------------------------------------------------------------------------------------
def test_tiny_pipelines_are_deterministic_offline_and_tokenize_like_the_real_template(pipes):
    again = tiny_qwen_edit_pipeline(0)
    other = tiny_qwen_edit_pipeline(1)
    for name in ("transformer", "vae", "text_encoder"):
        a, b, c = (getattr(p, name).state_dict() for p in (pipes[False], again, other))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)
        assert not getattr(pipes[False], name).training
        assert not any(p.requires_grad for p in getattr(pipes[False], name).parameters())
    assert type(pipes[True]).__name__ == "QwenImageEditPlusPipeline"
    tok = pipes[False].tokenizer
    for pipe in pipes.values():
        # as with the real tokenizer, the dropped 64 tokens are exactly the system prompt and the user turn
        template = pipe.prompt_template_encode
        head = template[: template.index("{}")]
        head = head[: head.index("<|vision_start|>")] if "<|vision_start|>" in head else head
        assert len(tok(head)["input_ids"]) == pipe.prompt_template_encode_start_idx == 64
    for special in ("<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert len(tok(special)["input_ids"]) == 1
    assert tok.convert_ids_to_tokens(tok(" the hat")["input_ids"]) == ["Ġthe", "Ġhat"]


# ------------------------------------------------------------------------------------------
# the instruction's token weights
# ------------------------------------------------------------------------------------------
TRICKY = [
    INSTRUCTION,
    "the the hat",  # merged tokens that also occur in the system prompt
    "  add a cat\n",  # leading spaces and a trailing newline next to the template's special tokens
    "café ☕ {} {0} rouge",  # multi-byte characters; braces are not format fields of the argument
    "replace the sky with a sign that says " + "x" * 90,  # long
]


@pytest.mark.parametrize("plus", [False, True], ids=["edit", "plus"])
@pytest.mark.parametrize("instruction", TRICKY, ids=["plain", "merges", "spaces", "unicode", "long"])
def test_acd_weights_are_exactly_the_instructions_tokens(pipes, source, plus, instruction):
    pipe = pipes[plus]
    ed = editor(pipe)
    text = ed.encode_text(instruction, source[1], max_sequence_length=1024, negative_prompt=" ")
    prepared = ed.prepare_source(source[1])
    # the pipeline's own encoder gives the same embeddings
    embeds, mask = pipe.encode_prompt(instruction, image=prepared.vl_input(plus), device="cpu")
    assert mask is None and torch.equal(text.prompt_embeds, embeds)
    assert text.negative_embeds is not None and text.negative_embeds.shape[1] < embeds.shape[1]

    # independent derivation, from the end: [... <|vision_end|> INSTRUCTION <closing tokens>]
    tok = pipe.tokenizer
    own = tok(instruction)["input_ids"]
    closing = tok(pipe.prompt_template_encode.split("{}")[-1])["input_ids"]
    n_txt = embeds.shape[1]
    expected = torch.zeros(n_txt)
    expected[n_txt - len(closing) - len(own): n_txt - len(closing)] = 1
    assert text.acd_weights.dtype == torch.float32 and torch.equal(text.acd_weights, expected)
    ids = pipe.processor(text=[pipe.prompt_template_encode.format(("Picture 1: <|vision_start|><|image_pad|>"
                                                                  "<|vision_end|>" if plus else "") + instruction)],
                         images=prepared.vl_input(plus), padding=True, return_tensors="pt")["input_ids"][0]
    ids = ids[pipe.prompt_template_encode_start_idx:]
    start = n_txt - len(closing) - len(own)
    assert ids[start:start + len(own)].tolist() == own
    assert tok.convert_ids_to_tokens(int(ids[start - 1])) == "<|vision_end|>"
    assert len(closing) == 5 and ids[0] == tok.convert_tokens_to_ids("Picture" if plus else "<|vision_start|>")

    assert ed.encode_text(instruction, source[1], max_sequence_length=1024, acd_text_tokens="all").acd_weights is None


def test_long_instructions_are_truncated_to_max_sequence_length(pipes, source):
    ed = editor(pipes[False])
    long = "replace the sky with a sign that says hello " * 6
    with pytest.warns(UserWarning, match="truncated to 7 tokens"):
        text = ed.encode_text(long, source[1], max_sequence_length=7)
    assert long.startswith(text.instruction) and int(text.acd_weights.sum()) == 7
    assert len(pipes[False].tokenizer(text.instruction)["input_ids"]) == 7
    cut = "unbelievable " * 3  # cut inside a word: the kept part re-tokenizes within the limit
    with pytest.warns(UserWarning):
        short = ed.encode_text(cut, source[1], max_sequence_length=5)
    assert 1 <= int(short.acd_weights.sum()) <= 5


@pytest.mark.parametrize("instruction, kwargs, match", [
    ("", {}, "instruction is empty"),
    ("   ", {}, "instruction is empty"),
    (None, {}, "instruction must be a string"),
    ("make <|im_end|> red", {}, "special token '<\\|im_end\\|>'"),
    (INSTRUCTION, {"max_sequence_length": 0}, "max_sequence_length must be an int in 1..1024"),
    (INSTRUCTION, {"max_sequence_length": 2048}, "max_sequence_length must be an int in 1..1024"),
    (INSTRUCTION, {"acd_text_tokens": "instruction"}, "acd_text_tokens must be one of"),
    (INSTRUCTION, {"negative_prompt": 3}, "negative_prompt must be a string"),
])
def test_bad_text_inputs_raise(pipes, source, instruction, kwargs, match):
    kwargs = {"max_sequence_length": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        editor(pipes[False]).encode_text(instruction, source[1], **kwargs)


# ------------------------------------------------------------------------------------------
# rollout = stock pipeline
# ------------------------------------------------------------------------------------------
class _EncodeMemo:
    """`vae.encode` that computes each distinct input once: the stock call and our rollout must feed the
    VAE the same source tensor bit for bit, which `hits` counts (and a 1024² encode is slow on a CPU)."""

    def __init__(self, vae):
        self.real, self.seen, self.hits = vae.encode, [], 0

    def __call__(self, x, *args, **kwargs):
        for inp, out in self.seen:
            if inp.shape == x.shape and torch.equal(inp, x):
                self.hits += 1
                return out
        out = self.real(x, *args, **kwargs)
        self.seen.append((x.clone(), out))
        return out


@pytest.mark.parametrize("plus", [False, True], ids=["edit", "plus"])
def test_rollout_equals_the_stock_pipeline_at_the_stock_sizes(pipes, source, plus, monkeypatch):
    pipe = pipes[plus]
    ed = QwenImageEditor(pipe)  # stock areas: 1024² source, 384² Plus condition image
    assert (ed.source_area, ed.condition_area) == (STOCK_SOURCE_AREA, STOCK_CONDITION_AREA)
    assert getattr(plus_module, "VAE_IMAGE_SIZE") == STOCK_SOURCE_AREA
    assert getattr(plus_module, "CONDITION_IMAGE_SIZE") == STOCK_CONDITION_AREA
    noise = torch.randn(1, N_IMG, C, generator=torch.Generator().manual_seed(2))
    memo = _EncodeMemo(pipe.vae)
    monkeypatch.setattr(pipe.vae, "encode", memo)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"].shape[1], kw["encoder_hidden_states"])), with_kwargs=True)
    try:
        stock = pipe(image=source[0], prompt=INSTRUCTION, negative_prompt=" ", true_cfg_scale=SCALE, height=HEIGHT,
                     width=WIDTH, num_inference_steps=2, latents=noise, output_type="pt").images
    finally:
        hook.remove()
    width, height, _ = edit_module.calculate_dimensions(1024 * 1024, 80 / 48)
    assert seen[0][0] == N_IMG + (height // 16) * (width // 16) > 4000  # the source really is about 1024² px
    res = run(ed, source[1], noise, cfg_batch=False)
    batched = run(ed, source[1], noise, cfg_batch=True)
    assert memo.hits == 2
    print(f"stock sizes ({'plus' if plus else 'edit'}): max |Δ image| separate "
          f"{(res.images - stock).abs().max():.3g}, batched {(batched.images - stock).abs().max():.3g}")
    torch.testing.assert_close(res.images, stock, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.images, stock, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.conditioning.prompt_embeds, seen[0][1], rtol=0, atol=0)
    torch.testing.assert_close(res.conditioning.negative_embeds, seen[1][1], rtol=0, atol=0)


@pytest.mark.parametrize("plus", [False, True], ids=["edit", "plus"])
def test_rollout_equals_the_stock_pipeline_with_its_source_area_patched(pipes, source, noises, plus, monkeypatch):
    pipe = pipes[plus]
    ed = editor(pipe)
    stock_images, stock_states = stock_small(pipe, source[0], noises, monkeypatch, steps=3)
    separate = run(ed, source[1], noises, steps=3, cfg_batch=False)
    batched = run(ed, source[1], noises, steps=3, cfg_batch=True)
    assert separate.states.shape == (GROUP, 4, N_IMG, C) and separate.images.shape == (GROUP, 3, HEIGHT, WIDTH)
    assert torch.equal(separate.states[:, 0], noises)
    assert float(separate.sigmas[0]) == 1.0 and float(separate.sigmas[-1]) == 0.0
    torch.testing.assert_close(separate.timesteps, pipe.scheduler.timesteps, rtol=0, atol=0)
    for res in (separate, batched):
        torch.testing.assert_close(res.states, stock_states, rtol=0, atol=1e-5)
        torch.testing.assert_close(res.images, stock_images, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.states, separate.states, rtol=0, atol=1e-5)
    assert separate.conditioning.cfg_batch is False and batched.conditioning.cfg_batch is True
    print(f"small source ({'plus' if plus else 'edit'}): separate {(separate.images - stock_images).abs().max():.3g}, "
          f"batched {(batched.images - stock_images).abs().max():.3g}")


def test_rollout_equals_the_stock_pipeline_with_a_2511_style_transformer(source, noises, monkeypatch):
    """Qwen-Image-Edit-2511's transformer modulates the source tokens as at t = 0 (`zero_cond_t`)."""
    from diffusers import QwenImageTransformer2DModel

    pipe = tiny_qwen_edit_pipeline(0, plus=True)
    config = dict(pipe.transformer.config)
    config["zero_cond_t"] = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        pipe.transformer = QwenImageTransformer2DModel.from_config(config).eval()
    stock_images, stock_states = stock_small(pipe, source[0], noises, monkeypatch)
    for batched in (False, True):
        res = run(editor(pipe), source[1], noises, cfg_batch=batched)
        torch.testing.assert_close(res.states, stock_states, rtol=0, atol=1e-5)
        torch.testing.assert_close(res.images, stock_images, rtol=0, atol=1e-5)


def test_without_cfg_the_rollout_equals_the_stock_pipeline(pipes, source, noises, monkeypatch):
    pipe = pipes[False]
    ed = editor(pipe)
    stock_images, stock_states = stock_small(pipe, source[0], noises, monkeypatch, scale=1.0, negative=None)
    res = run(ed, source[1], noises, scale=1.0, negative=None)
    assert res.conditioning.negative_embeds is None
    torch.testing.assert_close(res.states, stock_states, rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="true CFG is off"):
        plain = run(ed, source[1], noises, negative=None)  # scale 4 without a negative prompt: no CFG
    torch.testing.assert_close(plain.states, res.states, rtol=0, atol=0)


def test_velocity_reproduces_each_transition_and_trains_a_lora(source, noises):
    from peft import LoraConfig

    pipe = tiny_qwen_edit_pipeline(0)
    ed = editor(pipe)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(ed.lora_targets)))
    named = [(n, p) for n, p in pipe.transformer.named_parameters() if "lora_" in n]
    lora = [p for _, p in named]
    assert len(lora) == 2 * 2 * len(ed.lora_targets)  # 2 blocks × (A, B) × 8 projections
    for p in lora:
        p.requires_grad_(True)
    # the last block's text outputs are discarded: its add_q_proj and to_add_out get no gradient
    dead = {n for n, _ in named if n.startswith("transformer_blocks.1.") and ("add_q_proj" in n or "to_add_out" in n)}
    for batched in (False, True):
        res = run(ed, source[1], noises, steps=3, cfg_batch=batched)
        cond = res.conditioning
        for j in range(3):
            v = ed.velocity(cond, res.states[:, j], res.timesteps[j].expand(GROUP))
            assert v.requires_grad  # grad enabled and the LoRA trainable
            x_next = euler_step(res.states[:, j], v.detach(), res.sigmas[j], res.sigmas[j + 1])
            torch.testing.assert_close(x_next, res.states[:, j + 1], rtol=0, atol=1e-6)
        for p in lora:
            p.grad = None
        v.square().mean().backward()
        assert len(dead) == 4
        assert all(p.grad is None or not p.grad.any() for n, p in named if n in dead)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in named if n not in dead)
        assert all(p.grad.abs().sum() > 0 for n, p in named if "lora_B" in n and n not in dead)  # B = 0: A's grad is 0


def test_rollout_checks_its_inputs(pipes, source, noises):
    ed = editor(pipes[False])
    with pytest.raises(ValueError, match=r"noises must have shape \[G, N_img, C\] = \[G, 24, 16\]"):
        run(ed, source[1], torch.zeros(2, 10, 16))
    with pytest.raises(ValueError, match="num_steps must be an int"):
        run(ed, source[1], noises, steps=0)
    text = ed.encode_text(INSTRUCTION, source[1], max_sequence_length=64, negative_prompt=" ")
    with pytest.raises(ValueError, match="negative_prompt='blurry' but the given text was encoded with ' '"):
        run(ed, source[1], noises, text=text, negative="blurry")
    with pytest.raises(ValueError, match="encode the text with the same source_area"):
        run(ed, source[1], noises, text=text, source_area=128 * 128)
    with pytest.raises(ValueError, match="source image must be a \\[1, 3, H, W\\] tensor"):
        run(ed, source[1][0, :2], noises)
    with pytest.raises(ValueError, match="together with the source image; pass image"):
        ed.encode_text(INSTRUCTION, None, max_sequence_length=64)
    with pytest.raises(ValueError, match="source_area must be an int"):
        QwenImageEditor(pipes[False], source_area=10)
    from rcgrpo.testing import tiny_kontext_pipeline

    with pytest.raises(ValueError, match="FluxKontextPipeline is not a Qwen-Image-Edit pipeline; supported: "
                                         "QwenImageEditPipeline, QwenImageEditPlusPipeline"):
        QwenImageEditor(tiny_kontext_pipeline(0))


def test_geometry(pipes):
    ed = editor(pipes[True])
    assert ed.family == "qwen-image-edit" and ed.text_depends_on_image and ed.plus
    assert ed.size_multiple == 16 and ed.latent_channels == 16
    assert ed.latent_shape(HEIGHT, WIDTH) == (N_IMG, C) and ed.token_grid(HEIGHT, WIDTH) == (4, 6)
    # calculate_dimensions' sizes: 1024² area, aspect kept, 32 px multiples
    for h, w in [(1024, 1024), (600, 1000), (1000, 333)]:
        cw, ch, _ = edit_module.calculate_dimensions(1024 * 1024, w / h)
        assert ed.edit_size(h, w, 1024) == (ch, cw)
    assert ed.edit_size(48, 80, 64) == (64, 96) and ed.edit_size(48, 80, 64, keep_aspect=False) == (64, 64)
    key = ed.text_cache_key(INSTRUCTION, torch.zeros(1, 3, 8, 8), max_sequence_length=64)
    assert key != editor(pipes[True], source_area=128 * 128).text_cache_key(INSTRUCTION, torch.zeros(1, 3, 8, 8),
                                                                           max_sequence_length=64)


# ------------------------------------------------------------------------------------------
# LoRA through the stock loader
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("plus", [False, True], ids=["edit", "plus"])
def test_lora_saved_in_the_diffusers_format_reproduces_the_trained_model(source, noises, plus, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    trained = tiny_qwen_edit_pipeline(0, plus=plus)
    ed = editor(trained)
    trained.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(ed.lora_targets)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        for name, p in trained.transformer.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
    expected = run(ed, source[1], noises).images
    base = run(editor(tiny_qwen_edit_pipeline(0, plus=plus)), source[1], noises).images
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the edit

    path = ed.save_lora(get_peft_model_state_dict(trained.transformer), tmp_path / "lora")
    assert path == tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
    assert len(keys) == 2 * 2 * 8 and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    assert {k.split(".attn.")[1].rsplit(".lora_", 1)[0] for k in keys} == set(ed.lora_targets)

    stock = tiny_qwen_edit_pipeline(0, plus=plus)
    stock.load_lora_weights(str(tmp_path / "lora"))  # diffusers' own loader
    torch.testing.assert_close(run(editor(stock), source[1], noises).images, expected, rtol=0, atol=1e-6)
    checked = editor(tiny_qwen_edit_pipeline(0, plus=plus))
    checked.load_lora(tmp_path / "lora")  # rcgrpo's checked loader
    torch.testing.assert_close(run(checked, source[1], noises).images, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="expected a peft LoRA state dict"):
        ed.save_lora({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, tmp_path / "bad")


# ------------------------------------------------------------------------------------------
# ACD: the drop-in processor and the mass
# ------------------------------------------------------------------------------------------
def test_processor_is_a_drop_in_outside_a_capture(pipes, source, noises):
    pipe = pipes[False]
    ed = editor(pipe)
    transformer = pipe.transformer
    originals = [m.processor for _, m in attention_modules(transformer)]
    stock = {b: run(ed, source[1], noises, cfg_batch=b) for b in (False, True)}
    recorder = rcgrpo.attach_acd(transformer, last_k=2, backend="torch")
    try:
        assert recorder.family.name == "qwen-image" and recorder.layer_names == [n for n, _ in ed.attention_modules()]
        assert all(isinstance(m.processor, QwenACDAttnProcessor) for _, m in attention_modules(transformer))
        for batched in (False, True):
            attached = run(ed, source[1], noises, cfg_batch=batched)
            assert torch.equal(attached.states, stock[batched].states)  # bit for bit
            mask = torch.zeros(N_IMG)
            mask[:7] = 1
            with recorder.capture(mask) as cap:
                captured = run(ed, source[1], noises, cfg_batch=batched)
            torch.testing.assert_close(captured.states, stock[batched].states, rtol=0, atol=1e-5)
            assert cap.num_calls == 2 * 2  # 2 layers × 2 steps: the conditional passes only
    finally:
        detach_acd(transformer)
    assert all(a is b for a, b in zip([m.processor for _, m in attention_modules(transformer)], originals))


def _stock_qk(attn, kwargs, monkeypatch):
    """Joint q, k `[B, N, H, D]` after RoPE, as diffusers' own processor computes them."""
    seen = {}
    real = transformer_qwenimage.dispatch_attention_fn

    def spy(query, key, value, **kw):
        seen["q"], seen["k"] = query, key
        return real(query, key, value, **kw)

    with monkeypatch.context() as m:
        m.setattr(transformer_qwenimage, "dispatch_attention_fn", spy)
        QwenDoubleStreamAttnProcessor2_0()(attn, **kwargs)
    return seen["q"], seen["k"]


@pytest.mark.parametrize("batched", [False, True], ids=["separate", "batched"])
def test_mass_is_the_instructions_attention_on_the_target_in_float64(pipes, source, noises, batched, monkeypatch):
    pipe = pipes[True]
    ed = editor(pipe)
    text = ed.encode_text(INSTRUCTION, source[1], max_sequence_length=64, negative_prompt=" ")
    weights = text.acd_weights
    n_txt, n_words = text.text_len, int(weights.sum())
    assert n_words == 4 and text.negative_embeds.shape[1] != n_txt
    mask = torch.zeros(GROUP, N_IMG)
    mask[0, :6], mask[1, 10:20] = 1, 1
    recorder = rcgrpo.attach_acd(pipe.transformer, last_k=1, backend="torch")  # the last block
    module = pipe.transformer.transformer_blocks[1].attn
    inputs = []
    hook = module.register_forward_pre_hook(lambda m, a, kw: inputs.append((recorder.rows, dict(kw))),
                                            with_kwargs=True)
    try:
        with recorder.capture(mask, text_weights=weights) as cap:
            run(ed, source[1], noises, text=text, cfg_batch=batched)
        with recorder.capture(mask) as every:  # no weights: every (real) text position weighs
            run(ed, source[1], noises, text=text, cfg_batch=batched)
    finally:
        hook.remove()
        detach_acd(pipe.transformer)
    conditional = [kw for rows, kw in inputs[: len(inputs) // 2] if rows != 0]
    assert len(conditional) == cap.num_calls == 2 and cap.layers == [1, 1]
    assert cap.skipped["unconditional"] == (0 if batched else 2) and cap.text_len >= n_txt
    expected = []
    for kw in conditional:
        q, k = _stock_qk(module, kw, monkeypatch)
        text_len = kw["encoder_hidden_states"].shape[1]
        if batched:  # [conditional G | unconditional G], text padded to the longer prompt and masked
            assert q.shape[0] == 2 * GROUP and text_len == max(n_txt, text.negative_embeds.shape[1])
            assert kw["encoder_hidden_states_mask"] is not None
        qd, kd = q[:GROUP, :n_txt].double(), k[:GROUP, text_len:text_len + N_IMG].double()  # keys: target only
        probs = torch.softmax(torch.einsum("bvhd,buhd->bhvu", qd, kd) * q.shape[-1] ** -0.5, dim=-1)
        expected.append((probs * weights.double()[None, None, :, None]).sum(2).mean(1))
    expected = torch.stack(expected)
    torch.testing.assert_close(cap.mass.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cap.mass.sum(-1), torch.full((2, GROUP), float(n_words)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(every.mass.sum(-1), torch.full((2, GROUP), float(n_txt)), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(every.mass / n_txt, cap.mass / n_words, atol=1e-4)
    inside = (expected * mask).sum(-1) / (mask.sum(-1) + 1e-6)
    torch.testing.assert_close(cap.acd.double(), inside / (expected.sum(-1) / (N_IMG + 1e-6)), rtol=1e-5, atol=1e-5)

"""FluxACDAttnProcessor, attach/detach, ACDRecorder captures and the ACD heatmap (SPEC §7, §9).

Uses the tiny offline Kontext pipeline at 32×32 px: 16 text tokens, 64 target and 64 context
tokens, 4 attention modules (2 double-stream, 2 single-stream). The op runs on its torch backend.
"""
import os

import numpy as np
import pytest
import torch
from diffusers.models.transformers import transformer_flux
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from PIL import Image

from rcgrpo.editors.acd import ACDRecorder, attach_acd, detach_acd
from rcgrpo.editors.flux_kontext.attention import FluxACDAttnProcessor, attention_modules
from rcgrpo.editors.heatmap import save_acd_heatmap
from rcgrpo.editors.flux_kontext.rollout import rollout
from rcgrpo.testing import TINY_TEXT_LEN, tiny_kontext_pipeline

SIZE = 32
STEPS = 2
GROUP = 2
N_IMG = 64
LAST_K = 3  # layers 1 (double-stream), 2 and 3 (single-stream)
SELECTED = [1, 2, 3]


@pytest.fixture(scope="module")
def pipe():
    return tiny_kontext_pipeline(seed=0)


@pytest.fixture(scope="module")
def source_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def noises():
    return torch.randn(GROUP, N_IMG, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def token_mask():
    grid = torch.zeros(8, 8)
    grid[2:5, 3:7] = 1.0
    return grid.reshape(-1)


@pytest.fixture
def recorder(pipe):
    rec = attach_acd(pipe.transformer, last_k=LAST_K, backend="torch")
    yield rec
    if rec.attached:
        detach_acd(pipe.transformer)


def run(pipe, image, noises):
    return rollout(pipe, image, "make the hat red", noises, num_steps=STEPS, guidance_scale=2.5,
                   height=SIZE, width=SIZE, max_sequence_length=TINY_TEXT_LEN)


def explicit_acd(mass, token_mask, eps=1e-6):
    """ACD of SPEC §7 written out: mass [..., B, N], token_mask [N] or [B, N] -> [..., B]."""
    m = token_mask.double()
    inside = (mass.double() * m).sum(-1) / (m.sum(-1) + eps)
    overall = mass.double().sum(-1) / (mass.shape[-1] + eps)
    return inside / overall


# ------------------------------------------------------------------------------------------
# drop-in behaviour
# ------------------------------------------------------------------------------------------
def test_outside_capture_is_bit_identical_and_detach_restores(pipe, source_image, noises):
    transformer = pipe.transformer
    originals = [m.processor for _, m in attention_modules(transformer)]
    stock = run(pipe, source_image, noises)

    rec = attach_acd(transformer, last_k=LAST_K, backend="torch")
    try:
        procs = [m.processor for _, m in attention_modules(transformer)]
        assert procs[0] is originals[0]
        assert all(isinstance(p, FluxACDAttnProcessor) for p in procs[1:])
        assert [p.layer_index for p in procs[1:]] == SELECTED and all(p.recorder is rec for p in procs[1:])
        attached = run(pipe, source_image, noises)
    finally:
        detach_acd(transformer)

    assert torch.equal(attached.states, stock.states)
    assert torch.equal(attached.images, stock.images)
    restored = [m.processor for _, m in attention_modules(transformer)]
    assert all(a is b for a, b in zip(restored, originals))
    assert not hasattr(transformer, "_rcgrpo_acd_recorder")


def test_inside_capture_matches_stock_within_fp32_tolerance(pipe, source_image, noises, token_mask):
    stock = run(pipe, source_image, noises)
    rec = attach_acd(pipe.transformer, last_k=LAST_K, backend="torch")
    try:
        with rec.capture(token_mask) as cap:
            captured = run(pipe, source_image, noises)
    finally:
        detach_acd(pipe.transformer)
    assert cap.num_calls == LAST_K * STEPS
    torch.testing.assert_close(captured.states, stock.states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(captured.images, stock.images, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# the recorded mass against a materialized softmax of the stock processor's q, k
# ------------------------------------------------------------------------------------------
def _stock_qk(attn, call_kwargs, monkeypatch):
    """q, k `[B, N, H, D]` after RoPE, as diffusers' own FluxAttnProcessor computes them."""
    seen = {}
    real = transformer_flux.dispatch_attention_fn

    def spy(query, key, value, **kwargs):
        seen["q"], seen["k"] = query, key
        return real(query, key, value, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(transformer_flux, "dispatch_attention_fn", spy)
        FluxAttnProcessor()(attn, **call_kwargs)
    return seen["q"], seen["k"]


def _materialized_mass(q, k, text_len, image_len, weights):
    """a(u) of SPEC §7 with an explicit softmax over the image keys, in float64: `[B, image_len]`."""
    q, k = q.double(), k.double()
    logits = torch.einsum("bvhd,buhd->bhvu", q[:, :text_len], k[:, text_len:text_len + image_len])
    probs = torch.softmax(logits * q.shape[-1] ** -0.5, dim=-1)  # [B, H, text, image], rows sum to 1
    w = torch.ones(q.shape[0], text_len, dtype=torch.float64) if weights is None else weights.double()
    return (probs * w[:, None, :, None]).sum(2).mean(1)


@pytest.mark.parametrize("weights_kind", ["none", "per_image", "shared"])
def test_mass_matches_materialized_softmax(pipe, source_image, noises, token_mask, recorder, monkeypatch, weights_kind):
    gen = torch.Generator().manual_seed(3)
    weights, mask = None, token_mask
    if weights_kind == "per_image":
        weights = torch.rand(GROUP, TINY_TEXT_LEN, generator=gen) * 2
        weights[0, :5] = 0.0
        mask = torch.stack([token_mask, torch.roll(token_mask, 9)])  # [B, N_img]
    elif weights_kind == "shared":
        weights = torch.rand(TINY_TEXT_LEN, generator=gen)

    # Record every input of the selected attention modules during the captured run.
    inputs = []
    modules = dict(attention_modules(pipe.transformer))
    names = [name for name, _ in attention_modules(pipe.transformer)]
    handles = []
    for layer in SELECTED:
        def hook(module, args, kwargs, layer=layer):
            kw = dict(kwargs)
            if args:
                kw["hidden_states"] = args[0]
            inputs.append((layer, module, kw))
        handles.append(modules[names[layer]].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with recorder.capture(mask, text_weights=weights) as cap:
            run(pipe, source_image, noises)
    finally:
        for h in handles:
            h.remove()

    assert cap.num_calls == LAST_K * STEPS == len(inputs)
    assert cap.layers == SELECTED * STEPS == [layer for layer, _, _ in inputs]
    assert cap.text_len == TINY_TEXT_LEN and cap.image_len == N_IMG
    full_w = None if weights is None else (weights.expand(GROUP, -1) if weights.dim() == 1 else weights)
    expected = []
    for layer, module, kw in inputs:
        q, k = _stock_qk(module, kw, monkeypatch)
        expected.append(_materialized_mass(q, k, TINY_TEXT_LEN, N_IMG, full_w))
    expected = torch.stack(expected)

    mass = cap.mass
    assert mass.shape == (LAST_K * STEPS, GROUP, N_IMG) and mass.dtype == torch.float32
    torch.testing.assert_close(mass.double(), expected, atol=1e-5, rtol=1e-5)
    total = torch.full((GROUP,), float(TINY_TEXT_LEN), dtype=torch.float64) if full_w is None else full_w.double().sum(-1)
    torch.testing.assert_close(mass.double().sum(-1), total.expand_as(mass[..., 0]), atol=1e-4, rtol=1e-5)

    acd = explicit_acd(expected, mask)
    assert cap.acd.shape == (LAST_K * STEPS, GROUP)
    torch.testing.assert_close(cap.acd.double(), acd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cap.reward().double(), acd.mean(0), atol=1e-5, rtol=1e-5)
    assert cap.reward().shape == (GROUP,)
    assert not cap.open and cap.num_skipped == 0


def test_text_weights_change_the_mass(pipe, source_image, noises, token_mask, recorder):
    with recorder.capture(token_mask) as plain:
        run(pipe, source_image, noises)
    ones = torch.ones(TINY_TEXT_LEN)
    with recorder.capture(token_mask, text_weights=ones) as unit:
        run(pipe, source_image, noises)
    first_only = torch.zeros(GROUP, TINY_TEXT_LEN)
    first_only[:, 0] = 1.0
    with recorder.capture(token_mask, text_weights=first_only) as single:
        run(pipe, source_image, noises)
    torch.testing.assert_close(unit.mass, plain.mass)
    torch.testing.assert_close(single.mass.sum(-1), torch.ones(LAST_K * STEPS, GROUP))
    assert not torch.allclose(single.mass * TINY_TEXT_LEN, plain.mass, atol=1e-3)


# ------------------------------------------------------------------------------------------
# layouts, gradients, masks
# ------------------------------------------------------------------------------------------
def test_wrong_layout_raises_value_error(pipe, source_image, noises, token_mask, recorder):
    with pytest.raises(ValueError, match="text_len=15"):
        with recorder.capture(token_mask, text_len=15):
            run(pipe, source_image, noises)
    with pytest.raises(ValueError, match="image_len=200"):
        with recorder.capture(torch.zeros(200)):
            run(pipe, source_image, noises)
    with pytest.raises(ValueError, match="image_len=32"):
        with recorder.capture(token_mask, image_len=32):
            pass
    with pytest.raises(ValueError, match="token_mask has 3 rows"):
        with recorder.capture(token_mask.expand(3, -1)):
            run(pipe, source_image, noises)
    assert recorder.active_capture is None

    dim = 32
    double = pipe.transformer.transformer_blocks[1].attn
    single = pipe.transformer.single_transformer_blocks[1].attn
    with torch.no_grad(), recorder.capture(token_mask, text_len=TINY_TEXT_LEN) as cap:
        with pytest.raises(ValueError, match="got 8 text tokens"):
            double(hidden_states=torch.randn(1, 2 * N_IMG, dim), encoder_hidden_states=torch.randn(1, 8, dim))
        with pytest.raises(ValueError, match="shorter than"):
            single(hidden_states=torch.randn(1, TINY_TEXT_LEN + N_IMG - 1, dim))
        single(hidden_states=torch.randn(1, TINY_TEXT_LEN + 2 * N_IMG, dim))
    assert cap.num_calls == 1 and cap.layers == [3]
    with torch.no_grad(), recorder.capture(token_mask) as cap:
        with pytest.raises(ValueError, match="text_len is unknown"):
            single(hidden_states=torch.randn(1, TINY_TEXT_LEN + 2 * N_IMG, dim))
        # a double-stream call reads the text length from encoder_hidden_states
        double(hidden_states=torch.randn(1, 2 * N_IMG, dim), encoder_hidden_states=torch.randn(1, 5, dim))
    assert cap.num_calls == 1 and cap.layers == [1]


def test_grad_and_attention_mask_calls_run_stock_unrecorded(pipe, token_mask, recorder):
    attn = pipe.transformer.single_transformer_blocks[1].attn
    seq = TINY_TEXT_LEN + 2 * N_IMG
    x = torch.randn(1, seq, 32, generator=torch.Generator().manual_seed(5))
    stock = FluxAttnProcessor()
    with recorder.capture(token_mask, text_len=TINY_TEXT_LEN) as cap:
        with torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            out = attn(hidden_states=xg)
            assert torch.equal(out, stock(attn, xg))
            out.square().sum().backward()
            assert xg.grad is not None and torch.isfinite(xg.grad).all()
            attn.to_q.weight.requires_grad_(True)  # a trainable parameter (as with LoRA) needs grad too
            try:
                out = attn(hidden_states=x)
                assert out.requires_grad and torch.equal(out.detach(), stock(attn, x).detach())
            finally:
                attn.to_q.weight.requires_grad_(False)
        assert cap.skipped["grad"] == 2 and cap.num_calls == 0
        with pytest.raises(RuntimeError, match="recorded no attention calls"):
            cap.reward()

        mask = torch.zeros(1, 1, seq, seq)
        mask[..., -5:] = float("-inf")
        with torch.no_grad(), pytest.warns(UserWarning, match="attention_mask"):
            out = attn(hidden_states=x, attention_mask=mask)
        assert torch.equal(out, stock(attn, x, attention_mask=mask))
        assert cap.skipped["attention_mask"] == 1 and cap.num_calls == 0

        with torch.enable_grad():  # grad enabled but nothing requires grad: recorded
            out = attn(hidden_states=x)
        torch.testing.assert_close(out, stock(attn, x), atol=1e-5, rtol=1e-5)
        assert cap.num_calls == 1 and cap.num_skipped == 3
    assert cap.mass.shape == (1, 1, N_IMG)


# ------------------------------------------------------------------------------------------
# attach / detach
# ------------------------------------------------------------------------------------------
def test_attach_twice_and_detach_errors(pipe, token_mask):
    transformer = pipe.transformer
    rec = attach_acd(transformer, last_k=2, backend="torch")
    try:
        assert isinstance(rec, ACDRecorder) and rec.layer_indices == [2, 3]
        assert rec.layer_names == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
        with pytest.raises(RuntimeError, match="already attached"):
            attach_acd(transformer, last_k=2)
        with rec.capture(token_mask):
            with pytest.raises(RuntimeError, match="do not nest"):
                with rec.capture(token_mask):
                    pass
            with pytest.raises(RuntimeError, match="still open"):
                detach_acd(transformer)
    finally:
        detach_acd(transformer)
    with pytest.raises(RuntimeError, match="not attached"):
        detach_acd(transformer)
    with pytest.raises(RuntimeError, match="detached"):
        with rec.capture(token_mask):
            pass
    with pytest.raises(ValueError, match="last_k"):
        attach_acd(transformer, last_k=0)

    with pytest.warns(UserWarning, match="only 4 attention modules"):
        rec = attach_acd(transformer)  # default last_k=10 > 4: all of them
    try:
        assert rec.layer_indices == [0, 1, 2, 3]
    finally:
        detach_acd(transformer)

    class Custom(FluxAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    attn = transformer.single_transformer_blocks[1].attn
    original = attn.processor
    attn.set_processor(Custom())
    try:
        with pytest.raises(TypeError, match="Custom"):
            attach_acd(transformer, last_k=1)
        assert isinstance(attn.processor, Custom) and not hasattr(transformer, "_rcgrpo_acd_recorder")
    finally:
        attn.set_processor(original)


# ------------------------------------------------------------------------------------------
# heatmap
# ------------------------------------------------------------------------------------------
def test_heatmap_writes_png_of_image_size(pipe, source_image, noises, token_mask, recorder, tmp_path):
    with recorder.capture(token_mask) as cap:
        run(pipe, source_image, noises)
    path = recorder.heatmap(source_image, tmp_path / "maps" / "acd.png", capture=cap)
    assert sorted(os.listdir(tmp_path / "maps")) == ["acd.png"]  # no temp file left behind
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
        pixels = np.asarray(im)
    assert not np.array_equal(pixels, np.asarray(source_image))
    # the edit region (token rows 2..4, cols 3..6 -> pixels 8..19, 12..27) is outlined in white
    assert (pixels[8, 12:28] == 255).all() and (pixels[8:20, 12] == 255).all()
    assert not (pixels[0, :] == 255).all(axis=-1).all()

    one = recorder.heatmap(source_image, tmp_path / "one.png", capture=cap, calls=0, index=1)
    many = recorder.heatmap(source_image, tmp_path / "last.png", capture=cap, calls=[4, 5])
    assert one.exists() and many.exists()
    assert not np.array_equal(np.asarray(Image.open(one)), np.asarray(Image.open(many)))


def test_heatmap_non_square_tensor_image(tmp_path):
    image = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))
    mass = torch.arange(12, dtype=torch.float32)
    pixel_mask = torch.zeros(48, 64)
    pixel_mask[10:30, 20:40] = 1
    path = save_acd_heatmap(image, tmp_path / "wide.png", mass, mask=pixel_mask)  # grid 3x4 inferred
    with Image.open(path) as im:
        assert im.size == (64, 48)
        pixels = np.asarray(im)
    assert (pixels[10, 20:40] == 255).all()
    explicit = save_acd_heatmap(image, tmp_path / "explicit.png", mass, grid=(3, 4))
    with Image.open(explicit) as im:
        assert im.size == (64, 48)
    with pytest.raises(ValueError, match="grid"):
        save_acd_heatmap(image, tmp_path / "bad.png", mass, grid=(5, 5))
    with pytest.raises(ValueError, match="token grid"):
        save_acd_heatmap(image, tmp_path / "bad.png", torch.rand(7))
    assert not (tmp_path / "bad.png").exists()

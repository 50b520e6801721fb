"""Reward functions: hand-computed background metrics, CLIP crop paths with a tiny random CLIP,
composition and validation."""
import math

import numpy as np
import pytest
import torch

from rcgrpo import rewards as R
from rcgrpo.rewards import (
    ClipEncoder,
    ClipLocalImageReward,
    ClipLocalTextReward,
    WeightedReward,
    WeightsUnavailableError,
    background_psnr,
    background_ssim,
    check_reward_output,
    clip_preprocess,
    crop_to_bbox,
    mask_bbox,
    resolve_reward,
)


def _batch(b=2, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sources = 0.2 + 0.6 * torch.rand(b, 3, h, w, generator=g)
    masks = torch.zeros(b, 1, h, w)
    masks[:, :, :, : w // 2] = 1.0  # left half is the edit region
    return sources, masks


# ---------------------------------------------------------------------------------------------------
# background PSNR / SSIM


def test_psnr_constant_offset_matches_hand_computed_value():
    sources, masks = _batch()
    edited = sources + 0.1
    # masked half zeroed in both: the squared error 0.01 covers half of the values
    expected = 10 * math.log10(1 / (0.01 * 0.5))
    got = background_psnr(edited, sources, masks, ["x", "y"], [{}, {}])
    assert got.dtype == torch.float32 and got.shape == (2,)
    assert torch.allclose(got, torch.full((2,), expected), atol=1e-3)


def test_psnr_soft_mask_weights_pixels():
    sources, _ = _batch(b=1)
    masks = torch.full((1, 1, 32, 32), 0.5)
    got = background_psnr(sources + 0.1, sources, masks, ["x"], [{}])
    assert got.item() == pytest.approx(10 * math.log10(1 / 0.05**2), abs=1e-3)


def test_change_inside_mask_only_gives_the_cap_and_ssim_one():
    sources, masks = _batch()
    edited = sources.clone()
    edited[:, :, :, :16] = torch.rand_like(edited[:, :, :, :16])  # only the edit region changes
    psnr = background_psnr(edited, sources, masks, ["a", "b"], [{}, {}])
    assert torch.equal(psnr, torch.full((2,), R.PSNR_CAP_DB))
    assert torch.isfinite(psnr).all()
    ssim = background_ssim(edited, sources, masks, ["a", "b"], [{}, {}])
    assert torch.allclose(ssim, torch.ones(2), atol=1e-6)
    # one background pixel changes: finite PSNR below the cap, SSIM below 1
    edited[0, :, 5, 20] += 0.3
    psnr = background_psnr(edited, sources, masks, ["a", "b"], [{}, {}])
    assert psnr[0] < 60 and psnr[1] == R.PSNR_CAP_DB
    assert background_ssim(edited, sources, masks, ["a", "b"], [{}, {}])[0] < 1 - 1e-4
    assert background_psnr(edited, sources, masks, None, None, cap_db=50.0)[1] == 50.0


def test_ssim_identity_is_one_and_decreases_with_noise():
    sources, masks = _batch()
    assert torch.allclose(background_ssim(sources, sources, masks, ["a", "b"], [{}, {}]), torch.ones(2), atol=1e-6)
    noisy = (sources + 0.2 * torch.randn_like(sources)).clamp(0, 1)
    ssim = background_ssim(noisy, sources, masks, ["a", "b"], [{}, {}])
    assert (ssim < 0.9).all() and (ssim > -1).all()


def test_reward_inputs_are_validated():
    sources, masks = _batch()
    with pytest.raises(ValueError, match="masks"):
        background_psnr(sources, sources, masks[:, :, :16], ["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match="instructions"):
        background_psnr(sources, sources, masks, ["a"], [{}, {}])
    with pytest.raises(ValueError, match="sources"):
        background_ssim(sources, sources[:1], masks, ["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match="edited"):
        background_psnr(sources[:, :1], sources, masks, ["a", "b"], [{}, {}])


# ---------------------------------------------------------------------------------------------------
# validation and composition


def test_check_reward_output_errors_name_the_reward():
    assert check_reward_output(torch.tensor([1.0, 2.0], dtype=torch.float64), 2, "r").dtype == torch.float32
    with pytest.raises(ValueError, match=r"'short'.*shape \(1,\).*\[2\]"):
        check_reward_output(torch.tensor([1.0]), 2, "short")
    with pytest.raises(ValueError, match=r"'ints'.*dtype"):
        check_reward_output(torch.tensor([1, 2]), 2, "ints")
    with pytest.raises(ValueError, match=r"'nan'.*non-finite.*\[1\]"):
        check_reward_output(torch.tensor([1.0, float("nan")]), 2, "nan")
    with pytest.raises(ValueError, match=r"'inf'.*non-finite"):
        check_reward_output(torch.tensor([float("inf"), 0.0]), 2, "inf")
    with pytest.raises(ValueError, match=r"'list'.*list"):
        check_reward_output([1.0, 2.0], 2, "list")
    with pytest.raises(ValueError, match="shape"):
        check_reward_output(torch.zeros(2, 1), 2, "2d")


def test_weighted_reward_sums_and_keeps_components():
    sources, masks = _batch()
    edited = sources + 0.1

    def brightness(e, s, m, i, md):
        return e.mean(dim=(1, 2, 3))

    combo = WeightedReward([(background_psnr, 0.5), (brightness, 2.0), ("background_ssim", 1.0), (brightness, -1.0)])
    total = combo(edited, sources, masks, ["a", "b"], [{}, {}])
    parts = combo.components
    assert list(parts) == ["background_psnr", "brightness", "background_ssim", "brightness_2"]
    expected = 0.5 * parts["background_psnr"] + 2.0 * parts["brightness"] + parts["background_ssim"] - parts["brightness_2"]
    assert torch.allclose(total, expected)
    assert torch.allclose(parts["brightness"], edited.mean(dim=(1, 2, 3)))
    assert combo.weights["brightness_2"] == -1.0
    assert set(combo.compute_all(edited, sources, masks, ["a", "b"], [{}, {}])) == set(parts)


def test_weighted_reward_reports_the_bad_function():
    sources, masks = _batch()

    def broken(e, s, m, i, md):
        return torch.tensor([1.0, float("nan")])

    combo = WeightedReward([(background_psnr, 1.0), (broken, 1.0)])
    with pytest.raises(ValueError, match="'broken'.*non-finite"):
        combo(sources, sources, masks, ["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match="pair"):
        WeightedReward([background_psnr])
    with pytest.raises(ValueError, match="weight"):
        WeightedReward([(background_psnr, "heavy")])
    with pytest.raises(ValueError, match="at least one"):
        WeightedReward([])


def test_resolve_reward():
    assert resolve_reward("background_psnr") is background_psnr
    assert resolve_reward("background_ssim") is background_ssim
    capped = resolve_reward("background_psnr", cap_db=40.0)
    sources, masks = _batch()
    assert torch.equal(capped(sources, sources, masks, ["a", "b"], [{}, {}]), torch.full((2,), 40.0))
    fn = lambda *a: torch.zeros(2)  # noqa: E731
    assert resolve_reward(fn) is fn
    assert resolve_reward("rcgrpo.rewards:background_ssim") is background_ssim
    client = resolve_reward("editscore", url="http://127.0.0.1:9", retries=0)
    assert isinstance(client, R.EditScoreClient) and client.score_url == "http://127.0.0.1:9/score"
    with pytest.raises(ValueError, match="url"):
        resolve_reward("editscore")
    with pytest.raises(ValueError, match="unknown reward 'psnr'"):
        resolve_reward("psnr")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_reward("no_such_module_xyz:f")


# ---------------------------------------------------------------------------------------------------
# crops and CLIP


def test_mask_bbox_and_crop():
    mask = torch.zeros(1, 20, 30)
    mask[0, 3:8, 5:11] = 1.0
    mask[0, 6, 12] = 0.2  # soft pixel counts (> 0)
    assert mask_bbox(mask) == (3, 5, 8, 13)
    assert mask_bbox(mask, threshold=0.5) == (3, 5, 8, 11)
    assert mask_bbox(torch.zeros(4, 4)) is None
    img = torch.arange(3 * 20 * 30, dtype=torch.float32).reshape(3, 20, 30)
    assert torch.equal(crop_to_bbox(img, (3, 5, 8, 11)), img[:, 3:8, 5:11])
    with pytest.raises(ValueError):
        mask_bbox(torch.zeros(2, 4, 4))


def test_clip_preprocess_resize_crop_normalize():
    flat = torch.full((3, 20, 40), 0.5)
    out = clip_preprocess([flat], size=16)
    assert out.shape == (1, 3, 16, 16)
    expected = (0.5 - torch.tensor(R.CLIP_MEAN)) / torch.tensor(R.CLIP_STD)
    assert torch.allclose(out[0, :, 8, 8], expected, atol=1e-5)
    # a non-square image is resized by its short side, then center-cropped: the left/right columns go
    img = torch.zeros(3, 16, 32)
    img[:, :, 8:24] = 1.0
    out = clip_preprocess([img], size=16, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.allclose(out, torch.ones(1, 3, 16, 16))
    with pytest.raises(ValueError, match="image 0"):
        clip_preprocess([torch.zeros(1, 8, 8)], size=16)


def tiny_clip(seed=0):
    from transformers import CLIPConfig, CLIPModel

    from rcgrpo.testing import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    return CLIPModel(cfg).eval(), tok


@pytest.fixture(scope="module")
def clip_parts():
    return tiny_clip()


def _edit_batch():
    g = torch.Generator().manual_seed(1)
    edited = torch.rand(2, 3, 40, 48, generator=g)
    masks = torch.zeros(2, 1, 40, 48)
    masks[0, :, 4:20, 10:30] = 1.0
    masks[1, :, 25:39, 2:12] = 1.0
    return edited, masks


def test_clip_lct_embeds_the_mask_crop(clip_parts):
    model, tok = clip_parts
    reward = ClipLocalTextReward(model, tokenizer=tok)
    assert reward.encoder.image_size == 32
    edited, masks = _edit_batch()
    meta = [{"caption": "a red square"}, {}]  # the second falls back to its instruction
    got = reward(edited, None, masks, ["make it red", "add a dog"], meta)
    enc = reward.encoder
    img = enc.image_embeddings([edited[0, :, 4:20, 10:30], edited[1, :, 25:39, 2:12]])
    txt = enc.text_embeddings(["a red square", "add a dog"])
    assert got.shape == (2,) and got.dtype == torch.float32
    assert torch.allclose(got, (img * txt).sum(-1), atol=1e-6)
    # pixels outside the box do not matter, pixels inside do
    outside = edited.clone()
    outside[0, :, 30:, :] = 0.0
    assert torch.allclose(reward(outside, None, masks, ["make it red", "add a dog"], meta), got, atol=1e-6)
    inside = edited.clone()
    inside[0, :, 4:20, 10:30] = 1.0 - inside[0, :, 4:20, 10:30]
    assert not torch.allclose(reward(inside, None, masks, ["make it red", "add a dog"], meta)[0], got[0])
    score = ClipLocalTextReward(enc, score="clipscore")(edited, None, masks, ["make it red", "add a dog"], meta)
    assert torch.allclose(score, (100 * got).clamp_min(0), atol=1e-4)


def test_clip_lci_compares_crops_with_the_reference(clip_parts, tmp_path):
    from PIL import Image

    model, tok = clip_parts
    reward = ClipLocalImageReward(model, tokenizer=tok)
    edited, masks = _edit_batch()
    same = reward(edited, None, masks, ["a", "b"], [{"reference": edited[0]}, {"reference": edited[1]}])
    assert torch.allclose(same, torch.ones(2), atol=1e-5)
    ref = torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(5))
    ref_outside = ref.clone()
    ref_outside[:, :, 40:] = 0.0  # columns ≥ 40 lie outside example 1's box (columns 2..11)
    arr = (ref.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "ref.png")
    ref_q = torch.from_numpy(arr.astype(np.float32) / 255).permute(2, 0, 1)
    got = reward(edited, None, masks, ["a", "b"], [{"reference": str(tmp_path / "ref.png")}, {"reference": ref_outside}])
    enc = reward.encoder
    a = enc.image_embeddings([edited[0, :, 4:20, 10:30]])
    b = enc.image_embeddings([ref_q[:, 4:20, 10:30]])
    assert got[0].item() == pytest.approx((a * b).sum().item(), abs=1e-5)
    a1 = enc.image_embeddings([edited[1, :, 25:39, 2:12]])
    b1 = enc.image_embeddings([ref[:, 25:39, 2:12]])
    assert got[1].item() == pytest.approx((a1 * b1).sum().item(), abs=1e-5)
    with pytest.raises(ValueError, match=r"metadata\[1\].*reference"):
        reward(edited, None, masks, ["a", "b"], [{"reference": ref}, {}])
    empty = masks.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="example 1.*empty"):
        reward(edited, None, empty, ["a", "b"], [{"reference": ref}, {"reference": ref}])


def test_processor_object_sets_preprocessing(clip_parts):
    model, tok = clip_parts

    class ImageProc:
        crop_size = {"height": 24, "width": 24}
        image_mean = (0.5, 0.5, 0.5)
        image_std = (0.5, 0.5, 0.5)

    class Proc:
        tokenizer = tok
        image_processor = ImageProc()

    enc = ClipEncoder(model, Proc())
    assert enc.image_size == 24 and enc.mean == (0.5, 0.5, 0.5) and enc.tokenizer is tok
    emb = enc.text_embeddings(["a cat"])
    assert emb.shape == (1, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(1))


def test_clip_loads_from_a_local_directory_and_explains_missing_weights(clip_parts, tmp_path):
    model, tok = clip_parts
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    enc = ClipEncoder(str(tmp_path / "clip"))
    ref = ClipEncoder(model, tokenizer=tok)
    img = torch.rand(3, 32, 32)
    assert torch.allclose(enc.image_embeddings([img]), ref.image_embeddings([img]), atol=1e-6)
    assert torch.allclose(enc.text_embeddings(["a dog"]), ref.text_embeddings(["a dog"]), atol=1e-6)
    with pytest.raises(WeightsUnavailableError, match=r"no-such-org/no-such-clip.*local path"):
        ClipLocalTextReward("no-such-org/no-such-clip", local_files_only=True)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        ClipLocalImageReward(str(tmp_path / "missing" / "clip"))

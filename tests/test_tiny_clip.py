"""The tiny MiniBench CLIP: tokenizer, shipped weights, held-out ranking and LC-T, reproducible training."""
import math

import pytest
import torch
import torch.nn.functional as F

from rcgrpo.io import hub
from rcgrpo.io.hub import SHIPPED_MODELS, WeightsUnavailableError, load_pretrained
from rcgrpo.minibench.clip import (
    TINY_CLIP_PATH,
    TinyClipConfig,
    all_captions,
    clip_tokenizer,
    contrastive_loss,
    eval_crop,
    heldout_scores,
    native_crop,
    tiny_clip,
    train_tiny_clip,
)
from rcgrpo.minibench.tasks import TASKS, VOCABULARY, MiniBenchDataset
from rcgrpo.rewards.clip import ClipEncoder, ClipLocalTextReward

TEXTS = all_captions() + ["replace the green triangle with a yellow cross", "add an orange circle in the top left",
                          "A Pink   Star!", "remove the blue square"]


@pytest.fixture(scope="module")
def shipped():
    return ClipEncoder("tiny-clip", local_files_only=True)


@pytest.fixture(scope="module")
def scores(shipped):
    return heldout_scores(shipped, per_task=20, seed=0, sizes=(32, 64))


def test_every_minibench_word_is_one_token_and_the_merges_are_deterministic():
    tok = clip_tokenizer()
    for word in VOCABULARY:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert tok("a red circle")["input_ids"] == [0, *(tok.convert_tokens_to_ids(w + "</w>") for w in ("a", "red", "circle")), 1]
    assert tok.get_vocab() == clip_tokenizer().get_vocab()
    assert len(tok("a pink star", add_special_tokens=False)["input_ids"]) > 3  # unknown words: characters


def test_shipped_folder_round_trips_offline():
    from transformers import AutoTokenizer, CLIPModel

    files = {p.name for p in TINY_CLIP_PATH.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= files
    assert (TINY_CLIP_PATH / "model.safetensors").stat().st_size < 2.2e6
    assert SHIPPED_MODELS["tiny-clip"] == TINY_CLIP_PATH
    saved_tok = AutoTokenizer.from_pretrained(TINY_CLIP_PATH, local_files_only=True)
    code_tok = clip_tokenizer()
    assert saved_tok(TEXTS, padding=True)["input_ids"] == code_tok(TEXTS, padding=True)["input_ids"]
    model = CLIPModel.from_pretrained(TINY_CLIP_PATH, local_files_only=True).eval()
    ref = tiny_clip().model
    enc = code_tok(TEXTS, padding=True, return_tensors="pt")
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
        b = ref(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
    assert torch.equal(a.logits_per_image, b.logits_per_image) and torch.isfinite(a.logits_per_image).all()


def test_clip_encoder_by_name_matches_tiny_clip(shipped):
    ref = tiny_clip()
    assert shipped.image_size == ref.image_size == 32  # read from preprocessor_config.json
    assert shipped.mean == ref.mean and shipped.std == ref.std
    examples = MiniBenchDataset(6, split="heldout", seed=3, size=64)
    crops = [eval_crop(e.target, e.mask) for e in examples] + [native_crop(e.image, e.mask) for e in examples]
    torch.testing.assert_close(shipped.image_embeddings(crops), ref.image_embeddings(crops), rtol=0, atol=1e-6)
    torch.testing.assert_close(shipped.text_embeddings(TEXTS), ref.text_embeddings(TEXTS), rtol=0, atol=1e-6)
    # the trainer's LC-T reward takes the name too
    reward = ClipLocalTextReward("tiny-clip", local_files_only=True)
    batch = torch.stack([e.target for e in examples])
    masks = torch.stack([e.mask for e in examples])[:, None]
    lct = reward(batch, None, masks, [e.instruction for e in examples], [e.metadata for e in examples])
    assert lct.shape == (6,) and bool((lct > 0.3).all()), lct


def test_heldout_crops_rank_their_caption_first_far_above_chance(scores):
    print(f"\ntiny CLIP held-out top-1 {scores['top1']:.3f} (chance {scores['chance']:.3f}, n={scores['n']}), "
          f"by task {scores['top1_by_task']}")
    assert scores["n"] == 2 * 20 * len(TASKS) and scores["chance"] == pytest.approx(1 / 35)
    assert scores["top1"] >= 0.75
    assert scores["top1_by_task"]["add"] >= 0.8 and scores["top1_by_task"]["replace"] >= 0.8
    assert scores["top1_by_task"]["remove"] >= 10 * scores["chance"]


def test_lct_of_the_ground_truth_is_above_the_source_on_add_and_replace(scores):
    print(f"\nLC-T edit {scores['lct_edit']}, source {scores['lct_source']}, gap {scores['lct_gap_add_replace']:.1f}")
    for task in ("add", "replace"):
        assert scores["lct_edit"][task] > scores["lct_source"][task] + 10.0, (task, scores)
    assert scores["lct_gap_add_replace"] > 10.0


def test_contrastive_loss_is_symmetric_infonce():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    # distinct labels: the CLIP loss
    labels = torch.tensor([5, 0, 3, 1, 4, 2])
    logits = 10.0 * img @ txt[labels].t()
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6)))
    torch.testing.assert_close(contrastive_loss(img, txt, labels, scale), expected)
    # shared captions: image → text over the 2 captions; each caption's images share its target
    labels = torch.tensor([0, 1, 0, 0, 1, 1])
    t2 = txt[:2]
    logits = 10.0 * img @ t2.t()
    i2t = F.cross_entropy(logits, labels)
    logp = F.log_softmax(logits.t(), dim=1)
    t2i = -0.5 * (logp[0, labels == 0].mean() + logp[1, labels == 1].mean())
    torch.testing.assert_close(contrastive_loss(img, t2, labels, scale), 0.5 * (i2t + t2i))
    with pytest.raises(ValueError, match="distinct labels"):
        contrastive_loss(img, txt, labels, scale)


def test_training_is_reproducible_from_a_seed(tmp_path):
    small = dict(train_examples=12, steps=3, batch_size=16, warmup_steps=1, vision_layers=1, text_layers=1,
                 vision_width=16, text_width=16, projection_dim=16, heads=2, log_every=1)
    a = train_tiny_clip(TinyClipConfig(seed=1, output_dir=str(tmp_path / "a"), **small), log=None)
    b = train_tiny_clip(TinyClipConfig(seed=1, output_dir=str(tmp_path / "b"), **small), log=None)
    c = train_tiny_clip(TinyClipConfig(seed=2, output_dir=str(tmp_path / "c"), **small), log=None)
    from safetensors.torch import load_file

    wa, wb, wc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    enc = ClipEncoder(str(a), local_files_only=True)  # a trained folder loads by path like the shipped one
    assert enc.text_embeddings(["a red circle"]).shape == (1, 16)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        TinyClipConfig(image_size=30).validate()


def test_shipped_names_resolve_first_and_fail_clearly(monkeypatch, tmp_path):
    assert load_pretrained(lambda p, **kw: p, "tiny-clip", what="CLIP model") == str(TINY_CLIP_PATH)
    monkeypatch.setitem(hub.SHIPPED_MODELS, "tiny-clip", tmp_path / "gone")
    with pytest.raises(WeightsUnavailableError, match="shipped with rcgrpo"):
        ClipEncoder("tiny-clip")

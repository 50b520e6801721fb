"""`rcgrpo eval` against an independent re-implementation of CompBench's official `eval_all.py`.

The reference below follows the official script step by step with the libraries it calls: torchmetrics'
PSNR / SSIM / LPIPS / CLIPScore modules (LPIPS with torchmetrics' real network class and lin weights; its
torchvision SqueezeNet backbone replaced through torchmetrics' backbone factory by a seeded one with
torchvision's layers, since torchvision cannot be installed here), CLIPScore fed with transformers 4's
PIL image path (written here, and checked against transformers 5's `CLIPImageProcessorPil`), and a
tiny seeded CLIP built from a config. Data: the official layout with sources from 37×61 to 700×600,
rectangular, elliptic, soft, thin, 1-pixel and empty masks, masks, ground truths and outputs at sizes
other than the source's, long and empty captions, a missing mask, a missing edit and a missing ground
truth.
"""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from rcgrpo.cli.eval import parse_eval_args, run_eval
from rcgrpo.eval.clip_official import OfficialClip, PilClipPreprocessing
from rcgrpo.eval.evaluate import evaluate
from rcgrpo.eval.lpips import export_lpips_weights
from rcgrpo.rewards import PSNR_CAP_DB, ClipEncoder

TOL = {"LC-I": 1e-4, "LC-T": 1e-2, "PSNR": 1e-4, "SSIM": 1e-5, "LPIPS": 1e-5}
METRICS = ("LC-I", "LC-T", "PSNR", "SSIM", "LPIPS")
EVAL_SIZE = 128  # the official script's 512 is checked on one example below (the code is size-generic)
CLIP_SIZE = 48
LONG_CAPTION = "a small red square with a thin blue border sitting on a grey stone wall next to a green door " * 2


# ---------------------------------------------------------------------------------------------------
# transformers 4's CLIPImageProcessor (PIL backend), as the official run used it


def _infer_channels_first(arr):
    """transformers 4's infer_channel_dimension_format for (1, 3) channels: True = channel-first."""
    first, last = arr.shape[0] in (1, 3), arr.shape[-1] in (1, 3)
    if first:
        return True  # also when ambiguous (transformers 4 warns and assumes channel-first)
    if last:
        return False
    raise ValueError(f"unable to infer the channel axis of {arr.shape}")


class Transformers4ClipProcessor:
    """`processor(images=...)` / `processor(text=...)` as transformers 4's CLIPProcessor computes them."""

    def __init__(self, tokenizer, size, crop, mean, std):
        self.tokenizer, self.size, self.crop = tokenizer, size, crop
        self.mean, self.std = np.array(mean, dtype=np.float32), np.array(std, dtype=np.float32)
        self.quirks = []  # heights of PIL crops that transformers 4 would read channel-first

    def _pixels(self, hwc):
        h, w = hwc.shape[:2]
        if w <= h:
            new_w, new_h = self.size, int(self.size * h / w)
        else:
            new_h, new_w = self.size, int(self.size * w / h)
        resized = np.array(Image.fromarray(hwc).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
        top, left = (new_h - self.crop) // 2, (new_w - self.crop) // 2
        cropped = resized[top:top + self.crop, left:left + self.crop, :]
        scaled = (cropped.astype(np.float64) * (1 / 255)).astype(np.float32)
        return ((scaled - self.mean) / self.std).transpose(2, 0, 1)

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True):
        if text is not None:
            return self.tokenizer(text, return_tensors=return_tensors, padding=padding)
        arrays = [np.array(im) if isinstance(im, Image.Image) else im.numpy() for im in images]
        channels_first = _infer_channels_first(arrays[0])  # from the first image, for all
        out = []
        for arr, im in zip(arrays, images):
            if isinstance(im, Image.Image) and channels_first:
                self.quirks.append(arr.shape[0])  # HWC read as CHW: the official quirk, scored as an image here
                hwc = arr
            else:
                hwc = np.moveaxis(arr, 0, -1) if channels_first else arr
            out.append(self._pixels(np.ascontiguousarray(hwc)))
        return {"pixel_values": torch.from_numpy(np.stack(out))}


class Transformers4Clip(nn.Module):
    """transformers 5's CLIPModel with transformers 4's `get_*_features` (tensors, as torchmetrics wants)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values=None, **kwargs):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids=None, attention_mask=None, **kwargs):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


# ---------------------------------------------------------------------------------------------------
# the official eval_all.py, re-implemented


class OfficialEvaluator:
    def __init__(self, clip_model, processor, lpips_metric):
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
        from torchmetrics.multimodal import CLIPScore

        self.processor = processor
        self.clip = Transformers4Clip(clip_model)
        self.clip_score = CLIPScore(model_name_or_path=lambda: (self.clip, processor))
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.lpips = lpips_metric

    @staticmethod
    def load(path, mode, resample, size):
        try:
            return Image.open(path).convert(mode).resize((size, size), resample=resample)
        except Exception:  # noqa: BLE001 - the official script returns None for any failure
            return None

    @torch.no_grad()
    def metrics(self, ori, edited, mask, gt, captions):
        def to_tensor(img):
            return torch.tensor(np.array(img).astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)

        bg = torch.tensor(1 - np.array(mask, dtype=np.float32) / 255.0).unsqueeze(0).unsqueeze(0)
        bg_ori, bg_edited = to_tensor(ori) * bg, to_tensor(edited) * bg
        res = {"PSNR": self.psnr(bg_edited, bg_ori).item(), "SSIM": self.ssim(bg_edited, bg_ori).item(),
               "LPIPS": self.lpips(bg_edited * 2 - 1, bg_ori * 2 - 1).item()}
        ys, xs = np.where(np.array(mask) > 0)
        if len(ys) and xs.max() > xs.min() and ys.max() > ys.min():
            box = (xs.min(), ys.min(), xs.max(), ys.max())
            crop = edited.crop(box)
            crop_t = torch.tensor(np.array(crop)).permute(2, 0, 1)
            res["LC-T"] = float(np.mean([self.clip_score(crop_t, cap).item() for cap in captions]))
            if gt is not None:
                inputs = self.processor(images=[crop, gt.crop(box)])
                feats = self.clip.get_image_features(**inputs)
                res["LC-I"] = F.cosine_similarity(feats[0].unsqueeze(0), feats[1].unsqueeze(0)).item()
            else:
                res["LC-I"] = float("nan")
        else:
            res["LC-T"] = res["LC-I"] = 0.0
        return res

    def run(self, tasks_root, results_dir, size, tasks=("add", "remove", "replace")):
        """{example id: metrics} and the list of skipped ids, as eval_all.py's local-editing loop."""
        out, skipped = {}, []
        for task in tasks:
            items = json.loads((tasks_root / task / "metadata.json").read_text())
            for item in items:
                name = item.get("image_path") or item.get("image_name")
                captions = [item["caption"]] if item.get("caption") else [" "]
                ori = self.load(tasks_root / task / "input_image" / name, "RGB", Image.Resampling.BICUBIC, size)
                edited = self.load(results_dir / task / name, "RGB", Image.Resampling.BICUBIC, size)
                mask = self.load(tasks_root / task / "mask" / name, "L", Image.Resampling.NEAREST, size)
                gt = self.load(tasks_root / task / "edited_image" / name, "RGB", Image.Resampling.BICUBIC, size)
                if ori is None or edited is None or mask is None:
                    skipped.append(f"{task}/{name}")
                    continue
                out[f"{task}/{name}"] = self.metrics(ori, edited, mask, gt, captions)
        return out, skipped


def official_aggregates(rows, resume):
    """Task means rounded to 3 decimals (resume: per-image values rounded first) and their macro average."""
    per_task = {}
    for task in ("add", "remove", "replace"):
        vals = {m: [r[m] for k, r in rows.items() if k.startswith(task + "/") and not np.isnan(r[m])] for m in METRICS}
        if resume:
            vals = {m: [round(v, 3) for v in vs] for m, vs in vals.items()}
        per_task[task] = {m: round(float(np.mean(vs)), 3) for m, vs in vals.items()}
    avg = {m: round(float(np.mean([per_task[t][m] for t in per_task])), 3) for m in METRICS}
    return per_task, avg


# ---------------------------------------------------------------------------------------------------
# synthetic CompBench data in the official layout


def _mask(kind, w, h):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    if kind == "rect":
        m = ((x >= w * 0.2) & (x < w * 0.7) & (y >= h * 0.3) & (y < h * 0.8)) * 255.0
    elif kind == "ellipse":
        m = ((((x - w * 0.55) / (w * 0.3)) ** 2 + ((y - h * 0.45) / (h * 0.25)) ** 2) <= 1) * 255.0
    elif kind == "soft":
        m = 255.0 * np.exp(-(((x - w * 0.4) / (w * 0.15)) ** 2 + ((y - h * 0.6) / (h * 0.2)) ** 2))
    elif kind == "thin":  # 2 source rows: a crop of 1-3 rows at the evaluation size
        m = np.zeros((h, w))
        m[h // 2:h // 2 + 2, w // 5:w - w // 5] = 255.0
    elif kind == "band":  # 4 rows: a 3-pixel-tall crop when the evaluation size is the source's
        m = np.zeros((h, w))
        m[h // 2:h // 2 + 4, w // 4:w - w // 4] = 255.0
    elif kind == "pixel":
        m = np.zeros((h, w))
        m[h // 3, w // 2] = 255.0
    elif kind == "empty":
        m = np.zeros((h, w))
    return np.clip(m, 0, 255).round().astype(np.uint8)


def _image(rng, w, h):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = rng.uniform(30, 220, 3) + 40 * np.sin(x[..., None] / rng.uniform(3, 12) + rng.uniform(0, 6, 3))
    base += 30 * np.cos(y[..., None] / rng.uniform(4, 15))
    return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).round().astype(np.uint8)


def _edit(rng, src, mask, size):
    """An "edit" at `size` (W, H): the source resized, changed strongly inside the mask, a little outside."""
    img = np.asarray(Image.fromarray(src).resize(size, Image.Resampling.BILINEAR)).astype(np.float64)
    m = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.BILINEAR)).astype(np.float64)[..., None] / 255
    changed = img * (1 - m) + (255 - img) * m + rng.normal(0, 3, img.shape)
    return np.clip(changed, 0, 255).round().astype(np.uint8)


# (task, source W×H, mask kind, mask size or None, ground-truth size or None ("missing"), output size or None, caption)
EXAMPLES = [
    ("add", (37, 61), "rect", None, None, (64, 64), "a red square"),
    ("add", (700, 600), "ellipse", None, None, (350, 300), "a blue disc"),
    ("add", (128, 96), "soft", None, None, None, LONG_CAPTION),
    ("add", (61, 37), "pixel", None, None, (32, 32), ""),
    ("add", (90, 70), "rect", "missing", None, None, "a cat"),
    ("remove", (200, 300), "rect", (100, 150), None, None, "an empty wall"),
    ("remove", (45, 45), "empty", None, None, None, "nothing"),
    ("remove", (300, 200), "ellipse", None, (150, 100), (600, 400), "grass"),
    ("remove", (64, 64), "rect", None, None, "missing", "sky"),
    ("remove", (80, 60), "rect", None, "missing", None, "a bench"),
    ("remove", (128, 128), "band", None, None, None, "a shelf"),
    ("replace", (96, 128), "soft", None, None, "identical", "a green door"),
    ("replace", (700, 600), "thin", None, None, (512, 512), "a wire"),
    ("replace", (50, 50), "pixel", None, None, None, "a dot"),
    ("replace", (160, 120), "rect", None, (200, 150), (77, 53), LONG_CAPTION),
]


def write_dataset(root):
    rng = np.random.default_rng(0)
    tasks, results = root / "tasks", root / "editing_results" / "m" / "m_local"
    metadata = {}
    for k, (task, (w, h), kind, mask_size, gt_size, out_size, caption) in enumerate(EXAMPLES):
        name = f"{k:04x}cafe/{k % 3}/{k:05d}.png"
        src = _image(rng, w, h)
        mask = _mask(kind, w, h)
        for folder, arr in (("input_image", src), ("mask", mask), ("edited_image", _edit(rng, src, mask, (w, h)))):
            if (folder == "mask" and mask_size == "missing") or (folder == "edited_image" and gt_size == "missing"):
                continue
            path = tasks / task / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(arr)
            size = mask_size if folder == "mask" else gt_size if folder == "edited_image" else None
            if size not in (None, "missing"):
                img = img.resize(size, Image.Resampling.NEAREST if folder == "mask" else Image.Resampling.BICUBIC)
            img.save(path)
        if out_size != "missing":
            path = results / task / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if out_size == "identical":
                shutil.copy(tasks / task / "input_image" / name, path)
            else:
                Image.fromarray(_edit(rng, src, mask, out_size or (w, h))).save(path)
        metadata.setdefault(task, []).append({"image_path": name, "instruction": f"edit {k}", "caption": caption})
    for task, items in metadata.items():
        (tasks / task / "metadata.json").write_text(json.dumps(items, indent=1))
    return tasks, results


# ---------------------------------------------------------------------------------------------------
# fixtures: tiny CLIP, torchmetrics' LPIPS with a seeded backbone


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared, loaded machine two spinning OpenMP threads run these convolutions
    up to 20× slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class _Fire(nn.Module):  # torchvision's SqueezeNet Fire module: same layer names
    def __init__(self, cin, squeeze, e1, e3):
        super().__init__()
        self.squeeze, self.squeeze_activation = nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=True)
        self.expand1x1, self.expand1x1_activation = nn.Conv2d(squeeze, e1, 1), nn.ReLU(inplace=True)
        self.expand3x3, self.expand3x3_activation = nn.Conv2d(squeeze, e3, 3, padding=1), nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1)


def seeded_squeezenet_features(net="squeezenet1_1", pretrained=False):
    """Stand-in for torchmetrics' `_get_tv_model_features`: torchvision's squeezenet1_1().features layout."""
    assert net == "squeezenet1_1"
    torch.manual_seed(1234)

    def pool():
        return nn.MaxPool2d(3, 2, ceil_mode=True)

    return nn.Sequential(nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(inplace=True), pool(),
                         _Fire(64, 16, 64, 64), _Fire(128, 16, 64, 64), pool(),
                         _Fire(128, 32, 128, 128), _Fire(256, 32, 128, 128), pool(),
                         _Fire(256, 48, 192, 192), _Fire(384, 48, 192, 192),
                         _Fire(384, 64, 256, 256), _Fire(512, 64, 256, 256))


@pytest.fixture(scope="module")
def torchmetrics_lpips():
    import torchmetrics.functional.image.lpips as tm_lpips
    import torchmetrics.image.lpip as tm_lpip

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tm_lpips, "_get_tv_model_features", seeded_squeezenet_features)
        mp.setattr(tm_lpip, "_TORCHVISION_AVAILABLE", True)
        metric = tm_lpip.LearnedPerceptualImagePatchSimilarity(net_type="squeeze")
    return metric


def tiny_clip_model(seed=0):
    from transformers import CLIPConfig, CLIPModel

    from rcgrpo.testing import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=CLIP_SIZE, patch_size=16),
        projection_dim=16)
    torch.manual_seed(seed)
    return CLIPModel(cfg).eval(), tok


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    model, tok = tiny_clip_model()
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    # the format of openai/clip-vit-large-patch14's preprocessor_config.json (ints, no rescale_factor)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": CLIP_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": CLIP_SIZE}))
    return path


@pytest.fixture(scope="module")
def reference_parts(clip_dir, torchmetrics_lpips):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    cfg = json.loads((clip_dir / "preprocessor_config.json").read_text())
    processor = Transformers4ClipProcessor(tok, cfg["size"], cfg["crop_size"], cfg["image_mean"], cfg["image_std"])
    return model, processor, torchmetrics_lpips


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("compbench"))


@pytest.fixture(scope="module")
def compared(bench, clip_dir, reference_parts, tmp_path_factory):
    """(reference rows, reference skipped, rcgrpo results, quirk heights) at EVAL_SIZE."""
    tasks, results_dir = bench
    model, processor, lpips_metric = reference_parts
    reference, ref_skipped = OfficialEvaluator(model, processor, lpips_metric).run(tasks, results_dir, EVAL_SIZE)
    tmp = tmp_path_factory.mktemp("eval")
    weights = export_lpips_weights(tmp / "lpips.safetensors", lpips_metric)
    out = tmp / "out"
    assert run_eval(parse_eval_args(["--data", str(tasks.parent), "--output-dir", str(out), "--outputs", str(results_dir),
                                     "--clip-model", str(clip_dir), "--lpips-weights", str(weights),
                                     "--eval-size", str(EVAL_SIZE), "--strict", "--skip-missing"])) == 0
    ours = json.loads((out / "results.json").read_text())
    return reference, ref_skipped, ours, list(processor.quirks), out


MEASURED = {}


def test_per_example_metrics_match_the_official_script(compared):
    reference, ref_skipped, ours, _, _ = compared
    rows = {r["id"]: r for r in ours["examples"]}
    assert sorted(rows) == sorted(reference) and len(rows) == len(EXAMPLES) - 2
    worst = {m: 0.0 for m in METRICS}
    for ex_id, ref in reference.items():
        for m in METRICS:
            got, want = rows[ex_id][m], ref[m]
            if isinstance(want, float) and math.isnan(want):
                assert got is None, (ex_id, m)  # LC-I without a ground truth: n/a, left out of the means
                continue
            if m == "PSNR" and math.isinf(want):
                assert got == PSNR_CAP_DB, ex_id  # the documented cap
                continue
            diff = abs(got - want)
            worst[m] = max(worst[m], diff)
            assert diff <= TOL[m], f"{ex_id} {m}: rcgrpo {got} vs official {want} (|Δ| {diff:.3g} > {TOL[m]})"
    MEASURED["per_example"] = worst
    print("max per-example |Δ|:", {m: f"{v:.2e}" for m, v in worst.items()})
    # the data exercised what it should: an infinite PSNR, a NaN LC-I, zero boxes, real crops
    assert any(math.isinf(r["PSNR"]) for r in reference.values())
    assert any(math.isnan(r["LC-I"]) for r in reference.values())
    assert sum(r["LC-T"] == 0.0 for r in reference.values()) >= 2
    assert sum(r["LC-I"] not in (0.0,) and not math.isnan(r["LC-I"]) for r in reference.values()) >= 6


def test_skipped_examples_are_listed_like_the_official_skips(compared):
    _, ref_skipped, ours, _, out = compared
    skipped = {s["id"]: s["reason"] for s in ours["skipped"]}
    assert sorted(skipped) == sorted(ref_skipped) and len(skipped) == 2
    assert any("mask missing" in r for r in skipped.values()) and any("edit missing" in r for r in skipped.values())
    md = (out / "results.md").read_text()
    assert f"2 of {len(EXAMPLES)} example(s) skipped" in md and all(f"`{i}`" in md for i in skipped)


def test_task_means_macro_average_and_official_rounding(compared):
    reference, _, ours, _, out = compared
    capped = {k: {m: (PSNR_CAP_DB if m == "PSNR" and math.isinf(v) else v) for m, v in r.items()} for k, r in reference.items()}
    worst = {m: 0.0 for m in METRICS}
    for task in ("add", "remove", "replace"):
        rows = [r for k, r in capped.items() if k.startswith(task + "/")]
        assert ours["per_task"][task]["count"] == len(rows)
        for m in METRICS:
            want = float(np.mean([r[m] for r in rows if not np.isnan(r[m])]))
            worst[m] = max(worst[m], abs(ours["per_task"][task][m] - want))
            assert ours["per_task"][task][m] == pytest.approx(want, abs=TOL[m])
    for m in METRICS:  # macro average over tasks, not over examples
        assert ours["average"][m] == pytest.approx(np.mean([ours["per_task"][t][m] for t in ("add", "remove", "replace")]), abs=1e-12)
    MEASURED["per_task"] = worst
    print("max per-task |Δ|:", {m: f"{v:.2e}" for m, v in worst.items()})
    for mode, resume in (("default", False), ("resume", True)):
        per_task, avg = official_aggregates(capped, resume)
        block = ours["official_rounding"][mode]
        for m in METRICS:
            for task in per_task:
                assert block["per_task"][task][m] == pytest.approx(per_task[task][m], abs=1.01e-3), (mode, task, m)
            assert block["average"][m] == pytest.approx(avg[m], abs=1.01e-3), (mode, m)
    # the official script keeps +inf: the replace task's PSNR mean would be inf there
    assert math.isinf(official_aggregates(reference, False)[0]["replace"]["PSNR"])
    md = (out / "results.md").read_text()
    assert "PSNR cap" in md and "1 example(s) capped" in md and "macro average over tasks" in md
    assert "--resume" in md and "| --resume | **Average** |" in md


def test_quirky_crops_are_noted(compared):
    _, _, ours, quirks, _ = compared
    noted = [n for n in ours["notes"] if "channel-first" in n["note"]]
    assert quirks, "the data should contain an LC-I crop 1 or 3 px tall"
    assert 2 * len(noted) == len(quirks)  # one note per example; the reference saw its 2 crops
    assert any("no ground-truth image" in n["note"] for n in ours["notes"])


def test_the_reference_preprocessing_is_transformers_pil_path(clip_dir, bench):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "CLIPImageProcessorPil"):
        pytest.skip("transformers < 5 has no CLIPImageProcessorPil")
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    cfg = json.loads((clip_dir / "preprocessor_config.json").read_text())
    hf = CLIPImageProcessorPil(size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE})
    ref = Transformers4ClipProcessor(AutoTokenizer.from_pretrained(clip_dir), cfg["size"], cfg["crop_size"],
                                     cfg["image_mean"], cfg["image_std"])
    ours = PilClipPreprocessing.from_config(cfg, default_size=CLIP_SIZE)
    rng = np.random.default_rng(3)
    for w, h in [(5, 9), (9, 5), (47, 100), (100, 47), (48, 48), (300, 7), (61, 37), (200, 333)]:
        crop = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = hf(images=[crop], return_tensors="pt")["pixel_values"][0].numpy()
        tensor_in = torch.from_numpy(np.array(crop)).permute(2, 0, 1)  # CLIPScore passes CHW uint8 tensors
        assert np.abs(ref(images=[tensor_in])["pixel_values"][0].numpy() - want).max() <= 1e-6, (w, h)
        assert np.abs(ours(crop) - want).max() <= 1e-6, (w, h)


def test_the_comparison_catches_the_old_differences(clip_dir):
    """The training-time path (torch resize with round(); truncation keeping the end token) is measurably
    off: the tolerances above would fail on it."""
    enc = ClipEncoder(str(clip_dir))
    official = OfficialClip.load(str(clip_dir))
    rng = np.random.default_rng(5)
    worst = 0.0
    for h, w in [(14, 23), (23, 14), (29, 90), (100, 61)]:  # 48·23/14 = 78.9: int() 78, round() 79
        a, b = (Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(2))
        ta, tb = (torch.from_numpy(np.asarray(c, dtype=np.float32) / 255).permute(2, 0, 1) for c in (a, b))
        train = enc.image_embeddings([ta, tb])
        worst = max(worst, abs(float((train[0] * train[1]).sum()) - official.lc_i(a, b)))
    assert worst > TOL["LC-I"]
    crop = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    assert len(enc.tokenizer([LONG_CAPTION], padding=True)["input_ids"][0]) > 77
    img = official._image_features([crop])
    img = img / img.norm(dim=-1, keepdim=True)
    truncated = max(100 * float((img * enc.text_embeddings([LONG_CAPTION])).sum()), 0.0)
    assert abs(truncated - official.lc_t(crop, [LONG_CAPTION])) > TOL["LC-T"]


def test_default_size_512_on_one_example(bench, clip_dir, reference_parts, tmp_path):
    """The official size end to end, on one example (the others run at 128; the code is size-generic)."""
    tasks, results_dir = bench
    model, processor, lpips_metric = reference_parts
    sub = tmp_path / "tasks"
    items = json.loads((tasks / "add" / "metadata.json").read_text())[:1]
    (sub / "add").mkdir(parents=True)
    (sub / "add" / "metadata.json").write_text(json.dumps(items))
    for folder in ("input_image", "mask", "edited_image"):
        shutil.copytree(tasks / "add" / folder, sub / "add" / folder)
    reference, _ = OfficialEvaluator(model, processor, lpips_metric).run(sub, results_dir, 512, tasks=("add",))
    weights = export_lpips_weights(tmp_path / "lpips.safetensors", lpips_metric)
    res = evaluate(tmp_path, tmp_path / "out", outputs_dir=results_dir, clip_model=str(clip_dir),
                   lpips_weights=str(weights), strict=True, log=None)
    assert res["settings"]["eval_size"] == 512 and len(res["examples"]) == 1
    row = res["examples"][0]
    for m in METRICS:
        assert abs(row[m] - reference[row["id"]][m]) <= TOL[m], (m, row[m], reference[row["id"]][m])

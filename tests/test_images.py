"""rcgrpo.io.images: images and masks as people have them (issue 19), property tests over sizes and values;
edit sizes that keep the aspect ratio; the labelled report figures."""
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from rcgrpo.io.images import (MaskWarning, file_has_alpha, fit_size, image_grid, load_image, load_mask, mask_warnings,
                              resize_image, resize_mask, save_image)

PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
sizes = st.tuples(st.integers(1, 24), st.integers(1, 24))  # (height, width)


def _arrays(dtype, high, shape_strategy=sizes, channels=None):
    def build(shape, seed):
        rng = np.random.default_rng(seed)
        full = shape if channels is None else (*shape, channels)
        return rng.integers(0, high + 1, size=full).astype(dtype)
    return st.builds(build, shape_strategy, st.integers(0, 2**31 - 1))


def _png_bytes(img, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_rgb16(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width`×`height` 8-bit gray pixels but holds (almost) no data: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
@PROPS
@given(arr=_arrays(np.uint8, 255, channels=3))
def test_8bit_rgb_is_divided_by_255(tmp_path, arr):
    path = _write(tmp_path, "rgb.png", _png_bytes(Image.fromarray(arr)))
    out = load_image(path)
    assert out.shape == (3, *arr.shape[:2]) and out.dtype == torch.float32
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), arr / 255.0, atol=1e-7)


@PROPS
@given(arr=_arrays(np.uint16, 65535))
def test_16bit_gray_image_is_divided_by_65535(tmp_path, arr):
    path = _write(tmp_path, "g16.png", _png_bytes(Image.fromarray(arr)))
    out = load_image(path)
    for c in range(3):
        np.testing.assert_allclose(out[c].numpy(), arr / 65535.0, atol=1e-7)


@PROPS
@given(arr=_arrays(np.uint16, 65535, channels=3))
def test_16bit_rgb_png_keeps_its_scale(tmp_path, arr):
    """Pillow reads 48-bit PNGs at 8 bits per channel: the scale is right to within one 8-bit step."""
    path = _write(tmp_path, "rgb16.png", png_rgb16(arr))
    out = load_image(path).permute(1, 2, 0).numpy()
    assert np.abs(out - arr / 65535.0).max() <= 1 / 255 + 1e-6


def test_32bit_integer_and_float_tiff(tmp_path):
    ints = (np.arange(20).reshape(4, 5) * 3000).astype(np.int32)
    Image.fromarray(ints).save(tmp_path / "i.tiff")
    np.testing.assert_allclose(load_image(tmp_path / "i.tiff")[0].numpy(), ints / 65535.0, atol=1e-7)
    big = ints * 100
    Image.fromarray(big).save(tmp_path / "big.tiff")
    with pytest.raises(ValueError, match=r"big.tiff.*\[0, 65535\]"):
        load_image(tmp_path / "big.tiff")
    floats = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    Image.fromarray(floats).save(tmp_path / "f.tiff")
    np.testing.assert_allclose(load_image(tmp_path / "f.tiff")[1].numpy(), floats, atol=1e-7)
    Image.fromarray(floats * 255).save(tmp_path / "f255.tiff")
    with pytest.raises(ValueError, match=r"f255.tiff.*\[0, 1\]"):
        load_image(tmp_path / "f255.tiff")


@PROPS
@given(idx=_arrays(np.uint8, 3), seed=st.integers(0, 1000), transparent=st.integers(0, 3))
def test_palette_with_transparency_composites_over_white(tmp_path, idx, seed, transparent):
    palette = np.random.default_rng(seed).integers(0, 256, size=(4, 3)).astype(np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette(palette.reshape(-1).tolist() + [0] * (768 - 12))
    path = _write(tmp_path, "p.png", _png_bytes(img, transparency=transparent))
    out = load_image(path).permute(1, 2, 0).numpy()
    expected = palette[idx] / 255.0
    expected[idx == transparent] = 1.0  # composited over white
    np.testing.assert_allclose(out, expected, atol=1e-6)
    dropped = load_image(path, background=None).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(dropped, palette[idx] / 255.0, atol=1e-6)


def test_rgba_is_composited_explicitly(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = [[255, 0], [128, 255]]
    path = _write(tmp_path, "a.png", _png_bytes(Image.fromarray(rgba, mode="RGBA")))
    white = load_image(path)
    assert white[:, 0, 1].tolist() == [1.0, 1.0, 1.0]  # fully transparent: the background
    assert white[0, 0, 0] == pytest.approx(200 / 255) and white[1, 0, 0] == 0.0
    black = load_image(path, background=(0.0, 0.0, 0.0))
    assert black[:, 0, 1].tolist() == [0.0, 0.0, 0.0]
    assert black[0, 1, 0] == pytest.approx(200 / 255 * 128 / 255, abs=1e-6)


EXIF_TO_NUMPY = {  # orientation tag -> what a viewer shows, as a numpy transform of the stored array
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),  # transverse
    8: lambda a: np.rot90(a, 1),
}


@PROPS
@given(arr=_arrays(np.uint8, 255, channels=3), orientation=st.integers(1, 8))
def test_exif_orientation_is_applied(tmp_path, arr, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _write(tmp_path, "o.png", _png_bytes(Image.fromarray(arr), exif=exif))
    out = (load_image(path).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(out, EXIF_TO_NUMPY[orientation](arr))
    with Image.open(path) as stored:  # and PIL's own transpose agrees
        np.testing.assert_array_equal(out, np.asarray(ImageOps.exif_transpose(stored)))
    if orientation >= 5:
        assert out.shape[:2] == arr.shape[:2][::-1]


def test_exif_orientation_applies_to_masks_too(tmp_path):
    mask = np.zeros((4, 6), np.uint8)
    mask[0, 5] = 255  # top right corner of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise
    path = _write(tmp_path, "m.png", _png_bytes(Image.fromarray(mask), exif=exif))
    out = load_mask(path)
    assert out.shape == (6, 4) and out[5, 3] == 1.0 and float(out.sum()) == 1.0


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------
@PROPS
@given(arr=_arrays(np.uint8, 1))
def test_01_mask_in_8bit_file_means_edit(tmp_path, arr):
    path = _write(tmp_path, "m01.png", _png_bytes(Image.fromarray(arr)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MaskWarning)  # a 0/1 mask is fine: no warning
        out = load_mask(path)
    np.testing.assert_array_equal(out.numpy(), arr.astype(np.float32))


@PROPS
@given(arr=_arrays(np.uint8, 1), bits16=st.booleans(), scale01=st.booleans())
def test_binary_masks_in_every_encoding(tmp_path, arr, bits16, scale01):
    """0/1, 0/255 and 0/65535 masks all load as 0/1."""
    full = 1 if scale01 else (65535 if bits16 else 255)
    stored = (arr.astype(np.uint16 if bits16 else np.uint8) * full).astype(np.uint16 if bits16 else np.uint8)
    path = _write(tmp_path, "m.png", _png_bytes(Image.fromarray(stored)))
    np.testing.assert_array_equal(load_mask(path).numpy(), arr.astype(np.float32))


@PROPS
@given(arr=_arrays(np.uint16, 65535))
def test_16bit_soft_mask_is_divided_by_65535(tmp_path, arr):
    path = _write(tmp_path, "m16.png", _png_bytes(Image.fromarray(arr)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskWarning)
        out = load_mask(path).numpy()
    if arr.max() == 1:  # the 0/1 rule
        np.testing.assert_array_equal(out, arr.astype(np.float32))
    else:
        np.testing.assert_allclose(out, arr / 65535.0, atol=1e-7)
    assert 0.0 <= out.min() and out.max() <= 1.0


@PROPS
@given(arr=_arrays(np.uint8, 255))
def test_soft_8bit_mask_stays_soft(tmp_path, arr):
    path = _write(tmp_path, "soft.png", _png_bytes(Image.fromarray(arr)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskWarning)
        out = load_mask(path).numpy()
    expected = arr.astype(np.float32) if arr.max() == 1 else arr / 255.0
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_16bit_soft_mask_is_not_binarised(tmp_path):
    """The issue's case: a 16-bit mask read through PIL's "L" conversion became 0/255."""
    arr = np.zeros((4, 4), np.uint16)
    arr[1:3, 1:3] = 32768
    arr[0, 0] = 65535
    out = load_mask(_write(tmp_path, "m.png", _png_bytes(Image.fromarray(arr))))
    assert out[1, 1] == pytest.approx(0.5, abs=1e-4) and out[0, 0] == 1.0 and out[3, 3] == 0.0


def test_float_mask(tmp_path):
    soft = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(soft).save(tmp_path / "f.tiff")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskWarning)
        np.testing.assert_allclose(load_mask(tmp_path / "f.tiff").numpy(), soft)


@PROPS
@given(alpha=_arrays(np.uint8, 255), rgb=st.integers(0, 255))
def test_alpha_mask_only_when_asked(tmp_path, alpha, rgb):
    rgba = np.zeros((*alpha.shape, 4), np.uint8)
    rgba[..., :3] = rgb
    rgba[..., 3] = alpha
    path = _write(tmp_path, "a.png", _png_bytes(Image.fromarray(rgba, mode="RGBA")))
    assert file_has_alpha(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskWarning)
        from_alpha = load_mask(path, channel="alpha").numpy()
        from_gray = load_mask(path).numpy()
    expected = alpha.astype(np.float32) if alpha.max() == 1 else alpha / 255.0
    np.testing.assert_allclose(from_alpha, expected, atol=1e-7)
    gray = np.full(alpha.shape, rgb, np.float32)
    np.testing.assert_allclose(from_gray, gray if rgb == 1 else gray / 255.0, atol=1e-7)  # alpha ignored


def test_alpha_of_a_palette_and_missing_alpha(tmp_path):
    idx = np.array([[0, 1], [1, 0]], np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    path = _write(tmp_path, "p.png", _png_bytes(img, transparency=1))
    np.testing.assert_array_equal(load_mask(path, channel="alpha").numpy(), [[1, 0], [0, 1]])
    np.testing.assert_array_equal(load_mask(path).numpy(), [[1, 0], [0, 1]])  # white = edit from the palette
    gray = _write(tmp_path, "g.png", _png_bytes(Image.fromarray(idx * 255)))
    assert not file_has_alpha(gray)
    with pytest.raises(ValueError, match=r"g.png.*no alpha channel"):
        load_mask(gray, channel="alpha")


def test_mask_without_01_structure_warns(tmp_path):
    labels = np.zeros((8, 8), np.uint8)
    labels[2:5, 2:5] = 3  # labels 0..3, read as 3/255
    path = _write(tmp_path, "labels.png", _png_bytes(Image.fromarray(labels)))
    with pytest.warns(MaskWarning, match=r"labels.png.*brightest value is 0.0118"):
        out = load_mask(path)
    assert out.max() == pytest.approx(3 / 255)
    photo = np.random.default_rng(0).uniform(0.2, 0.8, size=(8, 8))
    assert any("neither near 0 nor near 1" in w for w in mask_warnings(photo))
    assert mask_warnings(np.eye(8)) == [] and mask_warnings(np.zeros((3, 3))) == []


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [10_000, 20_000])  # above MAX_IMAGE_PIXELS (Pillow warns) and 2x (Pillow raises)
def test_decompression_bomb_is_refused(tmp_path, side):
    path = _write(tmp_path, "bomb.png", png_header_only(side, side))
    with pytest.raises(ValueError, match=r"--image '.*bomb.png'.*decompression bomb"):
        load_image(path, name="--image")
    with pytest.raises(ValueError, match=r"bomb.png.*decompression bomb"):
        load_mask(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--mask: no such file .*nope.png"):
        load_mask(tmp_path / "nope.png", name="--mask")
    with pytest.raises(ValueError, match="is a directory"):
        load_image(tmp_path)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"text.png.* is not a readable image"):
        load_image(tmp_path / "text.png")
    good = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)))
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"cut.png.*truncated or corrupt"):
        load_image(tmp_path / "cut.png")


# ------------------------------------------------------------------------------------------------
# sizes and resizing
# ------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 5000), w=st.integers(1, 5000), side=st.sampled_from([32, 48, 64]), multiple=st.sampled_from([4, 8, 16]))
def test_fit_size_by_area_keeps_aspect_and_tiles(h, w, side, multiple):
    oh, ow = fit_size(h, w, area=side * side, multiple=multiple)
    assert oh % multiple == 0 and ow % multiple == 0 and oh >= multiple and ow >= multiple
    if multiple <= oh and multiple <= ow and 1 / 4 <= w / h <= 4 and multiple <= side // 4:
        # rounding each side moves it by at most multiple/2: the aspect and area stay close
        assert abs(np.log((ow / oh) / (w / h))) <= np.log((1 + multiple / (2 * min(oh, ow) - multiple)) ** 2) + 1e-9
        assert abs(oh * ow - side * side) <= multiple * (oh + ow)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(16, 6000), w=st.integers(16, 6000))
def test_fit_size_picks_the_kontext_bucket_diffusers_picks(h, w):
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    oh, ow = fit_size(h, w, area=1024 * 1024, multiple=16, buckets=PREFERRED_KONTEXT_RESOLUTIONS)
    _, bw, bh = min((abs(w / h - bw / bh), bw, bh) for bw, bh in PREFERRED_KONTEXT_RESOLUTIONS)
    assert (oh, ow) == (bh, bw)
    half = fit_size(h, w, area=512 * 512, multiple=16, buckets=PREFERRED_KONTEXT_RESOLUTIONS)
    assert half[0] % 16 == 0 and half[1] % 16 == 0 and abs(half[0] - bh / 2) <= 8 and abs(half[1] - bw / 2) <= 8


def test_non_square_edit_sizes():
    assert fit_size(3000, 4000, area=1024**2, multiple=16,
                    buckets=[(1024, 1024), (1184, 880), (880, 1184)]) == (880, 1184)  # (w, h) buckets: landscape
    assert fit_size(48, 64, area=32 * 32, multiple=4) == (28, 36)
    assert fit_size(64, 48, area=32 * 32, multiple=4) == (36, 28)


@PROPS
@given(arr=_arrays(np.uint8, 1, st.tuples(st.integers(2, 40), st.integers(2, 40))),
       out=st.tuples(st.integers(1, 40), st.integers(1, 40)))
def test_resize_mask_keeps_values_and_regions(arr, out):
    mask = torch.from_numpy(arr.astype(np.float32))
    resized = resize_mask(mask, *out)
    assert tuple(resized.shape) == out
    assert set(resized.unique().tolist()) <= {0.0, 1.0}  # a 0/1 mask stays 0/1
    if out[0] <= arr.shape[0] and out[1] <= arr.shape[1]:  # shrinking: max pooling never loses an edit region
        assert (float(resized.max()) > 0) == (float(mask.max()) > 0)


def test_resize_image_keeps_range():
    image = torch.rand(3, 30, 50, generator=torch.Generator().manual_seed(0))
    out = resize_image(image, 12, 20)
    assert out.shape == (3, 12, 20) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert abs(float(out.mean()) - float(image.mean())) < 0.02
    assert resize_image(image, 30, 50) is image


def test_save_image_roundtrip_and_grid(tmp_path):
    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(1))
    save_image(image, tmp_path / "x.png")
    np.testing.assert_allclose(load_image(tmp_path / "x.png").numpy(), image.numpy(), atol=0.5 / 255 + 1e-6)
    with pytest.raises(ValueError, match="image 1 is 4x7"):
        image_grid([image, torch.rand(3, 4, 7)], columns=2)


# ------------------------------------------------------------------------------------------------
# report figures
# ------------------------------------------------------------------------------------------------
def test_labelled_grid_enlarges_small_tiles(tmp_path):
    from rcgrpo.io.figures import nearest_upscale, save_labelled_grid

    tiny = torch.zeros(3, 8, 8)
    tiny[0, :4] = 1.0
    up = nearest_upscale(tiny.permute(1, 2, 0).numpy(), 64)
    assert up.shape == (64, 64, 3) and set(np.unique(up)) <= {0.0, 1.0}  # nearest: no new values
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1
    path = save_labelled_grid([[tiny, tiny, tiny]], tmp_path / "grid.png", column_labels=["source", "base", "base + LoRA"],
                              row_labels=["ex"], captions=[["", "reward 0.1", "reward 0.2"]], title="t",
                              outlines=[[mask, None, None]])
    with Image.open(path) as im:
        assert im.size[0] > 3 * 192 and im.size[1] > 192  # drawn far larger than 8x8
    with pytest.raises(ValueError, match="column labels"):
        save_labelled_grid([[tiny]], tmp_path / "bad.png", column_labels=["a", "b"])
    assert not (tmp_path / "bad.png").exists()


def test_acd_figure_has_colour_bar_panels_and_acd(tmp_path):
    from rcgrpo.editors.heatmap import acd_density, save_acd_figure

    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(32, 32)
    mask[8:16, 8:20] = 1
    token = torch.nn.functional.max_pool2d(mask[None, None], 4).reshape(-1)
    mass = 0.2 + token * 3.0
    density = acd_density(mass)
    assert float(density.mean()) == pytest.approx(1.0)
    path = save_acd_figure(image, tmp_path / "acd.png", mass, mask=mask, title="example")
    with Image.open(path) as im:
        assert im.size[0] > 3 * 256 and im.mode in ("RGB", "RGBA")
    # the ACD value in the figure is the mean density over the masked tokens
    expected = float(density[token > 0].mean())
    assert expected == pytest.approx(float((mass * token).sum() / token.sum() / (mass.sum() / mass.numel())))

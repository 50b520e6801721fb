"""Reading and writing images and masks as people have them, with one documented rule per case.

Every file is read through PIL, and its EXIF orientation is applied (`PIL.ImageOps.exif_transpose`,
as `diffusers.utils.load_image` does), so the pixels are the ones an image viewer shows. A file
over `PIL.Image.MAX_IMAGE_PIXELS` pixels (Pillow's decompression-bomb limit, about 89 million) is
refused with a ValueError naming it; so are unreadable, truncated and missing files. Multi-frame
files (GIF, APNG, TIFF pages) give their first frame.

Images, `load_image(path)` → `[3, H, W]` float32 in [0, 1]:
- 8-bit modes (L, RGB, CMYK, YCbCr, LAB, HSV) → RGB / 255; bilevel "1" → 0 or 1;
- 16-bit grayscale ("I;16", "I;16B", ...) / 65535; 32-bit integer "I" (some TIFF and PNG decoders
  hand 16-bit data out so) / 65535 unless its BitsPerSample tag says 8 bits (then / 255), values
  beyond 65535 refused; float "F" used as it is when it lies in [0, 1], refused otherwise;
- 16-bit RGB(A) PNGs: Pillow keeps the top 8 bits of each channel (its RGB modes are 8-bit), so they
  read as / 255 of those: the right scale, at 8-bit precision;
- palette "P" / "PA" through the palette, its transparency becoming alpha;
- an alpha channel (RGBA, LA, PA, a palette's transparency) is composited over `background` (white
  by default); `background=None` drops it instead, as `Image.convert("RGB")` does.

Masks, `load_mask(path)` → `[H, W]` float32 in [0, 1], 1 = edit region:
- `channel="luminance"` (default) reads the gray level (PIL's "L" of the colour channels; an alpha
  channel is ignored), `channel="alpha"` the alpha channel (refused for a file without one);
- an integer mask whose values are all 0 or 1 is a 0/1 mask and is used as it is: a mask whose
  maximum is 1 means 1 = edit, in 8-bit and 16-bit files alike (never 1/255 = 0.0039);
- otherwise integer values are divided by the full scale of the file's depth: 255 for 8-bit
  files, 65535 for 16-bit ones; float "F" masks are used as they are when in [0, 1];
- soft values stay soft (the token mask pools them, SPEC §2);
- a `MaskWarning` when a mask has no 0/1 structure: its brightest pixel is below 0.5 (e.g. an
  8-bit file holding labels 0..3), or most of its pixels are neither near 0 nor near 1 (a photo?).

Sizes: `fit_size` picks the height × width of an edit from the image's aspect ratio (a resolution
bucket of the pipeline, or a target area rounded to the token grid); `resize_image` (bicubic,
antialiased) and `resize_mask` (max pooling when shrinking, nearest when enlarging) bring an image
and its mask there without changing the aspect ratio.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .files import atomic_file

MASK_CHANNELS = ("luminance", "alpha")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EIGHT_BIT_COLOUR = ("L", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")


class MaskWarning(UserWarning):
    """A mask that loads but probably does not hold what its author meant (no 0/1 structure)."""


# ------------------------------------------------------------------------------------------------
# opening files
# ------------------------------------------------------------------------------------------------
def open_image(path, *, name: str = "image"):
    """The decoded PIL image of `path` with its EXIF orientation applied (first frame).

    Raises FileNotFoundError (no file), ValueError (a directory, not an image, truncated, or over
    `PIL.Image.MAX_IMAGE_PIXELS` pixels: a possible decompression bomb), each naming `name` and the file.
    """
    path = Path(path).expanduser()
    where = f"{name} {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such file {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{where} is a directory, not an image file")
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, also when PIL refuses the file
    except OSError as exc:
        raise ValueError(f"{where} cannot be read ({exc.strerror or exc})") from None
    with fh:
        out, bits = _decode(fh, where)
    if bits is not None:
        out.info["bits_per_sample"] = bits
    return out


def _decode(fh, where: str):
    """(EXIF-transposed decoded image, TIFF bits per sample or None) of an open file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fh)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"{where}: refused as a possible decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ValueError(f"{where} is not a readable image (PIL cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{where} is not a readable image ({exc})") from None
    with img:
        width, height = img.size
        if limit and width * height > limit:  # Image.open already refuses these; kept for a patched Pillow
            raise ValueError(f"{where}: {width}x{height} = {width * height:,} pixels exceeds the {limit:,}-pixel limit "
                             "(PIL.Image.MAX_IMAGE_PIXELS); refused as a possible decompression bomb")
        if width == 0 or height == 0:
            raise ValueError(f"{where} has no pixels ({width}x{height})")
        try:
            img.seek(0)
            img.load()
            return ImageOps.exif_transpose(img), _bits_per_sample(img)  # a new image, independent of the file
        except Exception as exc:  # noqa: BLE001 - any decoder failure (OSError, SyntaxError, struct.error) is a bad file
            raise ValueError(f"{where} is not a readable image: truncated or corrupt ({exc})") from None


def _bits_per_sample(img) -> int | None:
    """The TIFF BitsPerSample tag of an opened file (None for other formats)."""
    tags = getattr(img, "tag_v2", None)
    raw = tags.get(258) if tags is not None else None
    if isinstance(raw, tuple):
        raw = raw[0] if raw else None
    return int(raw) if raw is not None else None


def _int_full_scale(img, values: np.ndarray, where: str) -> float:
    """Full scale of an integer single-channel image: 255, or 65535 for 16-bit data (see the module docstring)."""
    if img.mode.startswith("I;16"):
        return 65535.0
    if img.mode == "I":
        if img.info.get("bits_per_sample") == 8:
            return 255.0
        if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
            raise ValueError(f"{where}: 32-bit integer pixels must lie in [0, 65535] (16-bit data), got "
                             f"[{int(values.min())}, {int(values.max())}]")
        return 65535.0
    return 255.0


def _float_values(values: np.ndarray, where: str) -> np.ndarray:
    values = values.astype(np.float32)
    if not np.isfinite(values).all() or (values.size and (values.min() < 0 or values.max() > 1)):
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        raise ValueError(f"{where}: floating-point pixels must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return values


def _single_channel(img, where: str) -> tuple[np.ndarray, float | None]:
    """(values, full scale) of a single-channel image; full scale None for float data already in [0, 1]."""
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8), 1.0
    if img.mode == "F":
        return _float_values(np.asarray(img), where), None
    if img.mode == "I" or img.mode.startswith("I;16"):
        values = np.asarray(img).astype(np.int64)
        return values, _int_full_scale(img, values, where)
    return np.asarray(img.convert("L")), 255.0


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def image_array(img, *, background=(1.0, 1.0, 1.0), name: str = "image") -> np.ndarray:
    """`[H, W, 3]` float32 in [0, 1] from a PIL image, by the rules of the module docstring."""
    where = f"{name}"
    if img.mode in ("1", "F", "I") or img.mode.startswith("I;16"):
        values, scale = _single_channel(img, where)
        gray = values.astype(np.float32) if scale is None else values.astype(np.float32) / scale
        return np.repeat(gray[..., None], 3, axis=-1)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA" if img.mode in _ALPHA_MODES else "RGB")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.shape[-1] == 4:
        rgb, alpha = arr[..., :3], arr[..., 3:]
        if background is None:
            return np.ascontiguousarray(rgb)
        bg = np.asarray(background, dtype=np.float32).reshape(1, 1, 3)
        return rgb * alpha + bg * (1.0 - alpha)
    return arr


def load_image(path, *, name: str = "image", background=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """`[3, H, W]` float32 in [0, 1] from an image file (EXIF orientation applied; alpha composited over
    `background`, white by default, or dropped with `background=None`; see the module docstring)."""
    img = open_image(path, name=name)
    with img:
        arr = image_array(img, background=background, name=f"{name} {str(path)!r}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------
def has_alpha(img) -> bool:
    return img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)


def mask_array(img, *, channel: str = "luminance", name: str = "mask") -> np.ndarray:
    """`[H, W]` float32 in [0, 1] from a PIL image, by the rules of the module docstring (no warnings)."""
    if channel not in MASK_CHANNELS:
        raise ValueError(f"{name}: channel must be one of {MASK_CHANNELS}, got {channel!r}")
    if channel == "alpha":
        if not has_alpha(img):
            raise ValueError(f"{name} has no alpha channel (mode {img.mode}); read the mask from its gray level "
                             "instead (channel 'luminance')")
        rgba = img.convert("RGBA") if img.mode == "P" else img
        values, scale = np.asarray(rgba.getchannel("A")), 255.0
    elif img.mode == "P":
        values, scale = np.asarray(img.convert("RGBA" if "transparency" in img.info else "RGB").convert("L")), 255.0
    else:
        values, scale = _single_channel(img, name)
    if scale is None:  # float data in [0, 1]
        return values.astype(np.float32)
    if values.size and int(values.max()) == 1 and int(values.min()) >= 0:
        return values.astype(np.float32)  # a 0/1 mask (the "max is 1" rule)
    return values.astype(np.float32) / scale


def mask_warnings(mask: np.ndarray | torch.Tensor) -> list[str]:
    """Why a mask in [0, 1] looks unintended (empty list when it has a 0/1 structure)."""
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).float()
    if m.numel() == 0:
        return []
    out = []
    peak = float(m.max())
    if 0.0 < peak < 0.5:
        out.append(f"its brightest value is {peak:.4f} of 1 (8-bit {peak * 255:.1f}): no pixel is clearly in the "
                   "edit region; a 0/1 mask should use 0 and 1 only, an 8-bit one 0 and 255")
    middle = float(((m > 0.05) & (m < 0.95)).float().mean())
    if middle > 0.5:
        out.append(f"{middle:.0%} of its pixels are neither near 0 nor near 1 (an image rather than a mask?)")
    return out


def load_mask(path, *, name: str = "mask", channel: str = "luminance") -> torch.Tensor:
    """`[H, W]` float32 in [0, 1] (1 = edit region) from a mask file: 0/255, 0/1 or soft values, 8 or 16
    bits, gray level or (`channel="alpha"`) the alpha channel; see the module docstring. Warns with
    `MaskWarning` on a mask with no 0/1 structure."""
    img = open_image(path, name=name)
    where = f"{name} {str(path)!r}"
    with img:
        arr = mask_array(img, channel=channel, name=where)
    for why in mask_warnings(arr):
        warnings.warn(f"{where}: {why}", MaskWarning, stacklevel=2)
    return torch.from_numpy(np.ascontiguousarray(arr))


def file_has_alpha(path) -> bool:
    """Whether an image file has an alpha channel (read from its header; False when PIL cannot open it)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(Path(path).expanduser()) as img:
                return has_alpha(img)
    except Exception:  # noqa: BLE001 - a hint only; open_image reports unreadable files
        return False


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------
def fit_size(height: int, width: int, *, area: int, multiple: int,
             buckets: list[tuple[int, int]] | None = None, bucket_area: int = 1024 * 1024) -> tuple[int, int]:
    """(height, width) of an edit of a `height`×`width` image, keeping its aspect ratio.

    With `buckets` (a pipeline's resolutions as (width, height) pairs, e.g. diffusers'
    PREFERRED_KONTEXT_RESOLUTIONS) the bucket whose aspect ratio is nearest the image's, as
    FluxKontextPipeline picks it; for an `area` other than the buckets' nominal `bucket_area` (1024²
    for Kontext), the bucket scaled by sqrt(area / bucket_area) and rounded to `multiple`. Without buckets: the size of area `area` and the image's aspect ratio, each side
    rounded to the nearest multiple of `multiple` (at least one multiple), so the token grid tiles.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if multiple < 1 or area < multiple * multiple:
        raise ValueError(f"area {area} must hold at least one {multiple}x{multiple} tile")
    aspect = width / height
    if buckets:
        _, bw, bh = min((abs(aspect - w / h), w, h) for w, h in buckets)
        if area == bucket_area:
            return _round_multiple(bh, multiple), _round_multiple(bw, multiple)
        scale = math.sqrt(area / bucket_area)
        return _round_multiple(bh * scale, multiple), _round_multiple(bw * scale, multiple)
    return _round_multiple(math.sqrt(area / aspect), multiple), _round_multiple(math.sqrt(area * aspect), multiple)


def _round_multiple(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`[C, H, W]` in [0, 1] resized to `height`×`width` (bicubic, antialiased when shrinking, clamped to [0, 1])."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    out = F.interpolate(image[None].float(), size=(height, width), mode="bicubic", align_corners=False,
                        antialias=True)[0]
    return out.clamp(0, 1)


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`[H, W]` mask resized to `height`×`width` without inventing values.

    Shrinking takes the largest value of the source pixels each output pixel covers (adaptive max
    pooling: the rule by which SPEC §2 pools pixels into tokens, so a thin edit region is never lost
    and a 0/1 mask stays 0/1); enlarging repeats pixels (nearest).
    """
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    m = mask.float()[None, None]
    if height < m.shape[-2] or width < m.shape[-1]:
        m = F.adaptive_max_pool2d(m, (height, width))
    else:
        m = F.interpolate(m, size=(height, width), mode="nearest-exact")
    return m[0, 0]


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def to_pil(image: torch.Tensor):
    """PIL RGB image from `[3, H, W]` (or `[1, H, W]` / `[H, W]` gray) in [0, 1]."""
    from PIL import Image

    t = image.detach().float().cpu()
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"image must be [3, H, W], [1, H, W] or [H, W] in [0, 1], got shape {tuple(image.shape)}")
    t = torch.nan_to_num(t, nan=0.0).clamp(0, 1).expand(3, -1, -1)
    arr = (t.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))


def save_image(image: torch.Tensor, path) -> None:
    """Write `[3, H, W]` in [0, 1] as PNG atomically (temp file, then rename)."""
    with atomic_file(path) as tmp:
        to_pil(image).save(tmp, format="PNG")


def image_grid(images: list[torch.Tensor], columns: int) -> torch.Tensor:
    """Tile equally sized `[3, H, W]` images into one `[3, rows·H, columns·W]` image."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    rows = (len(images) + columns - 1) // columns
    _, h, w = images[0].shape
    grid = torch.ones(3, rows * h, columns * w)
    for idx, img in enumerate(images):
        if tuple(img.shape[-2:]) != (h, w):
            raise ValueError(f"image_grid: image {idx} is {img.shape[-2]}x{img.shape[-1]}, the first is {h}x{w}")
        r, c = divmod(idx, columns)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = img.detach().float().cpu()
    return grid


__all__ = ["MASK_CHANNELS", "MaskWarning", "fit_size", "has_alpha", "image_array", "image_grid", "load_image",
           "file_has_alpha", "load_mask", "mask_array", "mask_warnings", "open_image", "resize_image", "resize_mask", "save_image",
           "to_pil"]

"""`rcgrpo edit`: a real RDP edit with an image editor, global perturbation vs RDP side by side.

For one source image, mask and instruction it rolls out a group from the same ε* twice — once with
Neighbor GRPO's global perturbation (α_edit = α_base = σ), once with RDP — and reports per
candidate how much the edit region changed and how much the background drifted relative to the
reference candidate (index 0), plus its ACD reward. Candidate images are saved.

With `--image`/`--mask` the edit keeps the image's aspect ratio at about `--resolution`² pixels, sized
as the model family sizes it (`Editor.edit_size`): FLUX.1-Kontext's resolution bucket nearest the
image's aspect ratio (scaled to `--resolution`² when that is not 1024; the tiny models, ≤ 64 px, the exact
aspect), Qwen-Image-Edit's `calculate_dimensions` rounding; each side a multiple of the token size. The image is
resized bicubic (antialiased), the mask by max pooling when shrinking and nearest when enlarging (so
no edit region is lost, as SPEC §2 pools pixels into tokens). The images written (source, mask,
candidates; the overview grids stay at the model's size) have the input image's size: the candidates are resized back from the model's size
(bicubic); `--output-size model` keeps the model's size instead. The printed line gives both sizes
when they differ; `report.json` has the model's (`height`, `width`) and the written one (`output_size`). How files are read (EXIF orientation,
16-bit and palette images, 0/255, 0/1, soft and alpha masks) is in `rcgrpo.io.images`.
Every input is checked before the model loads: files readable, sizes matching, the mask neither empty
nor full (on the token grid too, when the model's VAE is known from its config files), the LoRA
file's header, the output directory; the LoRA's modules and shapes right after the model loads,
before any rollout.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

from .parsing import parse
from .validation import check_input_file, check_lora_file, check_output_dir

# The model code (torch, diffusers) is imported inside the functions that run: `rcgrpo edit --help`
# parses without it.


def _opt(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass
class EditArguments:
    """Options of `rcgrpo edit`."""

    image: Optional[str] = _opt(None, "source image file (default: a built-in generated example)")
    mask: Optional[str] = _opt(None, "edit mask file, same size as the image (white = edit region): 0/255, 0/1 "
                                     "(a mask whose maximum is 1 means 1 = edit), soft values, 8 or 16 bits")
    mask_channel: Literal["luminance", "alpha"] = _opt("luminance", "where the mask is: the gray level of the mask "
                                                                    "file, or its alpha channel")
    prompt: Optional[str] = _opt(None, "edit instruction")
    model: str = _opt("tiny", "tiny | tiny-editor | tiny-qwen | a local FLUX.1-Kontext or Qwen-Image-Edit (Plus) "
                              "directory | a hub id")
    lora: Optional[str] = _opt(None, "directory with pytorch_lora_weights.safetensors to load")
    output_dir: str = _opt("runs/edit", "where candidate images and report.json go")
    group_size: int = _opt(4, "G: candidates per scheme (candidate 0 is the unperturbed reference)")
    steps: Optional[int] = _opt(None, "Euler steps (default: the model's, e.g. 4 for tiny, 28 for FLUX.1-Kontext)")
    guidance_scale: Optional[float] = _opt(None, "the family's guidance: Kontext's guidance embedding (2.5), "
                                                 "Qwen-Image-Edit's true-CFG scale (4.0) (default: the model's)")
    alpha_edit: float = _opt(0.3, "RDP α_edit inside the mask")
    alpha_base: float = _opt(0.02, "RDP α_base in the background")
    global_sigma: Optional[float] = _opt(None, "σ of the global-perturbation baseline (default: alpha_edit)")
    acd_text_tokens: Literal["prompt", "all"] = _opt("prompt", "ACD text queries: the instruction's tokens or every "
                                                               "padded T5 position")
    resolution: Optional[int] = _opt(None, "edit area as the side of a square of equal area; the aspect ratio is "
                                            "the image's (default: the model's, 1024 for FLUX.1-Kontext)")
    output_size: Literal["input", "model"] = _opt("input", "size of the written images: the input image's (the "
                                                           "edit, made at the model's size, is resized back) or "
                                                           "the model's (the size it edited at)")
    seed: int = _opt(0, "seed of ε* and the perturbations")
    device: Optional[str] = _opt(None, "cpu or cuda (default: cuda when available)")

    def validate(self) -> None:
        """Flag ranges and every input file, before any model is loaded."""
        if (self.image is None) != (self.mask is None):
            raise ValueError("--image and --mask must be given together")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("--prompt: expected an edit instruction, got an empty string")
        if self.resolution is not None and self.resolution < 16:
            raise ValueError(f"--resolution: expected an int ≥ 16, got {self.resolution}")
        if self.group_size < 2:
            raise ValueError(f"--group-size: expected an int ≥ 2 (the reference and a perturbed candidate), "
                             f"got {self.group_size}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps: expected an int ≥ 1, got {self.steps}")
        for name in ("alpha_edit", "alpha_base", "global_sigma"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')}: expected a value in [0, 1], got {value}")
        check_output_dir(self.output_dir, "--output-dir")
        if self.image is not None:
            check_input_file(self.image, "--image")
            check_input_file(self.mask, "--mask")
        if self.lora is not None:
            check_lora_file(self.lora, "--lora")


def main(argv: list[str], prog: str = "rcgrpo edit") -> int:
    args = parse((EditArguments,), argv, prog, description=__doc__.splitlines()[0])
    args.validate()
    return run_edit(args, prog)


def prepare_example(image, mask, args: "EditArguments", resolution: int, size_for, size_multiple: int):
    """The image and mask resized to the edit size `size_for(h, w, resolution, size_multiple)` (the model
    family's `Editor.size_for`, aspect kept), the mask checked on the token grid."""
    from ..data.synthetic import EditExample
    from ..io.images import resize_image, resize_mask
    from .validation import check_mask_on_grid

    height, width = size_for(image.shape[1], image.shape[2], resolution, size_multiple)
    image, mask = resize_image(image, height, width), resize_mask(mask, height, width)
    check_mask_on_grid(mask, height, width, size_multiple // 2, source=args.mask)
    return EditExample(image=image, mask=mask, instruction=args.prompt or "edit the masked region",
                       example_id=Path(args.image).stem)


def load_edit_inputs(args: "EditArguments", prog: str = "rcgrpo edit"):
    """(image [3, H, W], mask [H, W]) read from --image/--mask and checked; mask warnings become one line each."""
    from ..io.images import MaskWarning, file_has_alpha, load_image, load_mask
    from .validation import check_edit_inputs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MaskWarning)
        image = load_image(args.image, name="--image")
        mask = load_mask(args.mask, name="--mask", channel=args.mask_channel)
    for w in caught:
        if issubclass(w.category, MaskWarning):
            print(f"{prog}: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    check_edit_inputs(image, mask, mask_source=args.mask,
                      mask_has_alpha=args.mask_channel == "luminance" and file_has_alpha(args.mask))
    return image, mask


def builtin_example(model: str, seed: int, resolution: int):
    """The example edited without --image: a held-out MiniBench edit for the tiny editor (the task it
    was trained on), else the toy "make the square red" example."""
    from ..data.synthetic import EditExample, square_example

    if model == "tiny-editor":
        from ..minibench.tasks import MiniBenchDataset

        ex = MiniBenchDataset(1, split="heldout", seed=seed, size=resolution)[0]
        return EditExample(image=ex.image, mask=ex.mask, instruction=ex.instruction, example_id=ex.example_id,
                           metadata=dict(ex.metadata))
    return square_example(seed, min(resolution, 512))


def run_edit(args: EditArguments, prog: str = "rcgrpo edit") -> int:
    from ..editors.compare import edit_group, format_report
    from ..editors.loading import expected_editor_class, load_editor, model_defaults
    from ..io.files import atomic_write_text
    from ..io.images import save_image
    from .preflight import vae_scale_factor

    if args.image:  # read and check the inputs before the model
        image, mask = load_edit_inputs(args, prog)
        factor, family = vae_scale_factor(args.model), expected_editor_class(args.model)
        if factor is not None and family is not None:  # the token grid is known from the model's config files
            prepare_example(image, mask, args, args.resolution or model_defaults(args.model).resolution,
                            family.size_for, 2 * factor)
    editor = load_editor(args.model, device=args.device)
    defaults = editor.defaults
    if args.lora:
        editor.load_lora(args.lora)
    resolution = args.resolution or defaults.resolution
    if args.image:
        example = prepare_example(image, mask, args, resolution, type(editor).size_for, editor.size_multiple)
    else:
        example = builtin_example(args.model, args.seed, defaults.resolution)
        if args.prompt:
            example.instruction = args.prompt
    steps = args.steps or defaults.num_inference_steps
    start = time.perf_counter()
    reports, images = edit_group(
        editor, example, group_size=args.group_size, num_steps=steps,
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else defaults.guidance_scale,
        alpha_edit=args.alpha_edit, alpha_base=args.alpha_base, global_sigma=args.global_sigma, seed=args.seed,
        max_sequence_length=defaults.max_sequence_length, acd_text_tokens=args.acd_text_tokens,
        negative_prompt=defaults.negative_prompt,
    )
    elapsed = time.perf_counter() - start
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    height, width = (int(v) for v in example.image.shape[1:])
    written, written_images = example, images
    if args.image and args.output_size == "input":  # the source as read, candidates resized back to it
        written = dataclasses.replace(example, image=image, mask=mask)
        written_images = {scheme: resize_to(imgs, image.shape[1], image.shape[2]) for scheme, imgs in images.items()}
    save_image(written.image, out / "source.png")
    save_image(written.mask[None].expand(3, -1, -1), out / "mask.png")
    for scheme, imgs in written_images.items():
        for i, img in enumerate(imgs):
            save_image(img, out / scheme / f"candidate_{i:02d}.png")
        # the overview grids stay at the model's size (a 4000 px input would make them huge)
        save_scheme_grid(example, images[scheme], [r for r in reports if r.scheme == scheme], scheme,
                         out / f"{scheme}_grid.png")
    out_height, out_width = (int(v) for v in written.image.shape[1:])
    report = {"instruction": example.instruction, "steps": steps, "seconds": elapsed, "height": height,
              "width": width, "output_size": [out_height, out_width], "candidates": [asdict(r) for r in reports]}
    if args.image:
        report["source_size"] = [int(image.shape[1]), int(image.shape[2])]
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    print(f'edit "{example.instruction}" ({size_note(args, image if args.image else None, height, width)}; '
          f"{args.group_size} candidates, {steps} steps, {elapsed:.2f} s)")
    print(format_report(reports))
    print(f"images written to {out}/")
    return 0


def resize_to(images, height: int, width: int):
    """Candidates `[G, 3, h, w]` resized to `height`×`width` (bicubic, antialiased; `rcgrpo.io.images`)."""
    import torch

    from ..io.images import resize_image

    if tuple(images.shape[-2:]) == (height, width):
        return images
    return torch.stack([resize_image(img, height, width) for img in images])


def size_note(args: "EditArguments", image, height: int, width: int) -> str:
    """How the printed line states the sizes: the model's size, and the input's when they differ."""
    if image is None or tuple(image.shape[1:]) == (height, width):
        return f"{width}x{height} px"
    in_height, in_width = int(image.shape[1]), int(image.shape[2])
    if args.output_size == "input":
        return f"edited at the model's {width}x{height} px, written at the input's {in_width}x{in_height} px"
    return f"edited and written at the model's {width}x{height} px; the input is {in_width}x{in_height} px"


def save_scheme_grid(example, imgs, reports: list, scheme: str, path) -> Path:
    """One labelled row: the source (mask outlined) and every candidate, its changes under it."""
    from ..io.figures import save_labelled_grid

    labels = ["source"] + [f"{i}" + (" (ε*, reference)" if i == 0 else "") for i in range(len(imgs))]
    captions = [[""] + [f"edit Δ {r.edit_change:.3f}\nbg drift {r.background_drift:.3f}" for r in reports]]
    name = {"rdp": "RDP (region-decoupled)", "global": "global perturbation (Neighbor GRPO)"}.get(scheme, scheme)
    return save_labelled_grid([[example.image, *imgs]], path, column_labels=labels, captions=captions,
                              title=f"{name}: {example.instruction!r}",
                              outlines=[[example.mask] + [None] * len(imgs)])

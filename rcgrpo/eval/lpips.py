"""LPIPS (SqueezeNet-1.1 backbone) for the CompBench background metric, with or without torchvision.

The official script uses torchmetrics' `LearnedPerceptualImagePatchSimilarity(net_type="squeeze")`:
ImageNet SqueezeNet-1.1 features from torchvision plus the LPIPS linear heads that torchmetrics ships.
`torchmetrics_lpips` builds it when torchvision and its weights are available. Otherwise `SqueezeLPIPS`,
a torchvision-free network with the same layers, computes the same function from a safetensors file:

    # on a machine with torchvision (it downloads the ImageNet SqueezeNet weights once)
    python -c "from rcgrpo.eval.lpips import export_lpips_weights; export_lpips_weights('lpips_squeeze.safetensors')"
    # here
    rcgrpo eval ... --lpips-weights lpips_squeeze.safetensors

torchmetrics' network (`_LPIPS`) holds its heads twice, as `lin0..lin6` and as the list `lins.0..lins.6`
(the same tensors), so `safetensors.torch.save_file(net.state_dict())` refuses to write it.
`export_lpips_weights` writes each tensor once under the `lin{i}` name; `load_lpips_weights` reads that
file, a file saved with `safetensors.torch.save_model` (which keeps either name), or a state dict with
both names (they must then be equal).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn


class _Fire(nn.Module):
    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1)


def _squeezenet11_features() -> list[nn.Module]:
    """torchvision's `squeezenet1_1().features`, layer for layer (same indices, same parameter names)."""
    return [
        nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True), _Fire(64, 16, 64, 64), _Fire(128, 16, 64, 64),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True), _Fire(128, 32, 128, 128), _Fire(256, 32, 128, 128),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True), _Fire(256, 48, 192, 192), _Fire(384, 48, 192, 192),
        _Fire(384, 64, 256, 256), _Fire(512, 64, 256, 256),
    ]


class _SqueezeSlices(nn.Module):
    SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 11), (11, 12), (12, 13))

    def __init__(self):
        super().__init__()
        layers = _squeezenet11_features()
        slices = []
        for start, stop in self.SLICES:
            seq = nn.Sequential()
            for i in range(start, stop):
                seq.add_module(str(i), layers[i])
            slices.append(seq)
        self.slices = nn.ModuleList(slices)

    def forward(self, x) -> list[torch.Tensor]:
        outs = []
        for s in self.slices:
            x = s(x)
            outs.append(x)
        return outs


class _NetLin(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, stride=1, padding=0, bias=False))

    def forward(self, x):
        return self.model(x)


class SqueezeLPIPS(nn.Module):
    """LPIPS with the SqueezeNet-1.1 backbone, the network of torchmetrics'
    `LearnedPerceptualImagePatchSimilarity(net_type="squeeze")` with the same state-dict keys
    (`net.slices.*`, `lin0..lin6.model.1.weight`), built without torchvision. `forward(a, b)` takes
    `[B, 3, H, W]` images in [−1, 1] and returns `[B]` distances. Weights come from `load_lpips_weights`
    (safetensors); a freshly constructed module is random (for tests)."""

    CHANNELS = (64, 128, 256, 384, 384, 512, 512)

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)
        self.net = _SqueezeSlices()
        for i, ch in enumerate(self.CHANNELS):
            self.add_module(f"lin{i}", _NetLin(ch))
        self.eval()
        self.requires_grad_(False)

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        feats0 = self.net((in0 - self.shift) / self.scale)
        feats1 = self.net((in1 - self.shift) / self.scale)
        total = 0.0
        for i, (f0, f1) in enumerate(zip(feats0, feats1)):
            n0 = f0 / torch.sqrt(1e-8 + (f0**2).sum(dim=1, keepdim=True))
            n1 = f1 / torch.sqrt(1e-8 + (f1**2).sum(dim=1, keepdim=True))
            total = total + getattr(self, f"lin{i}")((n0 - n1) ** 2).mean(dim=(2, 3), keepdim=True)
        return total.reshape(in0.shape[0])


_LINS = re.compile(r"^lins\.(\d+)\.(.*)$")


def canonical_lpips_state_dict(state: dict) -> dict:
    """A torchmetrics `_LPIPS` (squeeze) state dict with each head once, under `lin{i}.*`: `lins.{i}.*`
    aliases are renamed, or dropped when the `lin{i}` tensor is present and equal (ValueError if not)."""
    out: dict = {}
    aliases: dict = {}
    for key, value in state.items():
        m = _LINS.match(key)
        if m:
            aliases[f"lin{m.group(1)}.{m.group(2)}"] = (key, value)
        else:
            out[key] = value
    for key, (alias, value) in aliases.items():
        if key in out:
            if out[key].shape != value.shape or not torch.equal(out[key].cpu(), value.cpu()):
                raise ValueError(f"LPIPS state dict: {alias!r} and {key!r} should be the same tensor but differ")
        else:
            out[key] = value
    return out


def export_lpips_weights(path, source=None) -> Path:
    """Write LPIPS-squeeze weights to a safetensors file (atomically) that `load_lpips_weights` reads.

    `source`: torchmetrics' `LearnedPerceptualImagePatchSimilarity(net_type="squeeze")`, its `.net`, any
    module or state dict with that key set, or None to build torchmetrics' metric here (needs torchvision
    and its ImageNet SqueezeNet weights)."""
    from safetensors.torch import save

    from ..io.files import atomic_write_bytes

    if source is None:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        source = LearnedPerceptualImagePatchSimilarity(net_type="squeeze")
    if hasattr(source, "net") and hasattr(source.net, "state_dict") and not isinstance(source, SqueezeLPIPS):
        source = source.net  # the metric: its network
    state = source.state_dict() if hasattr(source, "state_dict") else dict(source)
    state = canonical_lpips_state_dict(state)
    expected = set(SqueezeLPIPS().state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"export_lpips_weights: not an LPIPS-squeeze network (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}
    return atomic_write_bytes(Path(path), save(tensors, metadata={"format": "pt", "network": "lpips-squeeze"}))


def load_lpips_weights(path) -> SqueezeLPIPS:
    """A `SqueezeLPIPS` with weights from a safetensors file (ValueError naming the file otherwise)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--lpips-weights: no such file {str(path)!r}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"--lpips-weights: {str(path)!r} is not a valid safetensors file ({exc})") from None
    try:
        state = canonical_lpips_state_dict(state)
    except ValueError as exc:
        raise ValueError(f"--lpips-weights: {str(path)!r}: {exc}") from None
    net = SqueezeLPIPS()
    expected = set(net.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"--lpips-weights: {str(path)!r} is not an LPIPS-squeeze state dict "
            f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{'...' if len(unexpected) > 4 else ''}); write it with rcgrpo.eval.lpips.export_lpips_weights"
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"--lpips-weights: {str(path)!r} has tensors of the wrong shape ({str(exc).splitlines()[-1]})") from None
    return net.eval()


def torchmetrics_lpips(device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="squeeze", reduction="mean").to(device)
    net = metric.net

    def lpips(a, b):
        return net(a, b).reshape(a.shape[0])

    return lpips


__all__ = ["SqueezeLPIPS", "canonical_lpips_state_dict", "export_lpips_weights", "load_lpips_weights",
           "torchmetrics_lpips"]

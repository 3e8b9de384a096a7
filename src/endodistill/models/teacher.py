"""The video teacher: ResNet(2+1)D from torchvision, adapted to grayscale ultrasound clips.

Two architectures share torchvision's block structure (``VideoResNet`` with ``BasicBlock`` and
``Conv2Plus1D`` layers, an R(2+1)D stem):

* ``r2plus1d_18``: torchvision's ``r2plus1d_18`` as is (widths 64-128-256-512). Kinetics-400 weights can be
  read from a local file (``cfg.weights``); they are never downloaded.
* ``r2plus1d_narrow``: the same network at widths ``w, 2w, 4w, 8w`` (``cfg.width``) so that the CPU demo is
  fast. It is assembled from torchvision's own layers (``VideoResNet._make_layer``, ``BasicBlock``,
  ``Conv2Plus1D``); only the stem is written here because torchvision's ``R2Plus1dStem`` has fixed widths.

Input is ``(B, C, T, H, W)``. Code paths avoid ``view`` so that ``channels_last_3d`` inputs work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision.models.video import r2plus1d_18
from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, VideoResNet

from endodistill.config import Config, TeacherConfig
from endodistill.errors import InputError
from endodistill.utils import state_dict_mismatch

# Kinetics-400 normalisation of torchvision's video weights, collapsed to one grey channel (mean of RGB):
# use these when Kinetics weights are loaded, so the grey input has the statistics the stem expects.
KINETICS_GRAY_MEAN = (0.43216 + 0.394666 + 0.37645) / 3
KINETICS_GRAY_STD = (0.22803 + 0.22145 + 0.216989) / 3

_LAYERS = (2, 2, 2, 2)  # blocks per stage of the 18-layer network


def _r2plus1d_stem(in_channels: int, width: int) -> nn.Sequential:
    """R(2+1)D stem at any width: spatial 1x7x7 conv, then temporal 3x1x1 conv.

    torchvision's ``R2Plus1dStem`` hard-codes 3 -> 45 -> 64 channels; this keeps its layout (and module
    indices, so state dicts stay compatible at width 64) with ``45/64`` of the width in the middle.
    """
    mid = max(1, round(width * 45 / 64))
    return nn.Sequential(
        nn.Conv3d(in_channels, mid, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        nn.BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid, width, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )


class _NarrowR2Plus1D(VideoResNet):
    """torchvision's ``VideoResNet`` (R(2+1)D-18 layout) with base width ``width`` instead of 64.

    ``VideoResNet.__init__`` hard-codes the widths, so this builds the same modules itself while reusing
    torchvision's ``_make_layer``, ``BasicBlock``, ``Conv2Plus1D`` and ``forward``.
    """

    def __init__(self, width: int, num_classes: int, in_channels: int) -> None:
        nn.Module.__init__(self)
        self.inplanes = width
        self.stem = _r2plus1d_stem(in_channels, width)
        widths = (width, 2 * width, 4 * width, 8 * width)
        strides = (1, 2, 2, 2)
        for i, (planes, blocks, stride) in enumerate(zip(widths, _LAYERS, strides), start=1):
            setattr(
                self, f"layer{i}", self._make_layer(BasicBlock, Conv2Plus1D, planes, blocks, stride=stride)
            )
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(widths[-1] * BasicBlock.expansion, num_classes)
        _init_like_torchvision(self)


def _init_like_torchvision(model: nn.Module) -> None:
    # The same initialisation as VideoResNet.__init__ (kaiming fan_out convs, unit BN, small fc).
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)


class TeacherNet(nn.Module):
    """A ResNet(2+1)D video classifier.

    Args:
        backbone: a torchvision ``VideoResNet`` whose stem takes ``in_channels`` and whose ``fc`` has K outputs.
        arch: the architecture name (kept for checkpoints and reports).
    """

    def __init__(self, backbone: VideoResNet, arch: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.num_features = backbone.fc.in_features
        self.num_classes = backbone.fc.out_features
        self.in_channels = backbone.stem[0].in_channels

    def features(self, x: Tensor) -> Tensor:
        """Pooled features before the classifier.

        Args:
            x: clips ``(B, C, T, H, W)``.

        Returns:
            ``(B, F)`` globally average-pooled features of the last stage.
        """
        b = self.backbone
        x = b.stem(x)
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        # flatten (a reshape) rather than view: the pooled tensor may be channels_last_3d.
        return b.avgpool(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, K)`` of clips ``(B, C, T, H, W)``."""
        return self.backbone.fc(self.features(x))


def adapt_stem_weight(weight: Tensor, in_channels: int) -> Tensor:
    """Adapt an RGB stem kernel ``(O, 3, ...)`` to ``in_channels`` input channels.

    For one channel the RGB kernels are summed, so a grey image ``g`` replicated to RGB gives the same response
    as ``g`` through the summed kernel. For C channels the summed kernel is spread evenly (``sum / C`` each).

    Args:
        weight: the pretrained first convolution weight.
        in_channels: channels of the new input.

    Returns:
        The adapted weight ``(O, in_channels, ...)``.
    """
    if weight.shape[1] == in_channels:
        return weight
    summed = weight.sum(dim=1, keepdim=True)
    reps = [1, in_channels] + [1] * (weight.dim() - 2)
    return (summed / in_channels).repeat(*reps)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise InputError(path, "teacher weights file not found")
    try:
        state: Any
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the user's input problem
        raise InputError(path, f"cannot read teacher weights ({type(e).__name__}: {e})") from None
    # Accept a bare state dict or one nested under a common key.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(path, "teacher weights must be a state dict of tensors")
    return state


def load_pretrained(teacher: TeacherNet, path: str | Path) -> None:
    """Load video weights (e.g. torchvision's Kinetics-400 ``r2plus1d_18``) into ``teacher``'s backbone.

    The stem kernel is adapted to the teacher's input channels (RGB summed for grayscale) and the
    classifier ``fc.*`` is dropped (Kinetics has 400 classes) and keeps its fresh initialisation. Every other
    key must exist with the same shape.

    Args:
        teacher: the network to fill.
        path: a state dict saved with ``torch.save`` (read with ``weights_only=True``) or a safetensors file,
            with torchvision's key names (``stem.0.weight``, ``layer1.0.conv1.0.0.weight``, ...);
            a ``backbone.`` prefix is accepted.

    Raises:
        InputError: unreadable file, missing or unexpected keys, or shape mismatches (named).
    """
    path = Path(path)
    raw = _read_state_dict(path)
    state = {k.removeprefix("backbone."): v for k, v in raw.items()}
    own = teacher.backbone.state_dict()
    if "stem.0.weight" in state:
        state["stem.0.weight"] = adapt_stem_weight(state["stem.0.weight"], teacher.in_channels)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    diff = state_dict_mismatch(state, {k: v for k, v in own.items() if not k.startswith("fc.")})
    if diff is not None:
        kind, k, n = diff
        if kind == "shape":
            raise InputError(
                path,
                f"key {k!r} has shape {tuple(state[k].shape)}, arch {teacher.arch} needs {tuple(own[k].shape)}",
            )
        raise InputError(
            path,
            f"{kind} key {k!r} ({n} {kind})" + (f" for arch {teacher.arch}" if kind == "missing" else ""),
        )
    own.update({k: v.to(own[k].dtype) for k, v in state.items()})
    teacher.backbone.load_state_dict(own, strict=True)


def build_teacher(cfg: TeacherConfig, num_classes: int, in_channels: int = 1) -> TeacherNet:
    """Build the teacher described by ``cfg``.

    Args:
        cfg: the teacher section of the config (``arch``, ``width``, optional local ``weights``).
        num_classes: K, the classifier's outputs.
        in_channels: input channels of the clips (1 for grayscale ultrasound).

    Returns:
        A freshly initialised (or Kinetics-initialised when ``cfg.weights`` is set) :class:`TeacherNet`.

    Raises:
        InputError: ``cfg.weights`` is unreadable or does not fit the architecture.
        ValueError: an unknown architecture or impossible sizes.
    """
    if num_classes < 2 or in_channels < 1:
        raise ValueError(f"need num_classes >= 2 and in_channels >= 1, got {num_classes}, {in_channels}")
    if cfg.arch == "r2plus1d_18":
        backbone = r2plus1d_18(weights=None, num_classes=num_classes)
        if in_channels != 3:
            old = backbone.stem[0]
            new = nn.Conv3d(
                in_channels,
                old.out_channels,
                kernel_size=old.kernel_size,
                stride=old.stride,
                padding=old.padding,
                bias=False,
            )
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            backbone.stem[0] = new
    elif cfg.arch == "r2plus1d_narrow":
        backbone = _NarrowR2Plus1D(cfg.width, num_classes, in_channels)
    else:  # pragma: no cover - the config validator already restricts arch
        raise ValueError(f"unknown teacher arch {cfg.arch!r}")
    teacher = TeacherNet(backbone, cfg.arch)
    if cfg.weights is not None:
        load_pretrained(teacher, cfg.weights)
    return teacher


def teacher_in_channels(cfg: Config) -> int:
    """Input channels of the teacher network: 2 (x, y) for optical flow, else 1 (grey)."""
    return 2 if cfg.teacher.motion == "flow" else 1


def normalise_clips(x: Tensor, cfg: Config) -> Tensor:
    """The teacher's input transform of clips ``(B, C, T, H, W)`` (C = 2 displacement channels for 'flow').

    With ``teacher.motion_input`` each pixel's temporal mean is subtracted: the static anatomy (which differs
    between patients and probes far more than between classes) is removed and the motion that carries the
    sliding sign remains. On the demo cohort a from-scratch R(2+1)D learns the sign from ~100 clips only
    with this input. Kinetics weights instead expect their own frame statistics.
    """
    if cfg.teacher.motion_input:
        if cfg.teacher.motion in ("diff", "flow"):
            # For 'flow' x holds displacements from the first frame: their differences are the motion
            # between consecutive sampled frames, whatever the sampling stride.
            x = x[:, :, 1:] - x[:, :, :-1]
        else:
            x = x - x.mean(dim=2, keepdim=True)
        if cfg.teacher.motion_norm:
            # Each clip's motion to unit RMS: the probe pressure (how far everything moves) varies 2.4x
            # between clips; what separates the classes is how much of it reaches the rectum side.
            x = x / x.pow(2).mean(dim=(1, 2, 3, 4), keepdim=True).sqrt().clamp_min(1e-6)
        return x
    elif cfg.teacher.weights is not None:
        x = (x - KINETICS_GRAY_MEAN) / KINETICS_GRAY_STD
    return x

"""The MRI student (MONAI ``ViT``) and its 3D masked auto-encoder (MONAI ``MaskedAutoEncoderViT``).

Both are thin subclasses of the MONAI networks, so their state-dict keys are MONAI's own (a student's
weights load into a plain ``monai.networks.nets.ViT``). What MONAI does not provide is added here:

* attention through ``torch.nn.functional.scaled_dot_product_attention`` on every ``SABlock``
  (:func:`enable_sdpa`), with attention dropout only in training (MONAI passes ``dropout_p`` on that path
  even in ``eval()``);
* the MAE's ``patchify`` (same patch order as the conv patch embedding), its masked-patch MSE loss with
  optional per-patch normalised targets, and reproducible masks;
* the explicit, strict MAE -> ViT key mapping (:func:`mae_encoder_state`, :func:`load_mae_encoder`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import MaskedAutoEncoderViT, ViT
from torch import Tensor, nn

from endodistill.config import Config, student_vit_spec
from endodistill.errors import ConfigError, InputError
from endodistill.utils import state_dict_mismatch

_DROPOUT_ATTR = "_endodistill_attn_dropout"


def _attention_dropout_hook(module: SABlock, args: tuple) -> None:
    # MONAI's SDPA path passes dropout_p=self.dropout_rate whatever self.training is, so eval() outputs
    # would be random. Set the rate before every call from the training flag.
    module.dropout_rate = getattr(module, _DROPOUT_ATTR) if module.training else 0.0


def enable_sdpa(model: nn.Module, enabled: bool = True) -> int:
    """Switch every MONAI ``SABlock`` in ``model`` to (or from) PyTorch's scaled-dot-product attention.

    On the SDPA path attention dropout is applied in training only (a forward pre-hook sets the rate from
    ``module.training``). Turn SDPA off (``enabled=False``) to use ``save_attn`` (attention maps).

    Args:
        model: any module containing MONAI ``SABlock`` s.
        enabled: use SDPA (True) or MONAI's explicit einsum attention (False).

    Returns:
        The number of attention blocks switched.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, SABlock):
            if enabled and m.save_attn:
                raise ValueError("save_attn needs explicit attention: call enable_sdpa(model, False) first")
            if not hasattr(m, _DROPOUT_ATTR):
                setattr(m, _DROPOUT_ATTR, float(m.dropout_rate))
                m.register_forward_pre_hook(_attention_dropout_hook)
            m.use_flash_attention = enabled
            n += 1
    return n


def _freeze_unused(model: nn.Module) -> None:
    # MONAI builds norm_cross_attn LayerNorms even without cross-attention; they never get a gradient,
    # which breaks DDP (unused parameters). Freezing them keeps the state-dict keys unchanged.
    for name, p in model.named_parameters():
        if ".norm_cross_attn." in name:
            p.requires_grad_(False)


class PatchMLPStem(nn.Module):
    """A non-linear, patch-local patch embedding: a two-layer MLP on each flattened patch.

    MONAI's embedding is one linear map per patch. A hidden layer with a GELU lets each token encode
    non-linear patterns of its patch (edges, blobs) before attention mixes tokens. A 3x3x3 convolutional stem
    (Xiao et al., NeurIPS 2021) was measured first and dropped: on the 2-core CPU, forward and backward of
    one 16-channel 3x3x3 convolution over a demo batch took 313 ms against 12 ms for this MLP. Being
    patch-local, the MAE's masked patches stay hidden from the encoder. Hand-written: MONAI has no
    non-linear patch embedding.

    Args:
        in_channels: input channels.
        patch_size: patch size ``(p0, p1, p2)``.
        hidden_size: token width.
        width: width of the MLP's hidden layer.
    """

    def __init__(
        self, in_channels: int, patch_size: tuple[int, int, int], hidden_size: int, width: int
    ) -> None:
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.fc1 = nn.Linear(in_channels * int(np.prod(self.patch_size)), width)
        self.fc2 = nn.Linear(width, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, D0, D1, D2)`` -> ``(B, hidden, g0, g1, g2)``, the layout of MONAI's conv embedding."""
        p0, p1, p2 = self.patch_size
        # Same within-patch order as MAE.patchify: (p0 p1 p2 c).
        patches = rearrange(x, "b c (g0 p0) (g1 p1) (g2 p2) -> b g0 g1 g2 (p0 p1 p2 c)", p0=p0, p1=p1, p2=p2)
        tokens = self.fc2(torch.nn.functional.gelu(self.fc1(patches)))
        return tokens.permute(0, 4, 1, 2, 3)


class PatchConv3d(nn.Conv3d):
    """MONAI's patch embedding (a ``Conv3d`` whose kernel equals its stride) computed as one matrix product.

    Same parameters, state-dict keys and output as the convolution it replaces, to rounding. With kernel ==
    stride every output voxel is the dot product of one non-overlapping patch with the kernel, so a reshape
    and one ``linear`` do the work. On the CPU oneDNN's backward of this strided convolution cost about 4 ms
    of a 20 ms demo student step (``benchmarks/bench_speedups.py``). Hand-written: neither PyTorch nor MONAI
    picks the matrix product for this case. The output is a permuted view of the ``linear`` result, so
    MONAI's ``flatten(2).transpose(-1, -2)`` after it copies nothing.
    """

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, D0, D1, D2)`` -> ``(B, out_channels, g0, g1, g2)``, as ``nn.Conv3d``."""
        p0, p1, p2 = self.kernel_size
        # The kernel's own order (c p0 p1 p2), so the weight is used as stored.
        patches = rearrange(x, "b c (g0 p0) (g1 p1) (g2 p2) -> b g0 g1 g2 (c p0 p1 p2)", p0=p0, p1=p1, p2=p2)
        tokens = nn.functional.linear(patches, self.weight.flatten(1), self.bias)
        return tokens.permute(0, 4, 1, 2, 3)


def _set_stem(model: nn.Module, stem: str, stem_width: int) -> None:
    # The stem replaces MONAI's `patch_embeddings` inside its PatchEmbeddingBlock, so the block's
    # flatten + position embedding (and the MAE's masking after it) are MONAI's own.
    pe: Any = (
        model.patch_embedding
    )  # MONAI's PatchEmbeddingBlock (nn.Module attributes type as Tensor | Module)
    conv = pe.patch_embeddings
    if stem == "linear":
        if tuple(conv.kernel_size) != tuple(conv.stride) or any(int(p) != 0 for p in conv.padding):
            return
        fast = PatchConv3d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            bias=conv.bias is not None,
        )
        fast.load_state_dict(conv.state_dict())
        pe.patch_embeddings = fast
        return
    pe.patch_embeddings = PatchMLPStem(
        conv.in_channels, tuple(conv.kernel_size), conv.out_channels, stem_width
    )


class StudentViT(ViT):
    """MONAI's 3D ``ViT`` classifier returning logits only (no ``Tanh``), with SDPA attention.

    The classification head reads the cls token (token 0) after the final LayerNorm, as MONAI's ``ViT`` does,
    or (``pool="mean"``) the mean of the patch tokens (Beyer et al., "Better plain ViT baselines").

    Args:
        in_channels: input channels of the volume.
        img_size: volume size ``(D0, D1, D2)``.
        patch_size: patch size, dividing ``img_size``.
        hidden_size: token width.
        mlp_dim: MLP width of each block.
        num_layers: transformer blocks.
        num_heads: attention heads.
        num_classes: K.
        dropout_rate: dropout in embeddings, attention and MLPs.
        qkv_bias: bias in the qkv projection.
        sdpa: use scaled-dot-product attention.
        stem: ``linear`` (MONAI's strided conv) or ``mlp`` (:class:`PatchMLPStem`).
        stem_width: hidden width of the MLP stem.
        pool: ``cls`` or ``mean`` (what the head reads).
    """

    def __init__(
        self,
        in_channels: int,
        img_size: tuple[int, int, int],
        patch_size: tuple[int, int, int],
        hidden_size: int,
        mlp_dim: int,
        num_layers: int,
        num_heads: int,
        num_classes: int,
        dropout_rate: float = 0.0,
        qkv_bias: bool = True,
        sdpa: bool = True,
        stem: str = "linear",
        stem_width: int = 96,
        pool: str = "cls",
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            img_size=img_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type="conv",
            classification=True,
            num_classes=num_classes,
            dropout_rate=dropout_rate,
            spatial_dims=3,
            post_activation=None,
            qkv_bias=qkv_bias,
        )
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.pool = pool
        if pool == "flat":
            n_tokens = int(np.prod([i // p for i, p in zip(img_size, patch_size)]))
            # MONAI annotates its head as nn.Sequential; a flat head is one Linear.
            self.classification_head = nn.Linear(n_tokens * hidden_size, num_classes)  # type: ignore[assignment]
        _set_stem(self, stem, stem_width)
        _freeze_unused(self)
        if sdpa:
            enable_sdpa(self)

    def encode(self, x: Tensor) -> Tensor:
        """Tokens after the final LayerNorm.

        Args:
            x: volumes ``(B, C, *img_size)``.

        Returns:
            ``(B, N + 1, hidden)``: the cls token first, then the N patch tokens in patch-embedding order.
        """
        x = self.patch_embedding(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, K)`` of volumes ``(B, C, *img_size)`` (head on the cls or mean token)."""
        tokens = self.encode(x)
        if self.pool == "flat":
            return self.classification_head(tokens[:, 1:].flatten(1))
        return self.classification_head(tokens[:, 1:].mean(1) if self.pool == "mean" else tokens[:, 0])


def _encoder_kwargs(cfg: Config) -> dict[str, Any]:
    """Encoder hyper-parameters the classifier and the MAE must share (so MAE weights load into the ViT)."""
    return {**student_vit_spec(cfg), "stem": cfg.student.stem, "stem_width": cfg.student.stem_width}


def build_student(cfg: Config) -> StudentViT:
    """Build the MRI student from ``cfg.student``, ``cfg.mri.size`` and ``cfg.task.num_classes``."""
    return StudentViT(
        **_encoder_kwargs(cfg),
        num_classes=cfg.task.num_classes,
        dropout_rate=cfg.student.dropout,
        pool=cfg.student.pool,
    )


class MAE(MaskedAutoEncoderViT):
    """MONAI's 3D ``MaskedAutoEncoderViT`` with a patchify, a masked-patch MSE loss and seeded masks.

    MONAI draws the kept patches with ``torch.multinomial`` on the global CPU RNG. ``forward`` accepts a
    ``torch.Generator``: when given, the mask is drawn from a seed taken from it inside
    ``torch.random.fork_rng`` (the global RNG is left untouched); otherwise the global CPU RNG is used, which
    ``seed_everything`` makes reproducible too. Everything else (dropout) uses the usual RNGs.

    Args:
        norm_pix_loss: regress per-patch normalised pixels (zero mean, unit variance per patch).
        **kwargs: passed to ``MaskedAutoEncoderViT``.
    """

    def __init__(
        self,
        *,
        norm_pix_loss: bool = False,
        sdpa: bool = True,
        stem: str = "linear",
        stem_width: int = 96,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        _set_stem(self, stem, stem_width)
        self.norm_pix_loss = norm_pix_loss
        self.in_channels = int(kwargs.get("in_channels", 1))  # type: ignore[call-overload]
        self._mask_generator: torch.Generator | None = None
        _freeze_unused(self)
        if sdpa:
            enable_sdpa(self)

    @property
    def num_layers(self) -> int:
        """Encoder transformer blocks (``blocks`` also holds the final LayerNorm)."""
        return len(self.blocks) - 1

    # Eager even when the MAE is compiled: Inductor would draw the mask from its own RNG, so the masks
    # (and the loss curve) would differ from an eager run with the same seed.
    @torch.compiler.disable
    def _masking(self, x: Tensor, masking_ratio: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if self._mask_generator is None:
            return super()._masking(x, masking_ratio=masking_ratio)
        seed = int(torch.randint(0, 2**62, (1,), generator=self._mask_generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return super()._masking(x, masking_ratio=masking_ratio)

    def patchify(self, x: Tensor) -> Tensor:
        """Cut volumes into flattened patches in the token order of the conv patch embedding.

        The conv embedding's output ``(B, hidden, g0, g1, g2)`` is flattened row-major over the grid, so patch
        ``(i, j, k)`` is token ``(i * g1 + j) * g2 + k``; inside a patch the values are ordered
        ``(p0, p1, p2, channel)``, the order ``decoder_pred`` outputs are read in.

        Args:
            x: volumes ``(B, C, *img_size)``.

        Returns:
            ``(B, N, prod(patch_size) * C)``.
        """
        p0, p1, p2 = self.patch_size
        return rearrange(x, "b c (g0 p0) (g1 p1) (g2 p2) -> b (g0 g1 g2) (p0 p1 p2 c)", p0=p0, p1=p1, p2=p2)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """Inverse of :meth:`patchify`: ``(B, N, P * C)`` -> ``(B, C, *img_size)``."""
        p0, p1, p2 = self.patch_size
        g0, g1, g2 = (s // p for s, p in zip(self.img_size, self.patch_size))
        return rearrange(
            patches,
            "b (g0 g1 g2) (p0 p1 p2 c) -> b c (g0 p0) (g1 p1) (g2 p2)",
            g0=g0,
            g1=g1,
            g2=g2,
            p0=p0,
            p1=p1,
            p2=p2,
        )

    def loss(self, x: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error over the masked patches only.

        Args:
            x: the input volumes ``(B, C, *img_size)``.
            pred: decoder predictions ``(B, N, P * C)``.
            mask: ``(B, N)``, 1 where a patch was masked (hidden from the encoder), 0 where visible.

        Returns:
            A scalar: per-patch MSE averaged over masked patches (visible patches do not count).
        """
        target = self.patchify(x)
        if self.norm_pix_loss:
            # (t - mean) / sqrt(biased var + 1e-6) per patch is layer_norm's formula (without affine): one
            # fused kernel, about 10x faster on CPU than four passes written out (equal up to rounding).
            target = torch.nn.functional.layer_norm(target, target.shape[-1:], eps=1.0e-6)
        # mse_loss(reduction="none") is the same squared error in one kernel (and one in backward).
        per_patch = torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=-1)
        m = mask.to(per_patch.dtype)
        return (per_patch * m).sum() / m.sum().clamp_min(1.0)

    def forward(
        self, x: Tensor, masking_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mask, encode the visible patches, reconstruct all of them.

        Args:
            x: volumes ``(B, C, *img_size)``.
            masking_ratio: overrides the configured ratio for this call.
            generator: draws the mask reproducibly without touching the global RNG (see the class docs).

        Returns:
            ``(loss, pred (B, N, P * C), mask (B, N) with 1 = masked)``.
        """
        self._mask_generator = generator
        try:
            pred, mask = super().forward(x, masking_ratio=masking_ratio)
        finally:
            self._mask_generator = None
        return self.loss(x, pred, mask), pred, mask

    def encode(self, x: Tensor) -> Tensor:
        """The encoder on ALL patches (no masking): ``(B, N + 1, hidden)`` after the final LayerNorm.

        This is what the student's :meth:`StudentViT.encode` computes once the MAE encoder is loaded.
        """
        x = self.patch_embedding(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.blocks(torch.cat((cls, x), dim=1))


def build_mae(cfg: Config) -> MAE:
    """Build the MAE whose encoder matches :func:`build_student` (``cfg.student``, ``cfg.mae``).

    The decoder MLP is 4 x ``decoder_hidden_size`` wide (the usual ViT ratio); the MAE runs without dropout.

    Raises:
        ConfigError: decoder sizes MONAI cannot build, or a masking ratio that keeps or hides no patch.
    """
    s, m = cfg.student, cfg.mae
    if m.decoder_hidden_size % 6:
        raise ConfigError("mae.decoder_hidden_size", "must be divisible by 6 (3D sin-cos position embedding)")
    if m.decoder_hidden_size % m.decoder_heads:
        raise ConfigError("mae.decoder_hidden_size", "must be divisible by mae.decoder_heads")
    n_patches = int(np.prod([a // p for a, p in zip(cfg.mri.size, s.patch_size)]))
    keep = int((1 - m.mask_ratio) * n_patches)  # MONAI's own rounding
    if keep < 1 or keep >= n_patches:
        raise ConfigError(
            "mae.mask_ratio", f"{m.mask_ratio} keeps {keep} of {n_patches} patches: at least one must be kept"
        )
    return MAE(
        **_encoder_kwargs(cfg),
        norm_pix_loss=m.norm_pix_loss,
        masking_ratio=m.mask_ratio,
        decoder_hidden_size=m.decoder_hidden_size,
        decoder_mlp_dim=4 * m.decoder_hidden_size,
        decoder_num_layers=m.decoder_layers,
        decoder_num_heads=m.decoder_heads,
        proj_type="conv",
        dropout_rate=0.0,
        spatial_dims=3,
    )


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def encoder_state_from_mae_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map a ``MaskedAutoEncoderViT`` state dict to ``ViT`` encoder keys.

    ``patch_embedding.*``, ``cls_token`` and ``blocks.i.*`` keep their names; the MAE's final encoder
    LayerNorm ``blocks.{num_layers}.{weight,bias}`` becomes ``norm.{weight,bias}``; ``decoder_*`` and
    ``mask_tokens`` are dropped. Any other key is an error (a MONAI change must not go unnoticed).

    Raises:
        ValueError: an unknown key, or no final LayerNorm where expected.
    """
    indices = [int(mt.group(1)) for k in state if (mt := _BLOCK_KEY.match(k))]
    if not indices:
        raise ValueError("not an MAE state dict: no 'blocks.*' keys")
    last = max(indices)
    last_keys = {_BLOCK_KEY.match(k).group(2) for k in state if k.startswith(f"blocks.{last}.")}  # type: ignore[union-attr]
    if last_keys != {"weight", "bias"}:
        raise ValueError(
            f"expected the encoder's final LayerNorm at 'blocks.{last}.', found {sorted(last_keys)}"
        )
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        mt = _BLOCK_KEY.match(k)
        if k.startswith("decoder_") or k == "mask_tokens":
            continue
        if mt and int(mt.group(1)) == last:
            out[f"norm.{mt.group(2)}"] = v
        elif mt or k == "cls_token" or k.startswith("patch_embedding."):
            out[k] = v
        else:
            raise ValueError(f"unknown MAE key {k!r}: no mapping to the ViT encoder")
    return out


def mae_encoder_state(mae: MAE) -> dict[str, Tensor]:
    """The MAE's encoder weights under ``ViT`` key names (detached copies, ready for safetensors)."""
    return {
        k: v.detach().clone().contiguous() for k, v in encoder_state_from_mae_state(mae.state_dict()).items()
    }


def load_mae_encoder(
    student: StudentViT,
    mae_state: Mapping[str, Tensor],
    source: str | Path | None = None,
    skip: tuple[str, ...] = ("classification_head.",),
) -> None:
    """Load MAE encoder weights into ``student`` (everything but its classification head), strictly.

    Args:
        student: the classifier to initialise.
        mae_state: :func:`mae_encoder_state` output (ViT key names) or a raw MAE state dict (mapped with
            :func:`encoder_state_from_mae_state`).
        source: where the weights came from, named in errors (e.g. ``encoder.safetensors``).
        skip: prefixes of the student's own keys that the MAE does not provide (kept as they are).

    Raises:
        InputError: a missing or unexpected key, or a shape mismatch (the first one is named): the MAE and
            the student were built with different architectures. Nothing is loaded then.
    """
    where = str(source) if source is not None else "MAE encoder weights"
    state = dict(mae_state)
    if "mask_tokens" in state or any(k.startswith("decoder_") for k in state):
        try:
            state = encoder_state_from_mae_state(state)
        except ValueError as e:
            raise InputError(where, str(e)) from None
    own = student.state_dict()
    expected = {k: v for k, v in own.items() if not k.startswith(skip)}
    diff = state_dict_mismatch(state, expected)
    if diff is not None:
        kind, k, n = diff
        if kind == "shape":
            raise InputError(
                where, f"key {k!r} has shape {tuple(state[k].shape)}, the student needs {tuple(own[k].shape)}"
            )
        raise InputError(where, f"{kind} key {k!r} ({n} {kind}): architectures differ")
    merged = dict(own)
    merged.update({k: state[k].to(dtype=own[k].dtype) for k in expected})
    student.load_state_dict(merged, strict=True)

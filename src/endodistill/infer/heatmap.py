"""Explanation heatmaps for the MRI student: attention rollout (Abnar & Zuidema, ACL 2020).

Which method and why:

* **Attention rollout** follows how much of each patch token flows into the cls token, the only token the
  classification head reads. Each block's head-averaged attention ``A`` is mixed with the identity of
  the residual connection (``0.5 A + 0.5 I``, rows renormalised) and the per-block matrices are
  multiplied from the first block to the last; the cls row of the product, without its own entry, is the
  map over the patch grid. A student whose head reads the patch tokens (``student.pool`` ``mean`` or
  ``flat``) gets the mean of the patch rows instead: how much each input patch flows into the tokens the
  head reads (for ``flat`` the head's own per-token weights are not included).
* Gradient methods were considered and not used: Grad-CAM on the last block's patch tokens is zero by
  construction (the head only reads the cls token, so the last block's patch outputs get no gradient),
  and input-gradient maps of a small ViT are dominated by patch-border noise. Rollout needs no backward
  pass (cheaper, no autograd state) and is deterministic on CPU.
* The limitation: rollout is class-agnostic. It says where the model looked, not whether that region
  argued for or against obliteration. With two classes that is the same region either way.

The attention matrices are computed here by hand from each block's ``norm1`` and ``qkv`` weights,
because the student uses PyTorch's scaled-dot-product attention (MONAI's ``SABlock`` with
``use_flash_attention``), which never materialises the attention weights; MONAI's ``save_attn`` only works
on its slower einsum path and would need the model to be rebuilt. The hand-written softmax(q k^T * scale)
follows MONAI's ``SABlock`` layout (qkv split as ``(qkv, heads, dim)``) and is checked against MONAI's own
``save_attn`` in the tests.

The token map is upsampled to the model grid ``(*cfg.mri.size)`` with trilinear interpolation (each token
is one patch) and mapped back to the source voxel grid by ``endodistill.data.preprocess.to_source_grid``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _vit_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, Tensor | None]:
    """The patch embedding, transformer blocks and cls token of a MONAI-style ViT."""
    for attr in ("patch_embedding", "blocks"):
        if not hasattr(model, attr):
            raise TypeError(f"{type(model).__name__} has no '{attr}': not a MONAI ViT")
    emb, blocks = model.patch_embedding, model.blocks
    if not isinstance(emb, nn.Module) or not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__}'s patch_embedding and blocks are not modules: not a MONAI ViT"
        )
    cls = getattr(model, "cls_token", None)
    return emb, blocks, cls


def block_attention(block: nn.Module, x: Tensor) -> Tensor:
    """Attention probabilities of one MONAI ``TransformerBlock`` on its input tokens.

    Args:
        block: a ``TransformerBlock`` (``norm1`` then ``attn`` with a combined ``qkv`` linear).
        x: the block's input tokens ``(B, N, hidden)``.

    Returns:
        ``(B, heads, N, N)`` row-stochastic attention weights.
    """
    # nn.Module's attributes type as Tensor | Module: these are MONAI's SABlock and LayerNorm, read by name
    attn: Any = block.attn
    norm1: Any = block.norm1
    if not getattr(attn, "use_combined_linear", True) or getattr(attn, "rel_positional_embedding", None):
        raise TypeError(
            "attention rollout supports MONAI SABlocks with a combined qkv and no relative positions"
        )
    heads, dim_head = attn.num_heads, attn.dim_head
    qkv = attn.qkv(norm1(x))  # (B, N, 3 * heads * dim_head), ordered (qkv, head, dim) like MONAI's
    b, n, _ = qkv.shape
    qkv = qkv.reshape(b, n, 3, heads, dim_head).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, dim_head)
    q, k = qkv[0], qkv[1]
    if attn.attention_dtype is not None:
        q, k = q.to(attn.attention_dtype), k.to(attn.attention_dtype)
    return (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)


@torch.no_grad()
def attention_rollout(model: nn.Module, x: Tensor, residual: float = 0.5) -> Tensor:
    """Rollout of the cls token's attention onto the patch grid.

    Args:
        model: the student (a MONAI ``ViT`` with a cls token), in eval mode.
        x: volumes ``(B, 1, *img_size)``.
        residual: weight of the identity (the residual path) mixed into each block's attention.

    Returns:
        ``(B, g0, g1, g2)`` non-negative relevance per patch (patch-embedding order, not normalised).
    """
    embed, blocks, cls = _vit_parts(model)
    if cls is None:
        raise TypeError("attention rollout needs a cls token")
    tokens = embed(x)
    tokens = torch.cat((cls.expand(tokens.shape[0], -1, -1), tokens), dim=1)
    n = tokens.shape[1]
    eye = torch.eye(n, dtype=tokens.dtype, device=tokens.device)
    rollout = eye.expand(tokens.shape[0], n, n)
    for blk in blocks:
        a = block_attention(blk, tokens).mean(dim=1)
        a = residual * eye + (1.0 - residual) * a
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout
        tokens = blk(tokens)
    grid = [s // p for s, p in zip(x.shape[2:], _patch_size(embed))]
    if getattr(model, "pool", "cls") == "cls":
        return rollout[:, 0, 1:].reshape(x.shape[0], *grid)
    return rollout[:, 1:, 1:].mean(dim=1).reshape(x.shape[0], *grid)


def _patch_size(embed: nn.Module) -> tuple[int, ...]:
    conv = getattr(embed, "patch_embeddings", None)
    ks = getattr(conv, "patch_size", None) or getattr(conv, "kernel_size", None)
    if ks is None:
        raise TypeError("attention rollout needs MONAI's conv patch embedding (proj_type='conv')")
    return tuple(int(k) for k in ks)


def normalise(m: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] (a constant map becomes zeros)."""
    m = m.astype(np.float32)
    lo, hi = float(m.min()), float(m.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


def heatmap_model_space(model: nn.Module, x: Tensor) -> np.ndarray:
    """Attention-rollout heatmap of one preprocessed volume on the model grid.

    Args:
        model: the student in eval mode.
        x: one preprocessed volume ``(1, 1, *img_size)`` (or ``(1, *img_size)``).

    Returns:
        ``(*img_size)`` float32 in [0, 1] (1 = the patch that contributes most to the cls token).
    """
    if x.dim() == 4:
        x = x[None]
    tokens = attention_rollout(model, x)  # (1, g0, g1, g2)
    up = F.interpolate(tokens[:, None], size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
    return normalise(up[0, 0].cpu().numpy())

"""The joint model: one classifier for MRI volumes and TVUS clips (methods of ``kind: joint``).

The follow-up of the seed paper (Zhang et al., "Unpaired multi-modal training and single-modal testing for
detecting signs of endometriosis", CMIG 124, 2025) trains one classifier on unpaired TVUS and MRI and tests
it on whichever modality a patient has; its code and architecture details are not public. Every choice here
is ours:

* the MRI path is the student's ViT unchanged (:class:`~endodistill.models.student.StudentViT`: MONAI's 3D
  patch embedding with its learnable position embedding, cls token, transformer blocks, final LayerNorm),
  so an MAE encoder loads into it exactly as into the student (:func:`load_mae_into_joint`) and the state
  keys of the MRI path are the student's;
* the clip path has its own tokenizer (:class:`ClipTokenizer`): a tubelet embedding (one strided 3D
  convolution over ``frames x ph x pw`` tubelets of the motion-transformed clip, as ViViT's), a LayerNorm
  (motion inputs are about 10x smaller than MRI intensities: the norm puts both token streams on one
  scale) and a learnable position embedding of its own (which also tells the shared blocks which modality
  a token comes from);
* both token streams get the same cls token and go through the same blocks, final norm and head; the head
  reads the cls token or the mean of the tokens (``joint.pool``), never a flattened token grid (MRI and
  clip token positions do not correspond);
* ``forward(x)`` is the MRI path (so model selection, attention rollout and the MRI predict path work as
  for the student); ``forward_clip(x)`` takes a clip as the teacher reads it (grey frames in [0, 1], or
  optical-flow displacements with ``teacher.motion: flow``), ``(B, C, T, H, W)``, and applies the teacher's
  motion transform itself (so deployment and the ONNX export need no extra step).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from endodistill.config import Config, clip_input_shape, joint_clip_frames
from endodistill.models.student import PatchConv3d, StudentViT, _encoder_kwargs, load_mae_encoder
from endodistill.models.teacher import normalise_clips

CLIP_PREFIX = "clip_embedding."


class ClipTokenizer(nn.Module):
    """Tubelet embedding of a clip: strided Conv3d, LayerNorm, learnable position embedding, dropout.

    Args:
        frames: input frames (after the motion transform).
        size: frame size ``(H, W)``.
        tubelet: ``(t, ph, pw)`` dividing ``(frames, H, W)``.
        hidden_size: token width.
        dropout_rate: dropout after the position embedding (MONAI's embedding does the same).
        in_channels: 1 for grey frames, 2 for optical-flow displacements (``teacher.motion: flow``).
    """

    def __init__(
        self,
        frames: int,
        size: tuple[int, int],
        tubelet: tuple[int, int, int],
        hidden_size: int,
        dropout_rate: float = 0.0,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        grid = (frames // tubelet[0], size[0] // tubelet[1], size[1] // tubelet[2])
        self.grid = grid
        self.n_tokens = int(np.prod(grid))
        # Kernel == stride: one matrix product per tubelet, as the MRI patch embedding (PatchConv3d).
        self.proj = PatchConv3d(in_channels, hidden_size, kernel_size=tubelet, stride=tubelet)
        self.norm = nn.LayerNorm(hidden_size)
        self.position_embeddings = nn.Parameter(torch.zeros(1, int(np.prod(grid)), hidden_size))
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, z: Tensor) -> Tensor:
        """``(B, C, frames, H, W)`` motion-transformed clips -> ``(B, N, hidden)`` tokens."""
        t = self.proj(z)
        tokens = t.reshape(t.shape[0], t.shape[1], self.n_tokens).transpose(1, 2)
        return self.dropout(self.norm(tokens) + self.position_embeddings)


class JointViT(StudentViT):
    """The student's ViT with a second tokenizer for clips; blocks, norm and head are shared.

    Args:
        cfg: the run config (``cfg.student`` sizes, ``cfg.joint`` clip tokenizer and pool, the teacher's
            motion transform for :meth:`forward_clip`).
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__(
            **_encoder_kwargs(cfg),
            num_classes=cfg.task.num_classes,
            dropout_rate=cfg.student.dropout,
            pool=cfg.joint.pool,
        )
        frames = joint_clip_frames(cfg)
        j = cfg.joint
        tubelet = (j.tubelet_frames or frames, *j.clip_patch)
        c, _, h, w = clip_input_shape(cfg)
        self.clip_embedding = ClipTokenizer(
            frames, (h, w), tubelet, cfg.student.hidden_size, cfg.student.dropout, in_channels=c
        )
        # The motion transform of forward_clip (the teacher's; the config is plain data, not a module).
        self.cfg = cfg

    def _tokens(self, tokens: Tensor) -> Tensor:
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat((cls, tokens), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def pooled(self, tokens: Tensor) -> Tensor:
        """What the head reads: the cls token or the mean of the other tokens, ``(B, hidden)``."""
        return tokens[:, 1:].mean(1) if self.pool == "mean" else tokens[:, 0]

    def features(self, x: Tensor) -> Tensor:
        """Shared features ``(B, hidden)`` of volumes ``(B, 1, *mri.size)``."""
        return self.pooled(self.encode(x))

    def clip_features(self, z: Tensor) -> Tensor:
        """Shared features ``(B, hidden)`` of motion-transformed clips (:func:`~endodistill.models.teacher.normalise_clips` output)."""
        return self.pooled(self._tokens(self.clip_embedding(z)))

    def forward_clip(self, x: Tensor) -> Tensor:
        """Class logits ``(B, K)`` of clips as the teacher reads them (:func:`~endodistill.config.clip_input_shape`)."""
        return self.classification_head(self.clip_features(normalise_clips(x, self.cfg)))


class ClipPath(nn.Module):
    """A joint model's clip path as a module whose ``forward`` is :meth:`JointViT.forward_clip`."""

    def __init__(self, net: JointViT) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_clip(x)


def build_joint(cfg: Config) -> JointViT:
    """Build the joint model from ``cfg.student``, ``cfg.joint``, ``cfg.mri``, ``cfg.tvus``."""
    return JointViT(cfg)


def load_mae_into_joint(
    net: JointViT, mae_state: Mapping[str, Tensor], source: str | Path | None = None
) -> None:
    """Initialise the MRI tokenizer and the shared transformer (cls token, blocks, norm) from an MAE encoder.

    The clip tokenizer and the head keep their random initialisation. Same strict key and shape checks as
    :func:`~endodistill.models.student.load_mae_encoder`.
    """
    load_mae_encoder(net, mae_state, source=source, skip=("classification_head.", CLIP_PREFIX))

"""Post-fit inference helpers: batched logits on the CPU, and where inference runs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from endodistill.config import Config


@torch.no_grad()
def predict_logits(
    model: Callable[[Tensor], Tensor], x: Tensor, batch_size: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Logits of ``model`` on ``x`` in batches (eval mode is the caller's job), on the CPU."""
    outs = []
    for i in range(0, x.shape[0], batch_size):
        outs.append(model(x[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def inference_device(cfg: Config) -> torch.device:
    """Where to run post-fit inference (teacher outputs, test predictions): the GPU when training used one."""
    if cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter."""
    return next(model.parameters()).device

"""Speed switches of the training stages: ``channels_last_3d`` for the video teacher, optional ``torch.compile``.

Both are decided from the configuration (and the process's thread count), never from timings taken during a
run, so a rerun with the same settings takes the same code paths and CPU results stay bit-identical.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from endodistill.config import Config

log = logging.getLogger("endodistill")

# torch.compile availability per device type: None when it works, else the first line of the error.
_COMPILE_PROBE: dict[str, str | None] = {}


def teacher_channels_last(cfg: Config, device: torch.device | str) -> bool:
    """Whether the teacher runs in ``channels_last_3d`` (weights and inputs) on ``device``.

    ``teacher.channels_last`` true/false is obeyed. ``"auto"`` follows what was measured (see the field's
    description): on for CUDA (cuDNN's channels-last 3D kernels); on CPU when oneDNN runs every convolution
    of the network, i.e. with more than one thread or a batch of at least 16. With one thread and a smaller
    batch PyTorch runs the temporal ``3x1x1`` convolutions with its own im2col kernel, which needs
    contiguous inputs, and channels-last only adds copies.

    Args:
        cfg: the run configuration (``teacher.channels_last``, ``teacher.batch_size``).
        device: where the teacher trains or runs.

    Returns:
        True to convert the network and its inputs to ``torch.channels_last_3d``.
    """
    mode = cfg.teacher.channels_last
    if mode != "auto":
        return bool(mode)
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    if kind == "cpu":
        return torch.get_num_threads() > 1 or cfg.teacher.batch_size >= 16
    return False


def _compile_error(device: torch.device) -> str | None:
    """None when ``torch.compile`` (Inductor) builds and runs a kernel on ``device``, else the error line.

    Inductor fails only at the first call (no C++ compiler, no Triton, ...), which inside a Lightning fit
    would abort training. A tiny function is compiled once per device type instead, so a missing toolchain
    falls back to eager training before the fit starts.
    """
    key = device.type
    if key not in _COMPILE_PROBE:
        try:
            fn = torch.compile(lambda t: torch.relu(t * 2.0 - 1.0))
            fn(torch.ones(8, device=device, requires_grad=True)).sum().backward()
            _COMPILE_PROBE[key] = None
        except Exception as e:  # any backend failure means "not available here"
            lines = str(e).strip().splitlines() or [""]
            _COMPILE_PROBE[key] = f"{type(e).__name__}: {lines[0]}"
    return _COMPILE_PROBE[key]


def compile_if_enabled(net: nn.Module, cfg: Config, device: torch.device | str | None = None) -> nn.Module:
    """Compile ``net`` in place with ``torch.compile`` (default mode) when ``trainer.compile`` is true.

    ``nn.Module.compile`` compiles the module's ``__call__`` and keeps the module itself, so its state-dict
    keys (saved weights, checkpoints) get no ``_orig_mod.`` prefix. Methods other than ``forward`` (e.g. the
    teacher's ``features`` used for inference) stay eager. When Inductor cannot run on ``device`` a one-line
    warning is logged and the network trains eagerly.

    Args:
        net: the network to train.
        cfg: the run configuration (``trainer.compile``).
        device: where it trains (default: the device of its first parameter).

    Returns:
        ``net`` itself (compiled or not), for chaining.
    """
    if not cfg.trainer.compile:
        return net
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    err = _compile_error(dev)
    if err is not None:
        log.warning(
            "trainer.compile: torch.compile is unavailable on %s (%s); training eagerly", dev.type, err
        )
        return net
    net.compile()
    return net

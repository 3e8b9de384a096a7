"""Model weights on disk: safetensors state dicts (no pickle), written atomically, read safely.

Here rather than in train/ because inference (infer/) loads the same files without the training code.
"""

from __future__ import annotations

import errno
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from endodistill.errors import InputError
from endodistill.utils import atomic_path


def save_weights(path: str | Path, state: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors, atomically (tensors made contiguous, shared storage split).

    Written straight from the tensors (no copy of the state, no in-memory file): a ViT-B state (350 MB)
    takes about 0.3 s instead of 1 s. A full disk is reported as the usual one-line error naming ``path``.
    """
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors sharing storage (tied weights, views): only those are copied.
        tensors[k] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as e:  # safetensors reports I/O errors as its own exception type
            if "No space left" in str(e) or "os error 28" in str(e) or "StorageFull" in str(e):
                raise OSError(errno.ENOSPC, "No space left on device") from e
            raise


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors state dict.

    Raises:
        InputError: missing or unreadable file.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "weights file not found")
    try:
        return load_file(str(p))
    except Exception as e:
        raise InputError(p, f"unreadable safetensors file ({type(e).__name__})") from None

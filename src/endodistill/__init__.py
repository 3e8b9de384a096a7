"""endodistill: distil ultrasound (TVUS) knowledge into an MRI classifier (arXiv 2307.02000)."""

from __future__ import annotations

__version__ = "0.1.0"

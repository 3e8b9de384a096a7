"""The synthetic pelvic cohort: sagittal T2 MRI volumes and TVUS sliding-sign clips with known latent signs.

Public interface: :func:`generate_cohort` (writes the cohort, returns the cohort.json content),
:func:`format_summary`, :func:`plan_cohort` (subjects and labels without rendering) and the preset table
:data:`PRESETS`.
"""

from __future__ import annotations

from endodistill.data.synthetic.cohort import PlannedSubject, format_summary, generate_cohort, plan_cohort
from endodistill.data.synthetic.presets import PRESETS, MRISite, Preset, get_preset
from endodistill.data.synthetic.signs import MRI_SIGNS, mri_oracle, population_ceilings, tvus_oracle

__all__ = [
    "MRI_SIGNS",
    "PRESETS",
    "MRISite",
    "PlannedSubject",
    "Preset",
    "format_summary",
    "generate_cohort",
    "get_preset",
    "mri_oracle",
    "plan_cohort",
    "population_ceilings",
    "tvus_oracle",
]

"""The run and study reports, built from the files a run (or a study) leaves on disk.

* :mod:`.load`: every file the report reads from a run directory (and nothing outside it);
* :mod:`.tables`: the tables and sentences as display strings (numbers: :mod:`endodistill.evaluate.fmt`);
* :mod:`.figures`: the matplotlib figures, headless, as base64 PNG;
* :mod:`.build`: ``report.html`` / ``report.md`` from the Jinja2 templates in ``templates/``;
* :mod:`.study`: ``study.html`` / ``study.md`` of a study.

Layering: this package reads files and uses pure statistics (``endodistill.evaluate``); it imports neither
``endodistill.train`` nor ``endodistill.experiment``.
"""

from endodistill.report.build import SECTION_IDS, SECTIONS, rebuild_report, render_report, write_report
from endodistill.report.tables import format_ablation_table

__all__ = [
    "SECTIONS",
    "SECTION_IDS",
    "format_ablation_table",
    "rebuild_report",
    "render_report",
    "write_report",
]

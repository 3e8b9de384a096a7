"""The report on a fabricated run directory: every section, self-contained HTML, the Markdown table."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from endodistill.errors import InputError
from endodistill.evaluate.stats import compare_methods, nan_to_none, summarise_methods
from endodistill.report import SECTION_IDS, format_ablation_table, write_report

if TYPE_CHECKING:
    from conftest import RunFiles


METHODS = ["scratch_ce", "mae_ce", "scratch_kd_ce", "mae_kd", "mae_kd_ce"]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _fake_run(run_files: RunFiles, root: Path, manifest: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    run = root / "run"
    n = 40
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    rows = []
    for k, m in enumerate(METHODS):
        p = 1 / (1 + np.exp(-(rng.normal(size=n) + 0.5 * k * (2 * y - 1))))
        rows += [
            {"subject_id": f"s{i:02d}", "fold": i % 5, "method": m, "label": int(y[i]), "prob": float(p[i])}
            for i in range(n)
        ]
    _write_csv(
        run / "oof_predictions.csv",
        ["subject_id", "fold", "method", "label", "prob"],
        [[r["subject_id"], r["fold"], r["method"], r["label"], r["prob"]] for r in rows],
    )
    ty = rng.integers(0, 2, 30)
    _write_csv(
        run / "teacher" / "predictions.csv",
        ["subject_id", "label", "prob"],
        [[f"t{i}", int(ty[i]), float(np.clip(0.3 * ty[i] + 0.7 * rng.random(), 0, 1))] for i in range(30)],
    )
    # Lightning CSVLogger layout: sparse rows, train and val on separate lines.
    for sub in [
        "teacher/logs/version_0",
        "mae/logs/version_0",
        *[f"folds/fold_{f}/{m}/logs/version_0" for f in range(2) for m in METHODS[:2]],
    ]:
        log_rows = []
        for e in range(4):
            log_rows.append([e, 2 * e + 1, f"{1 / (e + 1):.4f}", "", "", "0.001"])
            log_rows.append([e, 2 * e + 1, "", f"{1.2 / (e + 1):.4f}", f"{0.6 + 0.05 * e:.3f}", ""])
        _write_csv(
            run / sub / "metrics.csv",
            ["epoch", "step", "train_loss", "val_loss", "val_auc", "lr-AdamW"],
            log_rows,
        )
    results = {
        "methods": summarise_methods(rows, high_sensitivity=0.9),
        "teacher": {"auc": 0.9, "auc_ci95": [0.8, 0.97], "n": 30},
        "comparisons": compare_methods(rows),
        "cohort": {
            "n_mri_labelled": n,
            "prevalence": 0.3,
            "ceilings": {"mri": 0.88, "tvus": 0.97},
            **({"manifest": manifest} if manifest else {}),
        },
        "config": {
            "name": "fake",
            "seed": 7,
            "protocol": {"folds": 5, "full_method": "mae_kd_ce"},
            "task": {"student_modality": "mri", "teacher_modality": "tvus"},
        },
        "seed": 7,
        "timings": {"teacher": 12.5, "mae": 30.25, "cross_validation": 100.0},
    }
    # Through the run-directory contract (tests/conftest.py): only keys the protocol writes; versions in run.json.
    run_files.results(run, **nan_to_none(results))
    run_files.run_info(run, seed=7, versions={"python": "3.11", "torch": "2.14.1"})
    return run


def _check_html(text: str) -> None:
    for sid in SECTION_IDS:
        assert f'<h2 id="{sid}">' in text, sid
    # Self-contained: nothing fetched from anywhere.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    for src in re.findall(r"""<img[^>]*src="([^"]+)\"""", text):
        assert src.startswith("data:image/png;base64,")


def test_report_on_fabricated_run(tmp_path: Path, run_files: RunFiles) -> None:
    run = _fake_run(run_files, tmp_path)
    (run / "examples").mkdir()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    fig.savefig(run / "examples" / "mri_s00.png")

    html_path, md_path = write_report(run)
    assert (html_path, md_path) == (run / "report.html", run / "report.md")
    text = html_path.read_text()
    _check_html(text)
    # ROC, calibration, teacher ROC, folds, 2 training figures (CV fits; teacher + mae), the example.
    assert len(re.findall(r"<img ", text)) == 7
    assert "Holm-Bonferroni" in text and "p adjusted" in text
    assert "0.906" in text and "0.650" in text  # the paper's numbers next to ours
    assert "AUC [95% CI, DeLong]" in text or "AUC [95% CI" in text
    assert "mri</b> 0.880" in text  # ceilings
    assert "torch" in text and "2.14.1" in text and "<code>7</code>" in text
    assert "full_method: mae_kd_ce" in text  # YAML config
    assert "Cross-validation fits" in text and "Teacher, MAE and final model" in text
    md = md_path.read_text()
    assert md.count("\n| ") >= 1 + len(METHODS)
    assert "| Method | AUC [95% CI] |" in md and "| mae_kd_ce |" in md and "0.906" in md
    assert "Holm" in md
    table = format_ablation_table(json.loads((run / "results.json").read_text()))
    lines = table.splitlines()
    assert lines[0].startswith("Method") and set(lines[1]) <= {"-", " "}
    assert sum(1 for ln in lines if ln.split(" ")[0] in METHODS) == len(METHODS)
    assert "ceilings" in lines[-1]


def test_report_minimal_results_only(tmp_path: Path, run_files: RunFiles) -> None:
    """A run that got no further than results.json still gets every section, with notes."""
    run = tmp_path / "run"
    empty = {"n": 0, "auc": None, "fold_aucs": [None], "fold_auc_mean": None, "fold_auc_std": None}
    run_files.results(run, methods={"scratch_ce": empty})
    html_path, md_path = write_report(run)
    text = html_path.read_text()
    _check_html(text)
    assert "oof_predictions.csv not found" in text
    assert "| scratch_ce | — |" in md_path.read_text()


def test_report_refuses_a_results_json_outside_the_contract(tmp_path: Path, run_files: RunFiles) -> None:
    """The report reads results.json through the run-directory contract: a made-up key is named."""
    run = _fake_run(run_files, tmp_path)
    results = json.loads((run / "results.json").read_text())
    results["methods"]["mae_ce"]["auroc"] = 0.9
    (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(InputError, match=r"results\.json.*methods\.mae_ce\.auroc"):
        write_report(run)


def _write_cohort(data: Path) -> None:
    """A two-subject cohort (NIfTI volumes, MPEG-4 clips, manifest.csv) like the one a run's results name."""
    import av
    import nibabel as nib

    (data / "mri").mkdir(parents=True)
    (data / "tvus").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        nib.save(
            nib.Nifti1Image(rng.random((16, 16, 6)).astype(np.float32), np.eye(4)), data / f"mri/m{i}.nii.gz"
        )
        rows.append([f"m{i}", "mri", f"mri/m{i}.nii.gz", i])
        with av.open(str(data / f"tvus/t{i}.mp4"), "w") as c:
            st = c.add_stream("mpeg4", rate=5)
            st.width = st.height = 32
            st.pix_fmt = "yuv420p"
            for _ in range(4):
                frame = av.VideoFrame.from_ndarray(
                    rng.integers(0, 255, (32, 32), dtype=np.uint8), format="gray"
                )
                c.mux(st.encode(frame))
            c.mux(st.encode())
        rows.append([f"t{i}", "tvus", f"tvus/t{i}.mp4", i])
    _write_csv(data / "manifest.csv", ["subject_id", "modality", "path", "label"], rows)


def test_report_reads_only_the_run_directory(tmp_path: Path, run_files: RunFiles) -> None:
    """The examples come from RUN/examples/*.png only: the cohort a run names is never opened, and a run
    without examples (or without its cohort) gets a note in their place."""
    data = tmp_path / "cohort"
    _write_cohort(data)
    run = _fake_run(run_files, tmp_path, manifest=str(data / "manifest.csv"))
    opened: list[str] | None = []

    def audit(event: str, args: tuple) -> None:
        if opened is not None and event == "open" and isinstance(args[0], str | Path):
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # an audit hook cannot be removed: it records only until `opened` is None
    text = write_report(run)[0].read_text()
    seen, opened = opened, None
    _check_html(text)
    assert not [p for p in seen if str(data) in p]  # neither the manifest nor a volume or clip
    assert str(run / "results.json") in seen and str(run / "oof_predictions.csv") in seen
    examples = text.split('<h2 id="examples">')[1].split("</section>")[0]
    assert "<img " not in examples and "examples/*.png is not in the run directory" in examples
    # The example images the protocol writes are what the section shows (PNGs only, sorted by name).
    (run / "examples").mkdir()
    from matplotlib.figure import Figure

    for name in ("tvus_class0_t0.png", "mri_class0_m0.png"):
        fig = Figure(figsize=(1, 1))
        fig.add_subplot().plot([0, 1])
        fig.savefig(run / "examples" / name)
    (run / "examples" / "broken.png").write_bytes(b"not a png")
    # Without its cohort (moved, deleted, another machine) the report is the same.
    shutil.rmtree(data)
    text = write_report(run)[0].read_text()
    examples = text.split('<h2 id="examples">')[1].split("</section>")[0]
    assert re.findall(r"<figcaption>([^<]+)</figcaption>", examples) == [
        "mri_class0_m0.png",
        "tvus_class0_t0.png",
    ]
    assert examples.count('<img src="data:image/png;base64,') == 2


def test_report_package_imports_neither_training_nor_orchestration(
    tmp_path: Path, run_files: RunFiles
) -> None:
    """Layering: the report reads files and uses evaluate's statistics; building one loads no cohort
    reader, no training code and no orchestration."""
    run = _fake_run(run_files, tmp_path)
    code = (
        "import sys; from endodistill.report import write_report; write_report(sys.argv[1]); "
        "bad = sorted(m for m in sys.modules if m.startswith(('endodistill.train', 'endodistill.experiment', "
        "'endodistill.data', 'torch', 'lightning'))); print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_templates_autoescape_html_and_keep_markdown_verbatim(tmp_path: Path, run_files: RunFiles) -> None:
    """A method, a display name or a config name holding markup is shown as text in report.html."""
    run = _fake_run(run_files, tmp_path)
    results = json.loads((run / "results.json").read_text())
    evil = "<script>alert(1)</script>"
    results["methods"][f"{evil}_ce"] = results["methods"]["mae_ce"]
    results["display_names"] = {"mae_kd": 'ours "<img src=x onerror=alert(1)>"'}
    results["config"]["name"] = "<b>run</b>"
    (run / "results.json").write_text(json.dumps(results))
    html_path, md_path = write_report(run)
    text = html_path.read_text()
    _check_html(text)  # no <script, every <img> a data: URI
    assert "&lt;script&gt;alert(1)&lt;/script&gt;_ce" in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "<img src=x" not in text
    assert "<title>&lt;b&gt;run&lt;/b&gt;: endodistill report</title>" in text
    md = md_path.read_text()
    assert md.startswith("# <b>run</b>: ablation\n")  # Markdown is not HTML-escaped
    assert f"| {evil}_ce | " in md
    # The templates are package data (installed with the package, not read from the source tree).
    from importlib.resources import files

    tpl = files("endodistill.report") / "templates"
    names = {"report.html.j2", "report.md.j2", "study.html.j2", "study.md.j2"}
    assert names <= {p.name for p in tpl.iterdir()}
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"report/templates/*.j2"' in pyproject and '"jinja2' in pyproject


def test_markdown_tables_hold_the_formatted_numbers(tmp_path: Path, run_files: RunFiles) -> None:
    run = tmp_path / "run"
    # The contract's required fields (n, fold AUCs, thresholds) at "no value"; the table shows the rest.
    none = {"n": 40, "auc": None, "fold_aucs": [], "fold_auc_mean": None, "fold_auc_std": None}
    m = {
        **none,
        "auc": 0.81234,
        "auc_ci95": [0.70111, 0.90349],
        "fold_auc_mean": 0.8,
        "fold_auc_std": 0.05,
        "youden": {"threshold": 0.5, "sensitivity": 0.85, "specificity": 0.7},
        "high_sensitivity": {"target": 0.9, "threshold": 0.3, "sensitivity": 0.9, "specificity": 0.4},
        "brier": 0.1620412,
        "ece": 0.05,
    }
    comp = {"method_a": "mae_kd_ce", "method_b": "scratch_ce", "n": 40, "n_pos": 12, "auc_a": 0.81234,
            "auc_b": 0.7, "diff": 0.11234, "se": 0.05, "z": 2.2212, "p": 0.0004, "p_adjusted": 0.0421,
            "correction": "holm"}  # fmt: skip
    run_files.results(
        run,
        methods={"scratch_ce": {**none, "auc": 0.7}, "mae_kd_ce": m, "a|b": none},
        comparisons=[comp],
        cohort={"ceilings": {"mri": 0.88}},
        seed=3,
    )
    md = write_report(run)[1].read_text()
    lines = md.splitlines()
    assert lines[0] == "# endodistill: ablation"
    i = lines.index(
        "| Method | AUC [95% CI] | Fold AUC mean ± SD | Sens / Spec % @ Youden | Sens / Spec % @ sens ≥ 90% "
        "| Brier | ECE | Paper AUC |"
    )
    assert lines[i + 1] == "|---|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[i + 2] == "| scratch_ce | 0.700 | — | — | — | — | — | 0.650 |"
    assert (
        lines[i + 3]
        == "| mae_kd_ce | 0.812 [0.701, 0.903] | 0.800 ± 0.050 | 85.0 / 70.0 | 90.0 / 40.0 | 0.162 | 0.050 | 0.906 |"
    )
    assert lines[i + 4] == "| a\\|b | — | — | — | — | — | — | — |"  # a | in a cell is escaped
    assert "AUC ceilings of the synthetic cohort: mri 0.880" in lines
    j = lines.index("## Paired comparisons")
    assert lines[j + 4] == "| A | B | AUC A | AUC B | A − B | z | p | p adjusted |"
    assert lines[j + 6] == "| mae_kd_ce | scratch_ce | 0.812 | 0.700 | 0.112 | 2.22 | <0.001 | 0.042 |"
    assert lines[-1] == "Seed: 3" and md.endswith("Seed: 3\n")


def test_study_report_escapes_html_and_writes_the_markdown_table(tmp_path: Path) -> None:
    from endodistill.experiment.study_results import SettingResult, StudyResult, write_study
    from endodistill.report.study import format_study_table

    settings = [
        SettingResult(name="ref", value="0.5", run="r0", auc=0.8123, auc_ci95=[0.7, 0.9], fold_aucs=[0.8],
                      fold_auc_mean=0.81, fold_auc_std=0.01, config={}),
        SettingResult(name="other", value="<i>0.75</i>", run="r1", auc=0.75, auc_ci95=[0.6, 0.85],
                      fold_aucs=[0.7], fold_auc_mean=0.7, fold_auc_std=0.02, config={}),
    ]  # fmt: skip
    comp = {"method_a": "other", "method_b": "ref", "diff": -0.0623, "diff_ci95": [-0.1, 0.01], "p": 0.03,
            "p_adjusted": 0.06, "mcnemar": {"p": 0.5, "p_adjusted": 1.0}}  # fmt: skip
    r = StudyResult(study="alpha", question="Does <script>x</script> matter?", varied="alpha", reference="ref",
                    seed=1, folds=5, n_subjects=24, settings=settings, comparisons=[comp], verdict="No.",
                    shared_units={"teacher-1": {"trained_by": "r0", "used_by": ["r0", "r1"]}},
                    wall_seconds=3.21)  # fmt: skip
    write_study(tmp_path, r, None)  # type: ignore[arg-type]  # the plan is not used for the files
    html = (tmp_path / "study.html").read_text()
    assert "<script" not in html and "&lt;script&gt;x&lt;/script&gt;" in html and "<td>&lt;i&gt;0.75" in html
    assert html.count('src="data:image/png;base64,') == 1
    md = (tmp_path / "study.md").read_text().splitlines()
    assert md[0] == "# Study `alpha`" and "**No.**" in md
    k = md.index(
        "| setting | value | AUC | 95% CI | fold mean ± SD | Δ vs ref [95% CI] | DeLong p (Holm) | McNemar p (Holm) |"
    )
    assert md[k + 1] == "|" + "---|" * 8
    assert md[k + 2] == "| ref | 0.5 | 0.812 | [0.700, 0.900] | 0.810 ± 0.010 | reference |  |  |"
    assert md[k + 3] == (
        "| other | &lt;i&gt;0.75&lt;/i&gt; | 0.750 | [0.600, 0.850] | 0.700 ± 0.020 | -0.062 [-0.100, 0.010] "
        "| 0.030 (0.060) | 0.500 (1.000) |"
    )
    assert format_study_table(r).splitlines()[-1] == "wall time 3.2 s"


def test_missing_or_bad_results_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text("{bad")
    with pytest.raises(InputError, match="not valid JSON"):
        write_report(tmp_path)


def _with_extras(run: Path) -> dict:
    """Add baselines, the MAE probe and the teacher's CV AUC to a fabricated run's results.json."""
    results = json.loads((run / "results.json").read_text())
    rng = np.random.default_rng(5)
    n = 40
    y = np.array([int(v) for v in rng.integers(0, 2, n)])
    y[:2] = [0, 1]
    rows = []
    for k, m in enumerate(("logreg", "cnn3d", "oracle")):
        p = 1 / (1 + np.exp(-(rng.normal(size=n) + (k + 1) * (2 * y - 1))))
        rows += [
            {"subject_id": f"s{i:02d}", "fold": i % 5, "method": m, "label": int(y[i]), "prob": float(p[i])}
            for i in range(n)
        ]
    base = summarise_methods(rows, high_sensitivity=0.9)
    base["sign_visibility"] = {"retroflexion": 0.9612345678901, "elevated_fornix": 0.4412345678901}
    full = [{**r, "method": "mae_kd_ce"} for r in rows if r["method"] == "cnn3d"]
    base["comparisons"] = compare_methods([*full, *(r for r in rows if r["method"] == "logreg")], "logreg")
    results["baselines"] = base
    results["mae"] = {
        "probe_auc": 0.6312345678901,
        "probe_auc_ci95": [0.5512345678901, 0.7112345678901],
        "random_probe_auc": 0.5512345678901,
        "random_probe_draws": 8,
        "gain": 0.0800000000001,
        "gain_ci95": [0.0100000000001, 0.1500000000001],
    }
    results["teacher"].update(
        cv_auc=0.9612345678901,
        cv_auc_ci95=[0.9312345678901, 0.9912345678901],
        clip_baseline={
            "auc": 0.9212345678901,
            "auc_ci95": [0.8812345678901, 0.9612345678901],
            "feature_set": "coupling",
            "teacher_minus_baseline": 0.0400000000001,
            "p_vs_teacher": 0.04123456,
        },
    )
    (run / "results.json").write_text(json.dumps(nan_to_none(results)))
    return results


def test_report_shows_baselines_and_diagnostics_apart_from_the_methods(
    tmp_path: Path, run_files: RunFiles
) -> None:
    run = _fake_run(run_files, tmp_path)
    results = _with_extras(run)
    table = format_ablation_table(results)
    lines = table.splitlines()
    i = lines.index("Reference baselines (same folds and statistics):")
    assert all(ln.split(" ")[0] in METHODS for ln in lines[2:i])  # methods first, then the baselines
    assert [ln.split(" ")[0] for ln in lines[i + 1 : i + 4]] == ["logreg", "cnn3d", "oracle"]
    # Baseline rows line up with the method rows (same column widths).
    assert len(lines[i + 1]) == len(lines[2])
    auc = results["baselines"]["logreg"]["auc"]
    lo, hi = results["baselines"]["logreg"]["auc_ci95"]
    assert f"{auc:.3f} [{lo:.3f}, {hi:.3f}]" in lines[i + 1]
    assert "retroflexion 0.961, elevated_fornix 0.441" in table
    assert (
        "MAE linear probe AUC 0.631 [0.551, 0.711] vs the same probe on the mean of 8 untrained encoders of "
        "the same shape 0.551; gain 0.080 [0.010, 0.150]" in table
    )
    teacher_line = (
        "Teacher cross-validated AUC 0.961 [0.931, 0.991]; simple clip baseline (coupling features) 0.921 "
        "[0.881, 0.961]; teacher minus baseline +0.040, paired DeLong p = 0.0412"
    )
    assert teacher_line in table
    assert "ceilings" in lines[-1]

    html_path, md_path = write_report(run)
    text = html_path.read_text()
    _check_html(text)
    ablation = text.split('<h2 id="ablation">')[1].split("</section>")[0]
    assert "<h3>Reference baselines</h3>" in ablation and "<td>oracle</td>" in ablation
    assert "which signs the chosen resolution can show at all" in ablation
    assert "<td>retroflexion</td><td>0.961</td>" in ablation
    assert "MAE linear probe AUC 0.631 [0.551, 0.711]" in ablation
    teacher = text.split('<h2 id="teacher">')[1].split("</section>")[0]
    assert teacher_line in teacher
    folds = text.split('<h2 id="folds">')[1].split("</section>")[0]
    assert "<td>logreg (baseline)</td>" in folds
    comps = text.split('<h2 id="comparisons">')[1].split("</section>")[0]
    assert "Full method vs reference baselines" in comps and "<td>logreg</td>" in comps
    # McNemar's test beside DeLong's, from the same comparisons of results.json.
    assert "McNemar p adjusted" in comps
    mc = results["comparisons"][0]["mcnemar"]
    assert f"<td>{mc['a_only']} / {mc['b_only']}</td>" in comps
    # No raw floats anywhere in the rendered tables and sentences (the config YAML aside).
    body = text.split('<h2 id="config">')[0]
    assert not re.search(r"(?<![\d.])\d\.\d{5,}", re.sub(r'src="data:[^"]+"', "", body))
    md = md_path.read_text()
    assert "## Reference baselines" in md and "| logreg |" in md and "| retroflexion | 0.961 |" in md
    assert "MAE linear probe AUC 0.631" in md and "Teacher cross-validated AUC 0.961" in md
    assert not re.search(r"(?<![\d.])\d\.\d{5,}", md)


def test_report_without_baselines_has_no_baseline_blocks(tmp_path: Path, run_files: RunFiles) -> None:
    run = _fake_run(run_files, tmp_path)
    results = json.loads((run / "results.json").read_text())
    table = format_ablation_table(results)
    assert "Reference baselines" not in table and "Sign visibility" not in table and "MAE" not in table
    text = write_report(run)[0].read_text()
    assert "Reference baselines" not in text and "Sign visibility" not in text
    assert "MAE linear probe" not in text and "cross-validated AUC" not in text


def test_number_formatting_helpers_give_exact_strings() -> None:
    from endodistill.evaluate.fmt import (
        DASH,
        fmt_auc,
        fmt_ci,
        fmt_clock,
        fmt_p,
        fmt_pct,
        fmt_seconds,
        fmt_value,
        fmt_z,
    )

    assert fmt_auc(0.1620412293810899) == "0.162"
    assert fmt_auc(0.9995) == "1.000" and fmt_auc(-1e-9) == "0.000"
    assert fmt_auc(None) == fmt_auc(float("nan")) == fmt_auc("x") == fmt_auc(True) == DASH
    assert fmt_ci(0.81234, [0.70111, 0.90349]) == "0.812 [0.701, 0.903]"
    assert fmt_ci(0.81234, None) == fmt_ci(0.81234, [None, 0.9]) == "0.812"
    assert fmt_ci(None, [0.1, 0.2]) == DASH
    assert fmt_pct(0.85) == "85.0" and fmt_pct(1) == "100.0" and fmt_pct(0.05882352941) == "5.9"
    assert fmt_p(0.0004) == "<0.001" and fmt_p(0.001) == "0.001" and fmt_p(0.04249) == "0.042"
    assert fmt_p(1.0) == "1.000" and fmt_p(None) == DASH
    assert fmt_z(-0.2212) == "-0.22"
    assert fmt_seconds(4.25) == "4.2 s" and fmt_seconds(12) == "12.0 s" and fmt_seconds(None) == DASH
    assert fmt_clock(7.4) == "0:07" and fmt_clock(83) == "1:23" and fmt_clock(3725) == "1:02:05"
    assert fmt_clock(None) == fmt_clock(-1) == DASH
    assert fmt_value(0.3333333333333333) == "0.333" and fmt_value([0.0, 1.0]) == "[0.000, 1.000]"
    assert fmt_value([3, 0.25]) == "[3, 0.250]" and fmt_value(24) == 24 and fmt_value("x") == "x"


def test_quantile_calibration_bins_have_near_equal_counts_shown_in_the_report(
    tmp_path: Path, run_files: RunFiles
) -> None:
    from endodistill.report.tables import quantile_bins, quantile_calibration

    rng = np.random.default_rng(3)
    p = rng.beta(0.5, 3, size=203)  # skewed: equal-width bins would leave most of them near-empty
    y = (rng.random(203) < p).astype(int)
    pts = quantile_calibration(y, p)
    assert len(pts["count"]) == quantile_bins(203) == 10
    assert sum(pts["count"]) == 203 and max(pts["count"]) - min(pts["count"]) <= 1
    assert pts["lo"] == sorted(pts["lo"]) and all(lo <= m <= hi for lo, m, hi in
                                                  zip(pts["lo"], pts["mean_prob"], pts["hi"]))  # fmt: skip
    assert pts["observed"][0] == pytest.approx(y[np.argsort(p, kind="stable")[:21]].mean())
    assert quantile_bins(40) == 3 and quantile_bins(1000) == 10

    run = _fake_run(run_files, tmp_path)  # 40 cases per method: 3 bins of 13-14
    text = write_report(run)[0].read_text()
    cal = text.split('<h2 id="calibration">')[1].split("</section>")[0]
    assert "quantile bins" in cal and "<details>" in cal
    rows = re.findall(r"<tr><td>(\w+)</td><td>(\d+)</td><td>[\d.]+-[\d.]+</td><td>(\d+)</td>", cal)
    assert {m for m, _, _ in rows} == set(METHODS) and len(rows) == 3 * len(METHODS)
    assert sorted({int(n) for _, _, n in rows}) == [13, 14]


def test_training_curves_one_panel_per_method_with_a_line_per_fold(
    tmp_path: Path, run_files: RunFiles
) -> None:
    from endodistill.report.figures import training_figure as _training_figure
    from endodistill.report.load import CV_TRAINING, OTHER_TRAINING, training_panels

    run = _fake_run(run_files, tmp_path)
    for f in range(2, 5):  # five folds of the first two methods
        for m in METHODS[:2]:
            src = run / "folds/fold_0" / m / "logs/version_0/metrics.csv"
            dst = run / f"folds/fold_{f}" / m / "logs/version_0/metrics.csv"
            dst.parent.mkdir(parents=True)
            dst.write_bytes(src.read_bytes())
    figs = training_panels(run)
    assert list(figs) == [CV_TRAINING, OTHER_TRAINING]
    assert sorted(figs[CV_TRAINING]) == sorted(METHODS[:2])
    assert [lb for lb, _ in figs[CV_TRAINING]["mae_ce"]] == [f"fold {f}" for f in range(5)]
    assert sorted(figs[OTHER_TRAINING]) == ["mae", "teacher"]
    uri, legend = _training_figure(figs[CV_TRAINING], shared_legend=True, order=METHODS)
    assert uri and uri.startswith("data:image/png;base64,")
    # One legend for the figure: a colour per fold and a style per curve (5 + 3, not 5 x 3 entries).
    assert legend == [*(f"fold {f}" for f in range(5)), "train_loss", "val_loss", "val_auc (right axis)"]


def test_teacher_table_has_no_raw_floats(tmp_path: Path, run_files: RunFiles) -> None:
    run = _fake_run(run_files, tmp_path)
    results = json.loads((run / "results.json").read_text())
    results["teacher"].update(
        brier=0.1620412293810899,
        prevalence=0.3333333333333333,
        youden={"threshold": 0.5606082677841187, "sensitivity": 0.5, "specificity": 1.0, "j": 0.5},
        high_sensitivity={
            "target": 0.9,
            "threshold": 0.4084608554840088,
            "sensitivity": 1.0,
            "specificity": 0.0,
        },
        fold_aucs=[0.61234567, 0.7],
        cv_auc=None,
        scheme="hold-out (6 of 24 subjects)",
    )
    (run / "results.json").write_text(json.dumps(results))
    text = write_report(run)[0].read_text()
    teacher = text.split('<h2 id="teacher">')[1].split("</section>")[0]
    assert "<td>brier</td><td>0.162</td>" in teacher and "<td>prevalence</td><td>0.333</td>" in teacher
    assert "<td>auc</td><td>0.900 [0.800, 0.970]</td>" in teacher
    assert "<td>sens / spec % @ Youden</td><td>50.0 / 100.0</td>" in teacher
    assert "<td>sens / spec % @ sens ≥ 90%</td><td>100.0 / 0.0</td>" in teacher
    assert "<td>fold AUCs</td><td>0.612, 0.700</td>" in teacher and "<td>cv_auc</td><td>—</td>" in teacher
    assert "null" not in teacher
    assert not re.search(r"(?<![\d.])\d\.\d{4,}", re.sub(r'src="data:[^"]+"', "", teacher))


def test_fit_progress_lines_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """Piped output (CI logs): one line per fit with i/N, elapsed and ETA; no val AUC when there is none."""
    from endodistill.experiment import runner

    progress = runner.FitProgress(4)
    assert not progress.tty and runner.FitProgress.bar is None  # pytest captures stdout: no bar
    progress.done("[fold 1/2] a: " + runner.fit_result({"test_auc": 0.71234}, 2.0, True), 0.0, True)
    assert progress.eta() is None  # a reused fit tells nothing about the time the others take
    progress.done("[fold 1/2] b: " + runner.fit_result({"test_auc": 0.5, "val_auc": None}, 4.0, False), 4.0)
    assert progress.eta() == pytest.approx(8.0)  # 2 fits left x 4 s
    line = runner.fit_result({"val_auc": 0.91234, "test_auc": float("nan")}, 6.04, False)
    progress.done("[fold 2/2] a: " + line, 6.0, tag=" (rank 1)")
    progress.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[fold 1/2] a: test AUC 0.712 (done before, reused); unit 1/4, elapsed 0:0")
    assert out[0].endswith(", ETA ?")
    assert re.fullmatch(
        r"\[fold 1/2\] b: test AUC 0\.500 \(4\.0 s\); unit 2/4, elapsed 0:00, ETA 0:08", out[1]
    )
    assert re.fullmatch(
        r"\[fold 2/2\] a: val AUC 0\.912, test AUC — \(6\.0 s\); unit 3/4, elapsed 0:00, ETA 0:05 \(rank 1\)",
        out[2],
    )
    assert not any("n/a" in ln for ln in out)


def test_run_progress_estimates_the_whole_run_by_kind_and_steps(capsys: pytest.CaptureFixture[str]) -> None:
    """The run's ETA: remaining optimiser steps x seconds per step, per kind once that kind has run."""
    from endodistill.experiment import runner

    progress = runner.FitProgress([("teacher", 100), ("fit", 10), ("fit", 10), ("final", 20)], "run")
    assert progress.eta() is None
    progress.stage("teacher", 50.0)  # 0.5 s per step; kinds not seen yet use the overall rate
    assert progress.eta() == pytest.approx(0.5 * 40)
    progress.done("[fold 1/2] a: test AUC 0.700 (2.0 s)", 2.0)  # fits: 0.2 s per step
    assert progress.eta() == pytest.approx(10 * 0.2 + 20 * (52.0 / 110.0))
    progress.done("[fold 2/2] a: test AUC 0.700 (2.0 s)", 2.0)
    progress.stage("final", 9.0)
    assert progress.eta() == 0.0
    progress.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[run] teacher done (50.0 s); unit 1/4, elapsed") and out[-1].endswith(
        "ETA 0:00"
    )


def test_settings_in_key_value_tables_lose_trailing_zeros() -> None:
    from endodistill.evaluate.fmt import fmt_value

    assert fmt_value(90.0, trim=True) == "90" and fmt_value(0.30, trim=True) == "0.3"
    assert fmt_value(0.2916666, trim=True) == "0.292" and fmt_value([3.0, 3.2, 6], trim=True) == "[3, 3.2, 6]"
    assert fmt_value(0.0, trim=True) == "0" and fmt_value(0.0) == "0.000"

"""Scaling benchmark: time per epoch and peak memory of a training stage as the number of cases grows.

For N, 2N and 4N cases of random volumes at a preset's MRI size (demo by default), it runs the real stage
code in this process (``finetune`` for a distillation + fine-tuning fit, ``pretrain_mae`` for an MAE fit:
Lightning Trainer, planned in-memory batches, per-epoch validation, checkpoints) and reports per fit:

* the epoch time (model steps + data + per-epoch validation, divided by the epochs) and its ratio to N's:
  the goal is at most about 4x for 4x the cases;
* the peak resident memory during the fit above the memory before it (the data set itself is allocated
  before), read from ``/proc/self/status`` (``VmHWM``, reset per fit through ``/proc/self/clear_refs``;
  ``tracemalloc`` does not see torch's allocations): the goal is flat, since batches have a fixed size.
  On a GPU, ``torch.cuda.max_memory_allocated`` per fit is reported too;
* the fit's start-up (Trainer creation to the first step) against one model step: the fixed cost every
  small fit of the protocol pays (issue: start-up must not dominate the demo's 25+ small fits).

``--device cuda`` trains with the GPU settings of a real run: ``bf16-mixed`` autocast, TF32 matmuls
(``configure_torch``), pinned memory and non-blocking copies (``make_loader`` and Lightning).

Usage: ``python -m benchmarks.bench_scaling [--quick] [--device cpu|cuda] [--preset demo] [--n N]
[--epochs E] [--repeats R] [--out PATH]``. Each size is fitted ``R`` times and the fastest fit is kept
(other processes share the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from endodistill.config import Config, load_config
from endodistill.utils import atomic_write_json

METHOD = "scratch_kd_ce"  # KD + CE through the label-matched pairing, no MAE encoder needed


def trainer_overrides(cuda: bool, threads: int, workers: int) -> list[str]:
    """``--set`` overrides for one device as a real run uses it: bf16-mixed on a GPU, fp32 on the CPU."""
    return [
        f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
        "trainer.devices=1",
        f"trainer.precision={'bf16-mixed' if cuda else '32-true'}",
        f"trainer.num_workers={workers}",
        f"trainer.threads={threads}",
    ]


def _proc_status(key: str) -> float | None:
    """A memory figure of this process from ``/proc/self/status`` in MiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cohort(cfg: Config, n: int, seed: int) -> tuple[Any, Any]:
    """Random labelled and unlabelled volumes (``n`` each) and teacher outputs on 32 clips."""
    from endodistill.train.data import ClipSet, CohortData, VolumeSet
    from endodistill.train.teacher import TeacherOutputs

    g = torch.Generator().manual_seed(seed)
    k = cfg.task.num_classes

    def volumes(prefix: str, labelled: bool) -> VolumeSet:
        x = torch.rand((n, 1, *cfg.mri.size), generator=g)
        labels = np.arange(n) % k if labelled else np.full(n, -1)
        subjects = [f"{prefix}{i:05d}" for i in range(n)]
        return VolumeSet(x=x, labels=labels.astype(np.int64), subjects=subjects, paths=subjects)

    m = 32
    clip_labels = (np.arange(m) % k).astype(np.int64)
    clip_subjects = [f"t{i:05d}" for i in range(m)]
    logits = torch.randn((m, k), generator=g)
    teacher = TeacherOutputs(
        logits=logits,
        probs=logits.softmax(1),
        features=torch.zeros((m, 8)),
        labels=clip_labels,
        subjects=clip_subjects,
        paths=clip_subjects,
        targets="in_sample",
    )
    data = CohortData(
        manifest=Path("random"),
        labelled=volumes("s", True),
        unlabelled=volumes("u", False),
        tvus=ClipSet(clips=[], labels=clip_labels, subjects=clip_subjects, paths=clip_subjects),
        cohort={},
        files=[],
    )
    return data, teacher


def _fit(cfg: Config, stage: str, n: int, root: Path, cuda: bool) -> dict[str, Any]:
    """One fit of ``stage`` on ``n`` random cases; its timing, epoch time and peak memory."""
    from endodistill.train.finetune import finetune
    from endodistill.train.pretrain import pretrain_mae

    data, teacher = _cohort(cfg, n, seed=n)
    n_val = max(2, n // 5)
    subjects = data.labelled.subjects
    split = {"train": subjects[n_val:], "val": subjects[:n_val], "test": []}
    rss_before = _proc_status("VmRSS")
    reset = _reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    unit = root / f"{stage}_{n}"
    if stage == "finetune":
        info = finetune(cfg, METHOD, data, teacher, split, unit, seed=0, where=f"scaling {n}")
        epochs, cases = cfg.finetune.epochs, len(split["train"])
    else:
        info = pretrain_mae(cfg, data, unit, seed=0, echo=lambda s: None)
        epochs, cases = cfg.mae.epochs, n
    t = info["timing"]
    peak = _proc_status("VmHWM")
    row: dict[str, Any] = {
        "stage": stage,
        "cases": n,
        "train_cases": cases,
        "epochs": epochs,
        "steps": t["steps"],
        "fit_wall_s": t["wall"],
        "startup_s": t["startup"],
        "step_s": t["step"],
        "data_s": t["data"],
        "eval_s": t["eval"],
        "checkpoint_s": t["checkpoint"],
        "epoch_s": (t["step"] + t["data"] + t["eval"]) / epochs,
        "step_ms": 1000.0 * t["step"] / max(1, t["steps"]),
        "dataset_mib": 2 * n * int(np.prod(cfg.mri.size)) * 4 / 2**20,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak,
        "peak_rss_reset": reset,
        "peak_rss_above_before_mib": None if (peak is None or rss_before is None) else peak - rss_before,
    }
    # The whole fit (model built, Trainer, epochs, checkpoints, predictions, files) over its model steps.
    row["fit_overhead"] = t["wall"] / max(1e-9, t["step"])
    row["startup_in_steps"] = row["startup_s"] / max(1e-9, row["step_ms"] / 1000.0)
    if cuda:
        row["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def _cpu_name() -> str:
    """The CPU model and its core count (``/proc/cpuinfo`` on Linux)."""
    import os

    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores"


def table(rows: list[dict[str, Any]]) -> str:
    """The printed table: one line per stage and size, ratios against the smallest size of the stage."""
    head = (
        f"{'stage':<9}{'cases':>6}{'steps':>6}{'epoch s':>9}{'x time':>8}{'step ms':>9}{'start-up s':>11}"
        f"{'= steps':>8}{'fit s':>7}{'fit/step':>9}{'peak RSS':>10}{'+fit MiB':>9}"
    )
    lines = [head, "-" * len(head)]
    first: dict[str, dict[str, Any]] = {}
    for r in rows:
        base = first.setdefault(r["stage"], r)
        ratio = r["epoch_s"] / base["epoch_s"] if base["epoch_s"] else float("nan")
        r["time_ratio"] = ratio
        r["cases_ratio"] = r["cases"] / base["cases"]
        peak = f"{r['peak_rss_mib']:>10.0f}" if r["peak_rss_mib"] is not None else f"{'n/a':>10}"
        above = r["peak_rss_above_before_mib"]
        extra = f"{above:>9.0f}" if above is not None else f"{'n/a':>9}"
        lines.append(
            f"{r['stage']:<9}{r['cases']:>6d}{r['steps']:>6d}{r['epoch_s']:>9.3f}{ratio:>8.2f}"
            f"{r['step_ms']:>9.1f}{r['startup_s']:>11.3f}{r['startup_in_steps']:>8.1f}{r['fit_wall_s']:>7.2f}"
            f"{r['fit_overhead']:>9.2f}{peak}{extra}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the scaling table and write it as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 64, 3 epochs (under a minute on one CPU core)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--preset", default="demo", help="preset giving the MRI size, networks and batch sizes")
    ap.add_argument("--n", type=int, default=None, help="smallest number of cases (default 64 quick, 128)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per fit (default 3 quick, 4)")
    ap.add_argument("--stages", nargs="+", default=["finetune", "mae"], choices=("finetune", "mae"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="fits per size; the fastest is kept (shared CPUs)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling.json"))
    args = ap.parse_args(argv)

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible")
    torch.set_num_threads(args.threads)
    n = args.n or (64 if args.quick else 128)
    epochs = args.epochs or (3 if args.quick else 4)
    cfg = load_config(
        args.preset,
        [
            *args.overrides,
            *trainer_overrides(cuda, args.threads, workers=0),
            f"finetune.epochs={epochs}",
            f"mae.epochs={epochs}",
        ],
    )
    from endodistill.train.seeding import configure_torch

    configure_torch(cfg)  # thread count, TF32 on GPUs, quiet Lightning
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="endodistill-scaling-") as tmp:
        # A first small fit warms up imports, kernels and allocators, so N's figures are not inflated.
        with contextlib.redirect_stdout(sys.stderr):
            for stage in args.stages:
                _fit(cfg, stage, min(16, n), Path(tmp) / "warmup", cuda)
        for stage in args.stages:
            for mult in (1, 2, 4):
                fits = [_fit(cfg, stage, n * mult, Path(tmp) / str(i), cuda) for i in range(args.repeats)]
                rows.append(min(fits, key=lambda r: r["epoch_s"]))
    text = table(rows)
    device = torch.cuda.get_device_name(0) if cuda else _cpu_name()
    print(
        f"scaling on {args.device} ({device}), preset {args.preset}, MRI {list(cfg.mri.size)}, "
        f"{epochs} epochs, batch {cfg.finetune.batch_size} (finetune) / {cfg.mae.batch_size} (mae), "
        f"{args.threads} thread(s)"
    )
    print(text)
    worst = max((r["time_ratio"] for r in rows if r["cases_ratio"] == 4), default=float("nan"))
    print(f"4x cases -> {worst:.2f}x epoch time (goal <= ~4); total {time.perf_counter() - t0:.1f} s")
    atomic_write_json(
        args.out,
        {
            "device": args.device,
            "device_name": device,
            "preset": args.preset,
            "mri_size": list(cfg.mri.size),
            "epochs": epochs,
            "threads": args.threads,
            "precision": cfg.trainer.precision,
            "torch": torch.__version__,
            "rows": rows,
            "worst_4x_time_ratio": worst,
            "wall_s": time.perf_counter() - t0,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

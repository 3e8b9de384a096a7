"""Protocol overhead at a preset's sizes (the paper's by default): where one fit of each stage spends its time.

The demo's overhead comes from ``bench_demo.py`` (the whole protocol). At the paper's sizes the whole protocol
takes GPU-days on a CPU, so this benchmark runs ONE fit of each stage with the preset's networks, input sizes
and training settings (``num_workers``, checkpoint interval, inner validation, per-epoch teacher monitoring),
on random inputs, with few cases and epochs:

* ``teacher``: R(2+1)D on random clips (preset frames x size, 2-3x longer clips to sample windows from);
* ``mae``: the MAE on random volumes;
* ``finetune``: distillation + fine-tuning (KD + CE, label-matched pairs) with the preset's inner validation;
* ``finetune, checkpoint every epoch``: the same with ``trainer.checkpoint_every_s=0``, which shows what one
  checkpoint costs (the preset writes one at most every ``checkpoint_every_s`` seconds).

Per fit it prints wall time, model-step time, data (waiting for the next batch + Lightning's loop), evaluation,
checkpoints, start-up and the rest; ``overhead`` = fit wall / model-step time (goal: at most 1.2) and
``data %`` = data / step (goal: under 10 % with workers once the data is in memory). It also times building one
batch in the main process (what a worker does per batch) for each stage.

On a CPU the batch sizes are reduced (``--batch``, default 2) so that a step takes seconds, not minutes;
per-fit costs are then spread over fewer samples, so the overhead measured is an upper bound of the preset's.

Usage: ``python -m benchmarks.bench_overhead [--preset paper] [--device cpu|cuda] [--batch B] [--cases N]
[--epochs E] [--workers W] [--stages ...] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_scaling import trainer_overrides
from endodistill.config import Config, load_config
from endodistill.utils import atomic_write_json

PARTS = ("step", "data", "eval", "checkpoint", "other", "prepare", "startup", "finish")
STAGES = ("teacher", "mae", "finetune", "finetune_ckpt_every_epoch")


def _data(cfg: Config, n: int, seed: int) -> tuple[Any, Any]:
    """Random labelled/unlabelled volumes (n each), n random clips and teacher outputs on them."""
    from benchmarks.bench_scaling import _cohort
    from endodistill.train.data import ClipSet

    data, teacher = _cohort(cfg, n, seed)
    rng = np.random.default_rng(seed)
    frames = cfg.tvus.frames
    h, w = cfg.tvus.size
    # Clips longer than the window, as preprocessed ultrasound is: the teacher samples a window of them.
    clips = [
        rng.random((frames * 2 + int(rng.integers(0, frames)), h, w), dtype=np.float32) for _ in range(n)
    ]
    k = cfg.task.num_classes
    data.tvus = ClipSet(
        clips=clips,
        labels=(np.arange(n) % k).astype(np.int64),
        subjects=[f"t{i:05d}" for i in range(n)],
        paths=[f"t{i:05d}" for i in range(n)],
    )
    return data, teacher


def _batch_ms(make: Any, n: int, batch: int, repeats: int = 5) -> float:
    """Median time to build one training batch in this process (what one DataLoader worker does)."""
    idx = np.arange(min(batch, n))
    times = []
    for r in range(repeats + 1):
        rng = np.random.default_rng(r)
        t0 = time.perf_counter()
        make(idx, rng, 0)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times[1:]))


def _fit(stage: str, cfg: Config, n: int, root: Path, preset: Config) -> dict[str, Any]:
    """One fit of ``stage`` on random data; its timing parts and the batch-building time.

    ``projected`` is the overhead of the same fit run for the preset's epochs: the parts that grow with the
    epochs (step, data, eval, loop) scaled to them, the once-per-fit parts (prepare, start-up, finish) kept,
    checkpoints left out (one at most every ``checkpoint_every_s``; see the every-epoch row for their cost).
    """
    from endodistill.train.finetune import finetune, student_batch_fn
    from endodistill.train.pretrain import pretrain_mae, volume_batch_fn
    from endodistill.train.teacher import clip_batch_fn, fit_teacher

    data, teacher = _data(cfg, n, seed=n)
    unit = root / stage
    if stage == "teacher":
        idx = np.arange(n)
        monitor = idx[: max(2, n // 5)]
        _, info = fit_teacher(
            cfg, data, idx, unit, seed=0, where="bench teacher", resume=False, monitor_idx=monitor
        )
        make = clip_batch_fn(data.tvus, idx, cfg, cfg.teacher.augment)
        batch, epochs = cfg.teacher.batch_size, cfg.teacher.epochs
    elif stage == "mae":
        info = pretrain_mae(cfg, data, unit, seed=0, echo=lambda s: None)
        make = volume_batch_fn(data.unlabelled.x, True)
        batch, epochs = cfg.mae.batch_size, cfg.mae.epochs
    else:
        if stage == "finetune_ckpt_every_epoch":
            cfg = cfg.model_copy(deep=True)
            cfg.trainer.checkpoint_every_s = 0.0
        subjects = data.labelled.subjects
        n_val = round(cfg.finetune.val_fraction * n)
        split = {"train": subjects[n_val:], "val": subjects[:n_val], "test": []}
        info = finetune(cfg, "scratch_kd_ce", data, teacher, split, unit, seed=0, where=f"bench {stage}")
        lab = data.labelled
        method = cfg.protocol.methods["scratch_kd_ce"]
        pool = np.arange(len(teacher.labels))
        make = student_batch_fn(
            lab.x,
            lab.labels,
            lab.subjects,
            teacher,
            pool,
            method,
            0,
            cfg.task.num_classes,
            cfg.finetune.augment,
        )
        batch, epochs = cfg.finetune.batch_size, cfg.finetune.epochs
    t = info["timing"]
    preset_epochs = {"teacher": preset.teacher.epochs, "mae": preset.mae.epochs}.get(
        stage, preset.finetune.epochs
    )
    ckpt_files = list(unit.glob("checkpoints/*.ckpt"))
    row = {
        "stage": stage,
        "cases": n,
        "batch": batch,
        "epochs": epochs,
        "steps": t["steps"],
        "wall": t["wall"],
        **{p: t.get(p, 0.0) for p in PARTS},
        "overhead": t["wall"] / max(1e-9, t["step"]),
        "preset_epochs": preset_epochs,
        "projected": (
            (t["step"] + t["data"] + t["eval"] + t["other"]) * preset_epochs / epochs
            + t["prepare"]
            + t["startup"]
            + t["finish"]
        )
        / max(1e-9, t["step"] * preset_epochs / epochs),
        "data_pct": 100.0 * t["data"] / max(1e-9, t["step"]),
        "step_ms": 1000.0 * t["step"] / max(1, t["steps"]),
        "batch_build_ms": _batch_ms(make, n, batch),
        "checkpoint_mib": sum(f.stat().st_size for f in ckpt_files) / 2**20 if ckpt_files else 0.0,
    }
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The per-fit table as text."""
    head = (
        f"{'stage':<27}{'batch':>6}{'steps':>6}{'wall s':>8}"
        + "".join(f"{p:>9}" for p in PARTS)
        + f"{'overhead':>9}{'project':>8}{'data %':>8}{'step ms':>9}{'batch ms':>9}{'ckpt MiB':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['stage']:<27}{r['batch']:>6}{r['steps']:>6}{r['wall']:>8.1f}"
            + "".join(f"{r[p]:>9.2f}" for p in PARTS)
            + f"{r['overhead']:>9.3f}{r['projected']:>8.3f}{r['data_pct']:>8.2f}{r['step_ms']:>9.0f}{r['batch_build_ms']:>9.1f}"
            f"{r['checkpoint_mib']:>9.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one fit per stage at the preset's sizes and print the overhead table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="batch size of every stage (default: 2 on CPU)")
    ap.add_argument("--cases", type=int, default=None, help="random cases per stage (default 4 batches)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 1 on CPU)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.json"))
    args = ap.parse_args(argv)

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible")
    torch.set_num_threads(args.threads)
    preset = load_config(args.preset)
    batch = args.batch or (None if cuda else 2)
    workers = args.workers if args.workers is not None else (preset.trainer.num_workers if cuda else 1)
    over = [
        *trainer_overrides(cuda, args.threads, workers),
        f"teacher.epochs={args.epochs}",
        "teacher.folds=1",
        f"mae.epochs={args.epochs}",
        f"finetune.epochs={args.epochs}",
    ]
    if batch:
        over += [f"teacher.batch_size={batch}", f"mae.batch_size={batch}", f"finetune.batch_size={batch}"]
    cfg = load_config(args.preset, [*over, *args.overrides])
    from endodistill.train.seeding import configure_torch

    configure_torch(cfg)
    n = args.cases or 4 * max(cfg.teacher.batch_size, cfg.mae.batch_size, cfg.finetune.batch_size)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="endodistill-overhead-") as tmp:
        with contextlib.redirect_stdout(sys.stderr):
            # Imports, kernels and allocators warmed up on a 1-epoch MAE fit, outside the table.
            warm = cfg.model_copy(deep=True)
            warm.mae.epochs = 1
            _fit("mae", warm, max(2, cfg.mae.batch_size), Path(tmp) / "warm", preset)
        for stage in args.stages:
            rows.append(_fit(stage, cfg, n, Path(tmp), preset))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(
        f"overhead at preset {args.preset} sizes on {device}: MRI {list(cfg.mri.size)}, student "
        f"{cfg.student.hidden_size}x{cfg.student.num_layers}, teacher {cfg.teacher.arch} on "
        f"{cfg.tvus.frames}x{list(cfg.tvus.size)}, {n} cases, {args.epochs} epochs, workers {workers}, "
        f"{cfg.trainer.precision}, checkpoint_every_s {cfg.trainer.checkpoint_every_s:g}"
    )
    print(table(rows))
    step = sum(r["step"] for r in rows if r["stage"] != "finetune_ckpt_every_epoch")
    wall = sum(r["wall"] for r in rows if r["stage"] != "finetune_ckpt_every_epoch")
    print(
        f"fits (preset settings): wall {wall:.1f} s / model steps {step:.1f} s = {wall / max(step, 1e-9):.3f}"
    )
    every = [r for r in rows if r["stage"] == "finetune_ckpt_every_epoch"]
    if every and every[0]["checkpoint"] > 0:
        per_save = every[0]["checkpoint"] / every[0]["epochs"]
        interval = cfg.trainer.checkpoint_every_s
        print(
            f"one fine-tune checkpoint ({every[0]['checkpoint_mib']:.0f} MiB) took {per_save:.2f} s"
            + (
                f": {100 * per_save / interval:.1f} % of training time at one every {interval:g} s"
                if interval
                else ""
            )
        )
    print(
        "projected: each fit's overhead at the preset's epochs (teacher "
        f"{preset.teacher.epochs}, mae {preset.mae.epochs}, finetune {preset.finetune.epochs}) from the parts measured"
    )
    print(f"total {time.perf_counter() - t0:.1f} s")
    atomic_write_json(
        args.out,
        {
            "preset": args.preset,
            "device": args.device,
            "device_name": device,
            "workers": workers,
            "cases": n,
            "epochs": args.epochs,
            "config_overrides": [*over, *args.overrides],
            "rows": rows,
            "overhead_preset_settings": wall / max(step, 1e-9),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

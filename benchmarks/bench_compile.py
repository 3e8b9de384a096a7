"""Does ``trainer.compile`` pay off? Eager against ``torch.compile`` (default mode) at the demo size.

Two measurements, both with the training code's own pieces (the networks from ``endodistill.models``, the
fused AdamW and parameter groups of ``endodistill.train.optim``, ``compile_if_enabled`` of
``endodistill.train.speed``, the teacher's memory layout from ``teacher_channels_last``):

* end to end: one student fit (``--cases`` random volumes, ``--batch``, ``--epochs``) in a plain loop, eager and
  compiled, wall time including compilation. The compiled fit runs twice: first with an empty Inductor
  cache directory (unless ``TORCHINDUCTOR_CACHE_DIR`` names one), then on a second, fresh network in the
  same process, as the next fit of a run would be (Dynamo reuses the graphs of the same module class);
* steady state: the training-step time of the student, the MAE and the teacher after warm-up, eager and
  compiled timed in turns (best and median of ``--repeats``).

Usage: ``python -m benchmarks.bench_compile [--repeats N] [--threads N] [--device cpu|cuda] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before torch is imported: a cold compile must not reuse kernels another run left in the shared cache.
# Set TORCHINDUCTOR_CACHE_DIR to a folder a previous run filled to time a warm on-disk cache instead.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="endodistill-inductor-"))

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from endodistill.config import Config, load_config
from endodistill.models.student import build_mae, build_student
from endodistill.models.teacher import build_teacher
from endodistill.train.optim import adamw, param_groups
from endodistill.train.speed import compile_if_enabled, teacher_channels_last
from endodistill.utils import atomic_write_json

StepFn = Callable[[], None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stepper(net: nn.Module, loss_fn: Callable[[nn.Module, Tensor], Tensor]) -> Callable[[Tensor], None]:
    """One training step on a batch: forward, loss, backward, the training's fused AdamW step."""
    opt = adamw(param_groups(net, 0.05), lr=1e-4)

    def step(x: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net, x).backward()
        opt.step()

    return step


def _student_loss(k: int) -> Callable[[nn.Module, Tensor], Tensor]:
    def loss(net: nn.Module, x: Tensor) -> Tensor:
        return F.cross_entropy(net(x), torch.arange(x.shape[0], device=x.device) % k)

    return loss


def student_fit(
    cfg: Config, compiled: bool, cases: int, batch: int, epochs: int, device: torch.device
) -> float:
    """Wall seconds of one student fit (building the network, compilation and every step included)."""
    c = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"compile": compiled})})
    g = torch.Generator().manual_seed(0)
    data = torch.rand(cases, 1, *cfg.mri.size, generator=g).to(device)
    _sync(device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    net = compile_if_enabled(build_student(c).to(device).train(), c, device)
    step = _stepper(net, _student_loss(cfg.task.num_classes))
    for _ in range(epochs):
        order = torch.randperm(cases, generator=g)
        for i in range(0, cases, batch):
            step(data[order[i : i + batch].to(device)])
    _sync(device)
    return time.perf_counter() - t0


def _cases(cfg: Config, device: torch.device) -> dict[str, tuple[Callable[[], nn.Module], Tensor, Any]]:
    """Per network: a builder, one batch, the loss (demo batch sizes)."""
    k = cfg.task.num_classes
    vol = torch.rand(cfg.finetune.batch_size, 1, *cfg.mri.size, device=device)
    mvol = torch.rand(cfg.mae.batch_size, 1, *cfg.mri.size, device=device)
    clips = torch.rand(cfg.teacher.batch_size, 1, cfg.tvus.frames, *cfg.tvus.size, device=device)
    cl = teacher_channels_last(cfg, device)
    if cl:
        clips = clips.contiguous(memory_format=torch.channels_last_3d)

    def teacher() -> nn.Module:
        net = build_teacher(cfg.teacher, k).to(device)
        return net.to(memory_format=torch.channels_last_3d) if cl else net

    return {
        "student": (lambda: build_student(cfg).to(device), vol, _student_loss(k)),
        "mae": (lambda: build_mae(cfg).to(device), mvol, lambda n, x: n(x)[0]),
        "teacher": (teacher, clips, _student_loss(k)),
    }


def steady_state(cfg: Config, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """Eager and compiled training-step times of each network, timed in turns after warm-up."""
    c = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"compile": True})})
    rows = []
    for name, (build, x, loss) in _cases(cfg, device).items():
        torch.manual_seed(0)
        eager = _stepper(build().train(), loss)
        torch.manual_seed(0)
        comp = _stepper(compile_if_enabled(build().train(), c, device), loss)
        _sync(device)
        t0 = time.perf_counter()
        comp(x)  # compilation (the student's graphs already exist: the end-to-end fits ran before)
        comp(x)
        _sync(device)
        warm_up = time.perf_counter() - t0
        eager(x)
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(repeats):
            for variant, step in (("eager", eager), ("compiled", comp)):
                _sync(device)
                t0 = time.perf_counter()
                step(x)
                _sync(device)
                times[variant].append(time.perf_counter() - t0)
        row = {
            "net": name,
            "batch": int(x.shape[0]),
            "eager_s": min(times["eager"]),
            "compiled_s": min(times["compiled"]),
            "eager_median_s": statistics.median(times["eager"]),
            "compiled_median_s": statistics.median(times["compiled"]),
            "compile_warmup_s": warm_up,
        }
        row["compiled_over_eager"] = row["compiled_s"] / row["eager_s"]
        rows.append(row)
        print(
            f"  {name:<8} batch {row['batch']:>2}  eager {row['eager_s']:.4f} s  compiled {row['compiled_s']:.4f} s"
            f"  ratio {row['compiled_over_eager']:.2f}  (first two compiled steps {warm_up:.1f} s)",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=160)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7, help="timed steady-state steps per variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/compile.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="torch.meshgrid")
    device = torch.device(args.device)
    cfg = load_config("demo")
    t_all = time.perf_counter()
    fits = {
        "eager_s": student_fit(cfg, False, args.cases, args.batch, args.epochs, device),
        "compiled_first_s": student_fit(cfg, True, args.cases, args.batch, args.epochs, device),
        "compiled_second_s": student_fit(cfg, True, args.cases, args.batch, args.epochs, device),
    }
    fits["first_over_eager"] = fits["compiled_first_s"] / fits["eager_s"]
    fits["second_over_eager"] = fits["compiled_second_s"] / fits["eager_s"]
    print(
        f"student fit ({args.cases} cases, batch {args.batch}, {args.epochs} epochs): eager {fits['eager_s']:.2f} s, "
        f"compiled {fits['compiled_first_s']:.2f} s first ({fits['first_over_eager']:.1f}x), "
        f"{fits['compiled_second_s']:.2f} s second in the process ({fits['second_over_eager']:.2f}x)",
        flush=True,
    )
    print("steady-state training step (best of the timed steps):", flush=True)
    rows = steady_state(cfg, args.repeats, device)
    result = {
        "device": device.type,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "inductor_cache": os.environ["TORCHINDUCTOR_CACHE_DIR"],
        "fit": {"cases": args.cases, "batch": args.batch, "epochs": args.epochs, **fits},
        "steps": rows,
        "total_s": time.perf_counter() - t_all,
    }
    atomic_write_json(args.out, result)
    print(f"total {result['total_s']:.0f} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

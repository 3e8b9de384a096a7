"""Training-step benchmark of the student, the MAE and the teacher, ours vs the libraries' defaults.

For each network, at the demo size (``load_config("demo")``) and at a "paper-lite" size (the paper preset's
networks: ViT-B at 96^3 with 16^3 patches, R(2+1)D-18 on 16x112x112 clips, with small batches), it measures:

* the wall time of one training step (forward, loss, backward, AdamW step): the best of a few steps, timed
  in turns with the other variants (the median is kept in the JSON too). Our variants step with the
  training's optimiser (``endodistill.train.optim.adamw``: fused AdamW, no weight decay on norms and
  biases); the library defaults with ``torch.optim.AdamW``'s defaults (a per-tensor loop on CPU);
* the FLOPs of that step, counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions,
  attention; forward and backward). FlopCounterMode has no formula for CPU's fused SDPA kernel, so FLOPs are
  counted on the same weights with MONAI's explicit einsum attention, which does the same multiplications;
* the achieved FLOP/s as a fraction of a matrix-multiply peak measured in the same run (best of a few large
  fp32 ``torch.mm``).

Variants side by side:

* student ``ours``: :class:`StudentViT` (SDPA attention, no Tanh, qkv bias); ``monai_default``: MONAI's ``ViT``
  with the same sizes and MONAI's defaults otherwise (einsum attention, ``post_activation="Tanh"``,
  ``qkv_bias=False``).
* mae ``ours``: :class:`MAE` (SDPA, our masked loss); ``monai_default``: ``MaskedAutoEncoderViT`` with the same
  sizes and MONAI's defaults otherwise (einsum attention, ``qkv_bias=False``, decoder MLP 512), same loss;
  ``ours_monai_sizes``: our :class:`MAE` built with those MONAI defaults (the same FLOPs as
  ``monai_default``), to compare the implementations at equal work.
* teacher ``ours``: grayscale stem (1 channel) in the memory layout training picks for that batch
  (:func:`endodistill.train.speed.teacher_channels_last`); ``torchvision_default``: the same network as
  torchvision builds it (3-channel stem, the grey clip repeated to RGB, contiguous); ``ours_cl3d`` or
  ``ours_contiguous``: ours in the other layout.

Usage: ``python -m benchmarks.bench_models [--quick] [--repeats N] [--only NET ...] [--sizes SIZE ...]
[--threads N] [--out PATH] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.networks.nets import MaskedAutoEncoderViT, ViT
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from endodistill.config import Config, TeacherConfig, load_config
from endodistill.models.student import MAE, build_mae, build_student, enable_sdpa
from endodistill.models.teacher import build_teacher
from endodistill.train.optim import adamw, param_groups
from endodistill.train.speed import teacher_channels_last
from endodistill.utils import atomic_write_json

StepFn = Callable[[], Tensor]


def matmul_peak(n: int, repeats: int, device: torch.device) -> float:
    """Best achieved FLOP/s of an ``n x n`` fp32 matrix product."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up (thread pool, allocator)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor], ours: bool) -> StepFn:
    if ours:
        opt: torch.optim.Optimizer = adamw(param_groups(model, 0.01), lr=1e-4)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _count_flops(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> int:
    # Count on a copy with explicit attention (see the module docstring); no optimizer step.
    m = copy.deepcopy(model)
    enable_sdpa(m, False)
    with FlopCounterMode(display=False) as fc:
        loss_fn(m).backward()
    return int(fc.get_total_flops())


def _time_interleaved(steps: dict[str, StepFn], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Time the variants' steps in turns (A, B, A, B, ...) so that load from other processes on a shared
    machine hits every variant alike; one untimed warm-up step each."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _mae_masked_mse(x: Tensor, pred: Tensor, mask: Tensor, patch: tuple[int, int, int]) -> Tensor:
    target = rearrange(
        x, "b c (g0 p0) (g1 p1) (g2 p2) -> b (g0 g1 g2) (p0 p1 p2 c)", p0=patch[0], p1=patch[1], p2=patch[2]
    )
    per_patch = F.mse_loss(pred, target, reduction="none").mean(-1)  # as MAE.loss computes it
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum()


def student_cases(cfg: Config, batch: int, device: torch.device) -> dict[str, tuple[nn.Module, Any]]:
    """Our student and MONAI's default ViT of the same size, with their loss functions."""
    s = cfg.student
    x = torch.rand(batch, 1, *cfg.mri.size, device=device)
    y = torch.arange(batch, device=device) % cfg.task.num_classes
    ours = build_student(cfg).to(device).train()
    default = ViT(
        in_channels=1,
        img_size=cfg.mri.size,
        patch_size=s.patch_size,
        hidden_size=s.hidden_size,
        mlp_dim=s.mlp_dim,
        num_layers=s.num_layers,
        num_heads=s.num_heads,
        classification=True,
        num_classes=cfg.task.num_classes,
        spatial_dims=3,
    ).to(device)
    return {
        "ours": (ours, lambda m: F.cross_entropy(m(x), y)),
        "monai_default": (default.train(), lambda m: F.cross_entropy(m(x)[0], y)),
    }


def mae_cases(cfg: Config, batch: int, device: torch.device) -> dict[str, tuple[nn.Module, Any]]:
    """Our MAE and MONAI's default MaskedAutoEncoderViT of the same size, with the same masked loss."""
    s, mc = cfg.student, cfg.mae
    x = torch.rand(batch, 1, *cfg.mri.size, device=device)
    ours = build_mae(cfg).to(device).train()
    sizes: dict[str, Any] = {
        "in_channels": 1,
        "img_size": cfg.mri.size,
        "patch_size": s.patch_size,
        "hidden_size": s.hidden_size,
        "mlp_dim": s.mlp_dim,
        "num_layers": s.num_layers,
        "num_heads": s.num_heads,
        "masking_ratio": mc.mask_ratio,
        "decoder_hidden_size": mc.decoder_hidden_size,
        "decoder_num_layers": mc.decoder_layers,
        "decoder_num_heads": mc.decoder_heads,
        "spatial_dims": 3,
    }
    default = MaskedAutoEncoderViT(**sizes).to(device)
    same_sizes = MAE(norm_pix_loss=mc.norm_pix_loss, **sizes).to(device).train()
    patch = tuple(s.patch_size)

    def default_loss(m: nn.Module) -> Tensor:
        pred, mask = m(x)
        return _mae_masked_mse(x, pred, mask, patch)  # type: ignore[arg-type]

    return {
        "ours": (ours, lambda m: m(x)[0]),
        "monai_default": (default.train(), default_loss),
        "ours_monai_sizes": (same_sizes, lambda m: m(x)[0]),
    }


def teacher_cases(
    tcfg: TeacherConfig, frames: int, size: tuple[int, int], batch: int, k: int, device: torch.device
) -> dict[str, tuple[nn.Module, Any]]:
    """Our grayscale teacher in training's layout, the RGB network torchvision builds, ours in the other layout."""
    x = torch.rand(batch, 1, frames, *size, device=device)
    y = torch.arange(batch, device=device) % k
    contiguous = build_teacher(tcfg, k, in_channels=1).to(device).train()
    default = build_teacher(tcfg, k, in_channels=3).to(device).train()
    x_rgb = x.expand(-1, 3, -1, -1, -1).contiguous()
    cl = copy.deepcopy(contiguous).to(memory_format=torch.channels_last_3d)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    as_trained = Config(teacher=tcfg.model_copy(update={"batch_size": batch}))
    cases: dict[str, tuple[nn.Module, Any]] = {
        "cl3d": (cl, lambda m: F.cross_entropy(m(x_cl), y)),
        "contiguous": (contiguous, lambda m: F.cross_entropy(m(x), y)),
    }
    mine, other = (
        ("cl3d", "contiguous") if teacher_channels_last(as_trained, device) else ("contiguous", "cl3d")
    )
    return {
        "ours": cases[mine],
        "torchvision_default": (default, lambda m: F.cross_entropy(m(x_rgb), y)),
        f"ours_{other}": cases[other],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every case and return the JSON-ready results."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # MONAI's sin-cos embedding calls torch.meshgrid without indexing=: harmless, silence the noise.
    warnings.filterwarnings("ignore", message="torch.meshgrid")
    device = torch.device(args.device)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    peak = matmul_peak(1024 if args.quick else 2048, 3 if args.quick else 5, device)
    print(
        f"matmul peak (fp32, {args.threads} thread(s), {device.type}): {peak / 1e9:.1f} GFLOP/s", flush=True
    )

    demo = load_config("demo")
    paper = load_config("paper")
    plan: list[tuple[str, str, int, Callable[[], dict[str, tuple[nn.Module, Any]]]]] = []
    b = demo.finetune.batch_size
    plan.append(("demo", "student", b, lambda b=b: student_cases(demo, b, device)))
    b = demo.mae.batch_size
    plan.append(("demo", "mae", b, lambda b=b: mae_cases(demo, b, device)))
    b = demo.teacher.batch_size
    plan.append(
        (
            "demo",
            "teacher",
            b,
            lambda b=b: teacher_cases(
                demo.teacher, demo.tvus.frames, demo.tvus.size, b, demo.task.num_classes, device
            ),
        )
    )
    pb = args.paper_batch
    plan.append(("paper-lite", "student", pb, lambda: student_cases(paper, pb, device)))
    plan.append(("paper-lite", "mae", pb, lambda: mae_cases(paper, pb, device)))
    plan.append(
        (
            "paper-lite",
            "teacher",
            1,
            lambda: teacher_cases(paper.teacher, paper.tvus.frames, paper.tvus.size, 1, 2, device),
        )
    )

    rows: list[dict[str, Any]] = []
    for size, net, batch, make in plan:
        if (args.only and net not in args.only) or (args.sizes and size not in args.sizes):
            continue
        cases = make()
        flops = {name: _count_flops(model, loss_fn) for name, (model, loss_fn) in cases.items()}
        steps = {
            name: _train_step(model, loss_fn, ours=name.startswith("ours"))
            for name, (model, loss_fn) in cases.items()
        }
        times = _time_interleaved(steps, repeats, device)
        for variant, (model, _) in cases.items():
            best, med = min(times[variant]), statistics.median(times[variant])
            row = {
                "size": size,
                "net": net,
                "variant": variant,
                "batch": batch,
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "gflop_per_step": flops[variant] / 1e9,
                "step_s": best,
                "step_s_median": med,
                "gflops": flops[variant] / best / 1e9,
                "fraction_of_peak": flops[variant] / best / peak,
            }
            rows.append(row)
            print(
                f"  {size:<10} {net:<8} {variant:<20} batch {batch:>2}  {row['gflop_per_step']:8.2f} GFLOP"
                f"  {best:8.3f} s  {row['gflops']:7.1f} GFLOP/s  {100 * row['fraction_of_peak']:5.1f}% of peak",
                flush=True,
            )
        del cases, steps
    return {
        "device": device.type,
        "threads": args.threads,
        "quick": args.quick,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "matmul_peak_gflops": peak / 1e9,
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    """A side-by-side text table: each row a network, ours vs the library default."""
    lines = [
        f"matmul peak {result['matmul_peak_gflops']:.1f} GFLOP/s ({result['device']}, {result['threads']} thread(s))",
        f"{'size':<10} {'net':<8} {'variant':<20} {'batch':>5} {'params M':>9} {'GFLOP/step':>11} "
        f"{'s/step':>8} {'median':>8} {'GFLOP/s':>8} {'% peak':>7} {'vs ours':>8}",
    ]
    ours_time: dict[tuple[str, str], float] = {}
    for r in result["rows"]:
        key = (r["size"], r["net"])
        if r["variant"] == "ours":
            ours_time[key] = r["step_s"]
        rel = r["step_s"] / ours_time[key] if key in ours_time else float("nan")
        lines.append(
            f"{r['size']:<10} {r['net']:<8} {r['variant']:<20} {r['batch']:>5} {r['params_m']:>9.2f} "
            f"{r['gflop_per_step']:>11.2f} {r['step_s']:>8.3f} {r['step_s_median']:>8.3f} {r['gflops']:>8.1f} "
            f"{100 * r['fraction_of_peak']:>6.1f}% {rel:>7.2f}x"
        )
    lines.append("s/step: best of the timed steps (GFLOP/s and % peak use it); 'vs ours': best step time")
    lines.append("relative to ours (> 1: the default is slower).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one timed step per case, smaller matmul peak")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--repeats", type=int, default=None, help="timed steps per variant (default: 1 with --quick, else 3)"
    )
    p.add_argument("--paper-batch", type=int, default=2, help="batch of the paper-lite student and MAE")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--only", nargs="*", choices=["student", "mae", "teacher"], help="benchmark only these nets"
    )
    p.add_argument("--sizes", nargs="*", choices=["demo", "paper-lite"], help="benchmark only these sizes")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/models.json"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    result["total_s"] = time.perf_counter() - t0
    print(format_table(result))
    print(f"total {result['total_s']:.0f} s; written to {args.out}")
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

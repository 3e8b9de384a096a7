"""The smaller speed-ups of the training and data path, each against its reference in the same run.

Each row times our code path and the plain alternative it replaced (or that a setting turns back on), on the
same inputs, and checks that both give the same result:

* ``adamw``: the demo student's optimiser step, fused AdamW against the per-tensor loop (``foreach=False``);
* ``patch_embed``: a whole demo student training step (forward, backward, fused AdamW; batch 16) with the
  patch embedding as one matrix product (``PatchConv3d``) against MONAI's strided ``Conv3d``, same weights;
* ``augment``: one demo batch's flips and intensity jitter, in place against out of place;
* ``lookahead``: a demo fine-tune fit's data time over step time, look-ahead thread on and off;
* ``save_weights``: a ViT-B state dict to safetensors, streamed from the tensors against copy + in-memory bytes;
* ``checkpoint``: a ViT-B checkpoint with its AdamW state, streamed into the file against an in-memory buffer;
* ``probe``: the MAE's mean-of-tokens linear probe (an untrained demo encoder's 48 features of 200 volumes,
  5 folds), Newton-Cholesky against L-BFGS (scikit-learn's default solver);
* ``synth``: generating a small demo-like cohort, a thread per CPU against one thread;
* ``preprocess``: preprocessing that cohort into an empty cache, a thread per CPU against one thread.

Usage: ``python -m benchmarks.bench_speedups [--repeats N] [--out PATH]``. About 1-2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from endodistill.utils import atomic_path, atomic_write_json


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls (after one warm-up call) and the last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def adamw(repeats: int) -> dict[str, Any]:
    from endodistill.config import load_config
    from endodistill.models.student import build_student
    from endodistill.train.optim import adamw as fused_adamw
    from endodistill.train.optim import param_groups

    cfg = load_config("demo")
    nets = [build_student(cfg), build_student(cfg)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [
        fused_adamw(param_groups(nets[0], 0.05), lr=1e-3),
        torch.optim.AdamW(param_groups(nets[1], 0.05), lr=1e-3, foreach=False),
    ]
    for net in nets:
        for p in net.parameters():
            p.grad = torch.full_like(p, 1e-3)

    def steps(k: int) -> Callable[[], None]:
        return lambda: [opts[k].step() for _ in range(50)] and None

    ours, _ = _best(steps(0), repeats)
    ref, _ = _best(steps(1), repeats)
    diff = max((a - b).abs().max().item() for a, b in zip(nets[0].parameters(), nets[1].parameters()))
    return {"ours_s": ours / 50, "reference_s": ref / 50, "check": f"max weight difference {diff:.1e}"}


def patch_embed(repeats: int) -> dict[str, Any]:
    from endodistill.config import load_config
    from endodistill.models.student import build_student
    from endodistill.train.optim import adamw as fused_adamw
    from endodistill.train.optim import param_groups

    cfg = load_config("demo")
    torch.manual_seed(0)
    nets = [build_student(cfg), build_student(cfg)]
    nets[1].load_state_dict(nets[0].state_dict())
    pe = nets[1].patch_embedding
    fast = pe.patch_embeddings
    conv = torch.nn.Conv3d(fast.in_channels, fast.out_channels, fast.kernel_size, stride=fast.stride)
    conv.load_state_dict(fast.state_dict())
    pe.patch_embeddings = conv  # MONAI's own module: the reference
    x = torch.randn(16, 1, *cfg.mri.size, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 2
    with torch.no_grad():
        diff = (nets[0](x) - nets[1](x)).abs().max().item()
    opts = [fused_adamw(param_groups(net, 0.05), lr=1e-3) for net in nets]

    def steps(k: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(20):
                loss = torch.nn.functional.cross_entropy(nets[k](x), y)
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()

        return run

    # Interleaved, so that a slower stretch of a shared machine hits both.
    times: list[list[float]] = [[], []]
    for _ in range(max(3, repeats)):
        for k in (0, 1):
            times[k].append(_best(steps(k), 1)[0] / 20)
    return {
        "ours_s": min(times[0]),
        "reference_s": min(times[1]),
        "check": f"same weights; logits differ by {diff:.1e}",
    }


def augment(repeats: int) -> dict[str, Any]:
    from endodistill.train.pretrain import augment_volumes

    x = torch.rand(16, 1, 16, 32, 32)

    def reference(xb: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        b = xb.shape[0]
        flip = torch.from_numpy(rng.random(b) < 0.5)
        scale = torch.from_numpy(rng.uniform(0.9, 1.1, size=b).astype(np.float32)).view(b, 1, 1, 1, 1)
        shift = torch.from_numpy(rng.uniform(-0.05, 0.05, size=b).astype(np.float32)).view(b, 1, 1, 1, 1)
        return torch.where(flip.view(b, 1, 1, 1, 1), xb.flip(2), xb) * scale + shift

    ours, a = _best(
        lambda: [augment_volumes(x.clone(), np.random.default_rng(i)) for i in range(100)], repeats
    )
    ref, b = _best(lambda: [reference(x.clone(), np.random.default_rng(i)) for i in range(100)], repeats)
    same = all(torch.equal(u, v) for u, v in zip(a, b))
    return {"ours_s": ours / 100, "reference_s": ref / 100, "check": f"identical batches: {same}"}


def lookahead(repeats: int) -> dict[str, Any]:
    from benchmarks.bench_overhead import _fit
    from endodistill.config import load_config

    res = {}
    for on in (True, False):
        cfg = load_config("demo", ["finetune.epochs=5", f"trainer.lookahead={str(on).lower()}"])
        rows = [_fit("finetune", cfg, 160, Path(tempfile.mkdtemp()), cfg) for _ in range(repeats)]
        res[on] = min(r["data"] / r["step"] for r in rows)
    return {
        "ours_s": res[True],
        "reference_s": res[False],
        "unit": "data/step",
        "check": "same batches (tested)",
    }


def _paper_student_and_optimiser() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from endodistill.config import load_config
    from endodistill.models.student import build_student
    from endodistill.train.optim import adamw as fused_adamw
    from endodistill.train.optim import param_groups

    net = build_student(load_config("paper"))
    opt = fused_adamw(param_groups(net, 0.05), lr=1e-4)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return net, opt


def save_weights(repeats: int, net: torch.nn.Module, tmp: Path) -> dict[str, Any]:
    from safetensors.torch import save as safetensors_bytes

    from endodistill.models.weights import save_weights as ours_save

    state = net.state_dict()

    def reference() -> None:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        with atomic_path(tmp / "ref.safetensors") as t:
            t.write_bytes(safetensors_bytes(tensors))

    ours, _ = _best(lambda: ours_save(tmp / "ours.safetensors", state), repeats)
    ref, _ = _best(reference, repeats)
    same = (tmp / "ours.safetensors").read_bytes() == (tmp / "ref.safetensors").read_bytes()
    return {"ours_s": ours, "reference_s": ref, "check": f"byte-identical files: {same}"}


def checkpoint(repeats: int, net: torch.nn.Module, opt: torch.optim.Optimizer, tmp: Path) -> dict[str, Any]:
    from endodistill.train.checkpoint_io import AtomicCheckpointIO

    ckpt = {"state_dict": net.state_dict(), "optimizer_states": [opt.state_dict()]}
    io_ = AtomicCheckpointIO()

    def reference() -> None:
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        with open(tmp / "ref.ckpt", "wb") as fh:
            fh.write(buf.getbuffer())

    ours, _ = _best(lambda: io_.save_checkpoint(ckpt, tmp / "ours.ckpt"), repeats)
    ref, _ = _best(reference, repeats)
    mib = (tmp / "ours.ckpt").stat().st_size / 2**20
    return {"ours_s": ours, "reference_s": ref, "check": f"{mib:.0f} MiB"}


def synth_and_preprocess(tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import hashlib

    from endodistill.config import load_config
    from endodistill.data.synthetic import generate_cohort
    from endodistill.train.data import load_cohort

    kw = {"preset": "demo", "seed": 0, "n_mri_labelled": 60, "n_mri_unlabelled": 60, "n_tvus": 40}
    times, digests, cohorts = {}, {}, {}
    for threads in (None, 1):
        out = tmp / f"cohort_{threads}"
        t0 = time.perf_counter()
        generate_cohort(out, threads=threads, **kw)
        times[threads] = time.perf_counter() - t0
        digests[threads] = {
            str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in out.rglob("*")
            if p.is_file()
        }
    synth = {
        "ours_s": times[None],
        "reference_s": times[1],
        "check": f"byte-identical files: {digests[None] == digests[1]}",
    }
    for threads in (None, 1):
        cfg = load_config(
            "demo", {"data": {"cache_dir": str(tmp / f"cache_{threads}"), "preprocess_threads": threads}}
        )
        t0 = time.perf_counter()
        cohorts[threads] = load_cohort(cfg, tmp / "cohort_1" / "manifest.csv")
        times[threads] = time.perf_counter() - t0
    a, b = cohorts[None], cohorts[1]
    same = torch.equal(a.labelled.x, b.labelled.x) and all(
        np.array_equal(u, v) for u, v in zip(a.tvus.clips, b.tvus.clips)
    )
    pre = {"ours_s": times[None], "reference_s": times[1], "check": f"identical tensors: {same}"}
    return synth, pre


def probe(repeats: int) -> dict[str, Any]:
    from scipy.ndimage import gaussian_filter
    from sklearn.metrics import roc_auc_score

    from endodistill.config import load_config
    from endodistill.models.student import build_mae
    from endodistill.train.probe import encoder_features, probe_oof

    # The demo probe's inputs: an untrained demo encoder's mean of tokens (48 features) of 200 smooth random
    # volumes, labelled by the brightness of one region (a weak, local signal, like a sign).
    rng = np.random.default_rng(0)
    vols = gaussian_filter(rng.normal(size=(200, 1, 16, 32, 32)), sigma=(0, 0, 2, 2, 2)).astype(np.float32)
    region = vols[:, 0, 4:8, 8:16, 8:16].mean(axis=(1, 2, 3))
    y = (region + 0.5 * region.std() * rng.normal(size=200) > np.median(region)).astype(np.int64)
    torch.manual_seed(0)
    x = encoder_features(build_mae(load_config("demo")), torch.from_numpy(vols), "mean")
    folds = [np.arange(f, 200, 5) for f in range(5)]
    ours, a = _best(lambda: probe_oof(x, y, folds), repeats)
    ref, b = _best(lambda: probe_oof(x, y, folds, solver="lbfgs"), repeats)
    d = abs(roc_auc_score(y, a) - roc_auc_score(y, b))
    return {"ours_s": ours, "reference_s": ref, "check": f"out-of-fold AUC differs by {d:.4f}"}


def main(argv: list[str] | None = None) -> int:
    """Time every speed-up against its reference and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/speedups.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from endodistill.train.runtime import quiet_lightning

    quiet_lightning()
    rows: dict[str, dict[str, Any]] = {}
    rows["adamw"] = adamw(args.repeats)
    rows["patch_embed"] = patch_embed(args.repeats)
    rows["augment"] = augment(args.repeats)
    rows["lookahead"] = lookahead(args.repeats)
    rows["probe"] = probe(args.repeats)
    with tempfile.TemporaryDirectory(prefix="endodistill-speedups-") as d:
        tmp = Path(d)
        net, opt = _paper_student_and_optimiser()
        rows["save_weights"] = save_weights(args.repeats, net, tmp)
        rows["checkpoint"] = checkpoint(min(args.repeats, 2), net, opt, tmp)
        del net, opt
        rows["synth"], rows["preprocess"] = synth_and_preprocess(tmp)
    print(f"speed-ups against their references ({os.cpu_count()} CPUs, best of {args.repeats})")
    print(f"{'what':<14}{'ours':>12}{'reference':>12}{'ratio':>8}  check")
    for name, r in rows.items():
        unit = r.get("unit", "s")
        fmt = (lambda v: f"{v:>11.3%} ") if unit == "data/step" else (lambda v: f"{v:>11.4f}s")
        print(
            f"{name:<14}{fmt(r['ours_s'])}{fmt(r['reference_s'])}{r['ours_s'] / r['reference_s']:>8.2f}  {r['check']}"
        )
    print("ratio = ours / reference (below 1: ours is faster); lookahead row: data time over step time")
    atomic_write_json(args.out, {"cpus": os.cpu_count(), "repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

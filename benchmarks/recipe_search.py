"""The recipe search of issue 12: student / MAE settings scored on a cohort's own 5 folds, outside the protocol.

Run: ``.venv/bin/python -m benchmarks.recipe_search '{"student.pool": "flat"}' COHORT_DIR[,COHORT_DIR...] MODE``
with MODE ``scratch`` (scratch_ce only), ``mae`` (MAE + probes + mae_ce), ``both``, ``probe``, ``cnn3d``
(the cnn3d baseline, ``baselines.cnn3d`` and ``finetune.translate``) or ``draws`` (the package's
mean-of-tokens probe on ``mae.probe_draws`` untrained encoders from their own seeds, and on the first one with
as many inner-CV seeds: how much the untrained reference varies); the JSON
holds ``--set``-style overrides of the demo preset (``"_pool": N`` pre-trains on the first N unlabelled
volumes, ``"_labels": N`` trains each fold on N of its labelled training cases, stratified, the same for both
methods, ``"_fitseeds": K`` averages K training seeds per fold, ``"_maeseed": K`` pre-trains from another seed, ``"_tta": V`` also scores test-time views, ``"_ema"`` an average of the weights, ``"_keep": R`` PatchDropout, ``"_lp": E`` the encoder frozen for the first E epochs: see below). Each cohort is a synthetic cohort directory (``endodistill synth --seed 10 ...``): choose on seeds
you do not report. It uses the package's own networks, augmentation, optimiser groups and schedule in a
plain loop (no Lightning, no KD: the task-loss methods only), the run's split rule, and prints pooled
out-of-fold AUCs per cohort and their mean. This is how the numbers in configs/demo.yaml were measured.
"""

import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from endodistill.config import load_config
from endodistill.models.student import build_mae, build_student, load_mae_encoder, mae_encoder_state
from endodistill.train.finetune import layer_decay_groups
from endodistill.train.losses import balanced_class_weights
from endodistill.train.optim import adamw, param_groups, warmup_cosine
from endodistill.train.pretrain import augment_volumes

torch.set_num_threads(1)
AVERAGE = None
KEEP = None
LP_EPOCHS = 0


def load(cohort):
    """Labelled volumes, labels, unlabelled pool and the protocol's folds of a cohort directory."""
    from endodistill.data.splits import make_cv_splits
    from endodistill.train.data import load_cohort

    cfg = load_config("demo", [f"data.manifest={cohort}/manifest.csv"])
    d = load_cohort(cfg, f"{cohort}/manifest.csv")
    lab = d.labelled
    folds = np.zeros(len(lab), int)
    for f, fo in enumerate(make_cv_splits(lab.subjects, lab.labels.tolist(), 5, cfg.seed, 0.0)):
        folds[lab.index(fo["test"])] = f
    seed = int(json.loads(Path(cohort, "cohort.json").read_text()).get("seed", 0))
    return {"x": lab.x.numpy(), "y": lab.labels, "u": d.unlabelled.x.numpy(), "folds": folds, "seed": seed}


def cfg_of(over):
    return load_config("demo", [f"{k}={json.dumps(v)}" for k, v in over.items()])


def train_mae(cfg, u, seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mae = build_mae(cfg)
    m = cfg.mae
    opt = adamw(param_groups(mae, m.weight_decay), lr=m.lr, betas=(0.9, 0.95))
    n = u.shape[0]
    bs = m.batch_size
    steps = m.epochs * int(np.ceil(n / bs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 0.1))
    g = torch.Generator().manual_seed(seed)
    mae.train()
    losses = []
    for _epoch in range(m.epochs):
        perm = rng.permutation(n)
        el = 0
        for i in range(0, n, bs):
            xb = augment_volumes(u[torch.from_numpy(perm[i : i + bs])], rng, m.translate)
            loss, _, _ = mae(xb, generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            el += float(loss.detach()) * xb.shape[0]
        losses.append(el / n)
    mae.eval()
    return mae, losses


@torch.no_grad()
def feats(enc, x, kind="mean"):
    t = enc.encode(x)
    if kind == "mean":
        return t[:, 1:].mean(1).numpy()
    if kind == "cls":
        return t[:, 0].numpy()
    if kind == "flat":
        return t[:, 1:].flatten(1).numpy()
    return torch.cat([t[:, 0], t[:, 1:].mean(1)], 1).numpy()


def probe(fx, y, folds):
    oof = np.zeros(len(y))
    for f in range(5):
        tr, te = folds != f, folds == f
        mu, sd = fx[tr].mean(0), fx[tr].std(0) + 1e-6
        clf = LogisticRegressionCV(
            Cs=np.logspace(-3, 2, 8),
            cv=StratifiedKFold(3, shuffle=True, random_state=0),
            scoring="roc_auc",
            max_iter=2000,
            l1_ratios=(0.0,),  # the L2 path, said explicitly (no scikit-learn FutureWarning)
            use_legacy_attributes=False,
        )
        clf.fit((fx[tr] - mu) / sd, y[tr])
        oof[te] = clf.predict_proba((fx[te] - mu) / sd)[:, 1]
    return roc_auc_score(y, oof)


def forward_keep(net, x, keep):
    """Training logits of a flat-head student that sees a random ``keep`` share of its patch tokens
    (PatchDropout, Liu et al. 2022): the dropped tokens skip the blocks and reach the head as zeros, the kept
    ones scaled by ``1 / keep`` as in inverted dropout, so the head sees every token position at test time
    (the plain forward) at the same scale. Draws from torch's global RNG, seeded per fit."""
    t = net.patch_embedding(x)
    b, n, d = t.shape
    k = max(1, round(keep * n))
    idx = torch.rand(b, n).argsort(1)[:, :k, None].expand(-1, -1, d)
    h = torch.cat((net.cls_token.expand(b, -1, -1), t.gather(1, idx)), 1)
    for blk in net.blocks:
        h = blk(h)
    h = net.norm(h)
    out = torch.zeros(b, n, d, dtype=h.dtype).scatter(1, idx, h[:, 1:] * (n / k))
    return net.classification_head(out.flatten(1))


def fit_student(cfg, x, y, seed, enc_state=None, ls=0.0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_student(cfg)
    if enc_state is not None:
        load_mae_encoder(net, enc_state)
    f = cfg.finetune
    opt = adamw(layer_decay_groups(net, f.weight_decay, f.lr, f.layer_decay), lr=f.lr)
    n = len(y)
    bs = f.batch_size
    steps = f.epochs * int(np.ceil(n / bs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 0.1))
    cw = balanced_class_weights(y, 2)
    yt = torch.from_numpy(y)
    losses = []
    net.train()
    # "_ema": an average of the weights along the fit is what is scored (torch.optim.swa_utils): a decay
    # in (0, 1) for an exponential moving average of every step, or "swa" for the plain mean of the steps
    # of the second half of the epochs.
    avg = None
    if AVERAGE == "swa":
        avg = torch.optim.swa_utils.AveragedModel(net)
    elif AVERAGE:
        avg = torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(float(AVERAGE))
        )
    for _epoch in range(f.epochs):
        perm = rng.permutation(n)
        el = 0
        for i in range(0, n, bs):
            idx = torch.from_numpy(perm[i : i + bs])
            xb = augment_volumes(x[idx], rng, f.translate)
            logits = net(xb) if KEEP is None else forward_keep(net, xb, KEEP)
            loss = F.cross_entropy(logits, yt[idx], weight=cw, label_smoothing=ls)
            opt.zero_grad()
            loss.backward()
            if _epoch < LP_EPOCHS:
                # "_lp": linear probing, then fine-tuning (Kumar et al. 2022): the encoder (every group below
                # the head's learning rate) holds still for the first epochs while the head fits its features;
                # the scheduler resets the rates at its next step.
                for g in opt.param_groups:
                    if g.get("lr_scale", 1.0) < 1.0:
                        g["lr"] = 0.0
            opt.step()
            sched.step()
            if avg is not None and (AVERAGE != "swa" or _epoch >= f.epochs // 2):
                avg.update_parameters(net)
            el += float(loss.detach()) * len(idx)
        losses.append(el / n)
    if avg is not None:
        net = avg.module
    net.eval()
    return net, losses


def label_subset(y, tr, n, seed):
    """``n`` of the training rows ``tr`` (a boolean mask), stratified by label, seeded: the label-count curve."""
    if n is None or n >= int(tr.sum()):
        return tr
    rng = np.random.default_rng(seed)
    keep = np.zeros_like(tr)
    idx = np.flatnonzero(tr)
    for c in (0, 1):
        ic = idx[y[idx] == c]
        k = max(2, round(n * len(ic) / len(idx)))
        keep[rng.choice(ic, size=min(k, len(ic)), replace=False)] = True
    return keep


def tta_views(x, t):
    """Test-time views of ``x``: ``x`` itself first, then every shift by ``-t``, 0 or ``t`` voxels per axis
    (edge-replicated, as training translates), each with and without the left-right flip: 54 views for
    ``t`` > 0; ``t`` 0: ``x`` alone."""
    if not t:
        return [x]
    xp = torch.nn.functional.pad(x, (t,) * 6, mode="replicate")
    sx, sy, sz = x.shape[2:]
    offsets = [(0, 0, 0)] + [o for o in itertools.product((-t, 0, t), repeat=3) if o != (0, 0, 0)]
    views = []
    for i, j, m in offsets:
        v = xp[:, :, t + i : t + i + sx, t + j : t + j + sy, t + m : t + m + sz]
        views += [v, v.flip(2)]
    return views


def cv_cnn3d(cfg, D, fitseed=0, tta=0):
    """The cnn3d baseline (the package's train_cnn3d) on the cohort's folds: pooled out-of-fold AUC."""
    from endodistill.train.baselines import train_cnn3d

    x = torch.from_numpy(D["x"])
    y = D["y"]
    oof, oof_t = np.zeros(len(y)), np.zeros(len(y))
    for f in range(5):
        tr, te = D["folds"] != f, D["folds"] == f
        views = tta_views(x[te], tta)
        p = train_cnn3d(cfg, x[tr], y[tr], torch.cat(views), fitseed * 100 + f)[:, 1]
        p = p.reshape(len(views), -1)
        oof[te], oof_t[te] = p[0], p.mean(0)  # views[0] is x itself
    return roc_auc_score(y, oof), roc_auc_score(y, oof_t)


def cv(cfg, D, fitseed=0, enc_state=None, ls=0.0, n_labels=None, tta=0):
    x = torch.from_numpy(D["x"])
    y = D["y"]
    folds = D["folds"]
    oof, oof_t = np.zeros(len(y)), np.zeros(len(y))
    t = time.time()
    L = []
    for f in range(5):
        tr, te = label_subset(y, folds != f, n_labels, 7 + f), folds == f
        net, losses = fit_student(cfg, x[tr], y[tr], fitseed * 100 + f, enc_state, ls)
        with torch.no_grad():
            p = [net(v).softmax(1)[:, 1].numpy() for v in tta_views(x[te], tta)]
        oof[te], oof_t[te] = p[0], np.mean(p, axis=0)  # views[0] is x itself
        L.append(losses[-1])
    auc_t = roc_auc_score(y, oof_t) if tta else None
    return roc_auc_score(y, oof), (time.time() - t) / 5, float(np.mean(L)), auc_t


def untrained_spread(cfg, D, seed):
    """The package's mean-of-tokens probe on ``mae.probe_draws`` untrained encoders (the run's seeds for them),
    and on the first one with as many inner-CV seeds: how much one untrained reference varies."""
    from endodistill.train.probe import encoder_features, probe_oof, untrained_seed

    folds = [np.flatnonzero(D["folds"] == f) for f in range(5)]
    x = torch.from_numpy(D["x"])

    def auc(draw, inner):
        torch.manual_seed(untrained_seed(seed, draw))
        f = encoder_features(build_mae(cfg), x, "mean")
        return roc_auc_score(D["y"], probe_oof(f, D["y"], folds, seed=inner))

    n = cfg.mae.probe_draws
    draws = [auc(k, 0) for k in range(n)]
    inner = [auc(0, k) for k in range(n)]
    return {
        "draws": [round(a, 3) for a in draws],
        "draws_mean": round(float(np.mean(draws)), 3),
        "draws_sd": round(float(np.std(draws, ddof=1)), 3),
        "inner_sd": round(float(np.std(inner, ddof=1)), 3),
    }


if __name__ == "__main__":
    over = json.loads(sys.argv[1])
    seeds = sys.argv[2].split(",")
    what = sys.argv[3] if len(sys.argv) > 3 else "scratch"  # scratch | mae | both | probe
    pool_n = over.pop("_pool", None)
    # "_labels": N labelled training cases per fold (stratified subsample, the same for both methods);
    # "_fitseeds": K training seeds per fold, their pooled AUCs averaged (one seed is not evidence).
    n_labels = over.pop("_labels", None)
    n_fitseeds = over.pop("_fitseeds", 1)
    # "_translate": V sets mae.translate and finetune.translate (random translations of up to V voxels).
    translate = over.pop("_translate", 0)
    # "_maeseed": K pre-trains (and draws the untrained encoder) from another seed: MAE-to-MAE noise.
    mae_seed = 1000 + 7919 * int(over.pop("_maeseed", 0))
    # "_tta": V also scores every fit on the mean of 54 test views (with and without the left-right flip,
    # shifted by -V, 0 or V voxels per axis), beside the plain score of the same fits.
    tta = int(over.pop("_tta", 0))
    AVERAGE = over.pop("_ema", None)
    # "_keep": R trains every student on a random share R of its patch tokens (forward_keep).
    KEEP = over.pop("_keep", None)
    # "_lp": E holds the encoder still for the first E fine-tuning epochs (needs finetune.layer_decay < 1).
    LP_EPOCHS = int(over.pop("_lp", 0))
    if translate:
        over.update({"mae.translate": translate, "finetune.translate": translate})
    cfg = cfg_of(over)
    out = []
    for s in seeds:
        D = load(s)
        r = {"cohort": s}
        if what in ("mae", "both", "probe"):
            u = D["u"] if pool_n is None else D["u"][:pool_n]
            t = time.time()
            mae, ml = train_mae(cfg, torch.from_numpy(u), mae_seed + D["seed"])
            r["mae_s"] = round(time.time() - t, 1)
            r["mae_loss"] = [round(ml[0], 4), round(ml[-1], 4)]
            x = torch.from_numpy(D["x"])
            rnd = build_mae(cfg)  # same shape, untrained (seeded)
            torch.manual_seed(mae_seed + D["seed"])
            rnd = build_mae(cfg)
            rnd.eval()
            for kind in ("mean", "cls", "flat"):
                r[f"probe_{kind}"] = round(probe(feats(mae, x, kind), D["y"], D["folds"]), 3)
                r[f"rand_{kind}"] = round(probe(feats(rnd, x, kind), D["y"], D["folds"]), 3)
            enc = mae_encoder_state(mae)
        if what == "draws":
            r.update(untrained_spread(cfg, D, mae_seed + D["seed"]))
        if what == "cnn3d":
            res = [cv_cnn3d(cfg, D, k, tta) for k in range(n_fitseeds)]
            r["cnn3d"] = round(float(np.mean([q[0] for q in res])), 3)
            if tta:
                r["cnn3d_tta"] = round(float(np.mean([q[1] for q in res])), 3)
        if what in ("scratch", "both"):
            res = [cv(cfg, D, k, n_labels=n_labels, tta=tta) for k in range(n_fitseeds)]
            r["scratch"] = round(float(np.mean([q[0] for q in res])), 3)
            if tta:
                r["scratch_tta"] = round(float(np.mean([q[3] for q in res])), 3)
            r["s_per_fit"] = round(float(np.mean([q[1] for q in res])), 1)
            r["s_loss"] = round(float(np.mean([q[2] for q in res])), 3)
        if what in ("mae", "both"):
            res = [cv(cfg, D, k, enc_state=enc, n_labels=n_labels, tta=tta) for k in range(n_fitseeds)]
            r["mae_ce"] = round(float(np.mean([q[0] for q in res])), 3)
            if tta:
                r["mae_ce_tta"] = round(float(np.mean([q[3] for q in res])), 3)
            r["m_loss"] = round(float(np.mean([q[2] for q in res])), 3)
        if what == "both":
            r["gain"] = round(r["mae_ce"] - r["scratch"], 3)
        out.append(r)
    keys = [k for k in out[0] if k not in ("cohort", "mae_loss")]
    summ = {
        k: round(float(np.mean([o[k] for o in out])), 3) for k in keys if isinstance(out[0][k], (int, float))
    }
    if pool_n:
        over["_pool"] = pool_n
    if n_labels:
        over["_labels"] = n_labels
    if n_fitseeds != 1:
        over["_fitseeds"] = n_fitseeds
    if tta:
        over["_tta"] = tta
    if AVERAGE:
        over["_ema"] = AVERAGE
    if KEEP:
        over["_keep"] = KEEP
    if LP_EPOCHS:
        over["_lp"] = LP_EPOCHS
    print(
        json.dumps(over),
        what,
        "|",
        " ".join(json.dumps(o) for o in out),
        "| MEAN",
        json.dumps(summ),
        flush=True,
    )

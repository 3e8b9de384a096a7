"""The plans of the built-in studies: each study as a list of settings on top of a base configuration.

A setting is one method configuration (the fine-tuned student) plus, where the question needs it, overrides
of the rest of the config (the MAE's mask ratio, the teacher's labels, the cohort).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from endodistill.config import Config, MethodConfig
from endodistill.data.synthetic.presets import get_preset
from endodistill.errors import ConfigError

STUDIES = ("alpha", "mask_ratio", "kd_controls", "pairing", "pool", "labels", "grid")

# The shares of each fold's labelled training subjects in the `labels` study.
LABEL_FRACTIONS = (0.25, 0.5, 1.0)
# Severity coupling of the pairing study's cohorts: MRI population ceiling 0.816 (0.872 uncoupled), TVUS
# 0.980 unchanged (population_ceilings).
PAIRING_COUPLING = 0.5


@dataclass
class Setting:
    """One setting of a study.

    Attributes:
        name: the setting's name (a method name in its run, a row of every table).
        value: what the study varies, as shown on the figure's x axis.
        method: the fine-tuned method of this setting.
        overrides: nested config overrides outside ``protocol.methods`` (empty: the study's base config).
    """

    name: str
    value: str
    method: MethodConfig
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyPlan:
    """What a study runs: its settings, the reference they are compared with, and how to read them."""

    name: str
    question: str
    settings: list[Setting]
    reference: str
    varied: str
    # (a, b) pairs tested instead of every setting against `reference` (b is a's reference).
    pairs: list[tuple[str, str]] | None = None


def merge_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in (nested dicts merged, other values replaced)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------------------------------- plans


def _full(cfg: Config) -> MethodConfig:
    return cfg.protocol.methods[cfg.protocol.full_method]


def _upd(m: MethodConfig, **kw: Any) -> MethodConfig:
    """``m`` with fields replaced (nested dicts merged), validated."""
    return MethodConfig.model_validate(merge_dicts(m.model_dump(mode="json"), kw))


def _num(v: float) -> str:
    return f"{v:g}"


def _pairable_clips(cfg: Config) -> dict[str, Any]:
    """A synthetic cohort's clip count capped at its labelled MRI count (``{}`` when already within it).

    Every clip of a fully paired cohort belongs to a labelled MRI subject, so a preset with more clips than
    labelled volumes (the paper's: 300 against 200) cannot be paired at 1.0; the pairing study then gives
    every one of its settings that many clips, so they differ only in what they vary.
    """
    s = cfg.data.synth
    pre = get_preset(s.preset)
    n_l = pre.n_mri_labelled if s.n_mri_labelled is None else s.n_mri_labelled
    n_t = pre.n_tvus if s.n_tvus is None else s.n_tvus
    return {"n_tvus": n_l} if n_t > n_l else {}


def _parse_value(text: str) -> Any:
    """A ``--vary`` value: YAML scalar rules (numbers, booleans, null), else the string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # PyYAML reads "3e-3" as a string (YAML 1.1 floats need a dot)
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _nested(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        d = out
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    return out


def plan_study(name: str, cfg: Config, vary: Sequence[str] = ()) -> StudyPlan:
    """The settings of a built-in study (or of ``grid`` over ``vary``) on top of ``cfg``.

    Args:
        name: one of :data:`STUDIES`.
        cfg: the base configuration; its full method is the method every setting varies.
        vary: ``KEY=V1,V2,...`` (``grid`` only): the cartesian product of the values is the grid.

    Raises:
        ConfigError: an unknown study, or ``grid`` without ``vary`` / with a malformed one.
    """
    full = _full(cfg)
    if name == "alpha":
        alphas = (0.5, 0.7, 0.85, 0.95, 0.99)
        settings = [
            Setting(f"exp_{_num(a)}", f"exp {_num(a)}", _upd(full, schedule={"kind": "exp", "alpha": a}))
            for a in alphas
        ]
        settings += [
            Setting("constant_0.5", "constant 0.5", _upd(full, schedule={"kind": "constant", "alpha": 0.5})),
            Setting(
                "linear", "linear", _upd(full, schedule={"kind": "linear", "alpha": full.schedule.alpha})
            ),
            Setting(
                "cosine", "cosine", _upd(full, schedule={"kind": "cosine", "alpha": full.schedule.alpha})
            ),
        ]
        ref = f"exp_{_num(full.schedule.alpha)}" if full.schedule.alpha in alphas else settings[0].name
        return StudyPlan(
            name,
            "How does the KD weight schedule alpha**epoch (and its shape) change the full method?",
            settings,
            ref,
            "KD weight schedule",
        )
    if name == "mask_ratio":
        ratios = (0.3, 0.5, 0.75, 0.9)
        settings = [Setting(f"mask_{_num(r)}", _num(r), full, {"mae": {"mask_ratio": r}}) for r in ratios]
        ref_r = cfg.mae.mask_ratio if cfg.mae.mask_ratio in ratios else ratios[0]
        return StudyPlan(
            name,
            "Which MAE mask ratio pre-trains the best encoder (linear probe) and the best fine-tuned student?",
            settings,
            f"mask_{_num(ref_r)}",
            "MAE mask ratio",
        )
    if name == "kd_controls":
        settings = [
            Setting("full", "teacher outputs", full),
            Setting("class_mean", "(a) class-mean targets", _upd(full, kd_target="class_mean")),
            Setting(
                "label_smoothing", "(b) matched label smoothing", _upd(full, kd_target="smoothed_labels")
            ),
            Setting("permuted", "(c) permuted within class", _upd(full, kd_target="permuted")),
            Setting(
                "shuffled_teacher", "(d) shuffled-label teacher", full, {"teacher": {"shuffle_labels": True}}
            ),
        ]
        return StudyPlan(
            name,
            "Does distillation from unpaired, label-matched clips carry more than the label "
            "(class-wise label smoothing)?",
            settings,
            "full",
            "KD target",
        )
    if name == "pairing":
        # Every setting on a cohort with the planted severity (PAIRING_COUPLING): a paired subject's clip
        # then says how severe its MRI case is, which no label-matched clip can.
        planted = {"severity_coupling": PAIRING_COUPLING, **_pairable_clips(cfg)}
        settings = [
            Setting(
                f"noise_{_num(f)}",
                f"label noise {_num(f)}",
                _upd(full, pairing_noise=f),
                {"data": {"synth": dict(planted)}},
            )
            for f in (0.0, 0.1, 0.3)
        ]
        settings += [
            Setting(
                f"paired_{_num(p)}",
                f"paired {_num(p)}",
                _upd(full, pairing="paired"),
                {"data": {"synth": {**planted, "paired_fraction": p}}},
            )
            for p in (0.25, 0.5, 1.0)
        ]
        return StudyPlan(
            name,
            "What does imperfect label matching cost, and what does real pairing (a subject's own clip) add?",
            settings,
            "noise_0",
            "pairing",
        )
    if name == "pool":
        settings = [
            Setting(f"pool_{_num(f)}", f"{round(100 * f)}% of the pool", full, {"mae": {"pool_fraction": f}})
            for f in (0.25, 0.5, 1.0)
        ]
        settings.append(
            Setting("pool_shifted", "shifted-site pool", full, {"data": {"synth": {"pool_shift": True}}})
        )
        return StudyPlan(
            name,
            "How much do the size and the domain of the unlabelled MRI pool matter?",
            settings,
            "pool_1",
            "unlabelled pool",
        )
    if name == "labels":
        # MAE-initialised and scratch fine-tuning on the task loss alone, at each label count: the pairs
        # say what pre-training adds with few labels (the paper's premise), on the same test folds.
        ce = {"kind": "constant", "alpha": 0.0}
        settings = []
        pairs = []
        for f in LABEL_FRACTIONS:
            pct = f"{round(100 * f)}% of the labels"
            over = {"protocol": {"train_fraction": f}}
            settings.append(
                Setting(f"mae_{_num(f)}", f"MAE, {pct}", _upd(full, init="mae", schedule=ce), over)
            )
            settings.append(
                Setting(
                    f"scratch_{_num(f)}", f"scratch, {pct}", _upd(full, init="scratch", schedule=ce), over
                )
            )
            pairs.append((f"mae_{_num(f)}", f"scratch_{_num(f)}"))
        return StudyPlan(
            name,
            "How much does MAE pre-training add to fine-tuning as the labelled training cases get fewer?",
            settings,
            "scratch_1",
            "labelled training cases",
            pairs,
        )
    if name == "grid":
        if not vary:
            raise ConfigError("study grid", "needs at least one --vary KEY=V1,V2,...")
        axes: list[tuple[str, list[Any]]] = []
        for v in vary:
            if "=" not in v:
                raise ConfigError(v, "--vary must look like KEY=V1,V2,...")
            key, values = v.split("=", 1)
            axes.append((key.strip(), [_parse_value(x.strip()) for x in values.split(",") if x.strip()]))
        settings = []
        for combo in itertools.product(*(vals for _, vals in axes)):
            dotted = {k: val for (k, _), val in zip(axes, combo)}
            label = ", ".join(f"{k.split('.')[-1]}={val}" for k, val in dotted.items())
            nm = "_".join(f"{k.split('.')[-1]}-{val}" for k, val in dotted.items())
            method_keys = {k: val for k, val in dotted.items() if k.startswith("method.")}
            other = {k: val for k, val in dotted.items() if not k.startswith("method.")}
            m = _upd(full, **_nested({k[len("method.") :]: val for k, val in method_keys.items()}))
            settings.append(Setting(nm, label, m, _nested(other)))
        return StudyPlan(
            name, "Grid over " + ", ".join(k for k, _ in axes), settings, settings[0].name, label
        )
    raise ConfigError(name, f"unknown study (choose from {', '.join(STUDIES)})")

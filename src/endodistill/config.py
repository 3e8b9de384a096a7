"""Typed configuration: every command reads one YAML file validated by these models.

Unknown keys and wrong types are a :class:`ConfigError` naming the key. ``--set a.b=value`` overrides
any value (the value is parsed as YAML, so ``--set finetune.epochs=3`` gives an int).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from endodistill.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Strict):
    """What is predicted, and which manifest modalities feed the student and the teacher."""

    num_classes: int = Field(2, ge=2)
    class_names: list[str] = ["not_obliterated", "obliterated"]
    student_modality: str = "mri"
    teacher_modality: str = "tvus"
    positive_class: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _names_match(self) -> TaskConfig:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {self.num_classes} classes")
        if self.positive_class >= self.num_classes:
            raise ValueError("positive_class must be < num_classes")
        return self


class SynthConfig(_Strict):
    """The synthetic pelvic cohort (used when ``data.manifest`` is empty)."""

    preset: Literal["demo", "paper", "tiny"] = "demo"
    seed: int = 0
    n_mri_labelled: int | None = Field(None, ge=4)
    n_mri_unlabelled: int | None = Field(None, ge=0)
    n_tvus: int | None = Field(None, ge=4)
    paired_fraction: float = Field(0.0, ge=0.0, le=1.0)
    # The unlabelled MRI pool from a shifted site (other contrast and geometry; the pool study).
    pool_shift: bool = False
    # How strongly a per-subject latent severity drives both the MRI signs and the sliding fraction of
    # the same subject (0: independent given the label; the pairing study plants 0.5).
    severity_coupling: float = Field(0.0, ge=0.0, lt=1.0)


class DataConfig(_Strict):
    """Where the cohort comes from and where preprocessed tensors are cached."""

    @model_validator(mode="before")
    @classmethod
    def _drop_allow_outside_paths(cls, data: Any) -> Any:
        # Configs saved before data.restrict_paths (model directories, run folders) hold the old key, always
        # written out; outside paths are now allowed by default, so either value means the default.
        if isinstance(data, dict) and "allow_outside_paths" in data:
            data = {k: v for k, v in data.items() if k != "allow_outside_paths"}
        return data

    manifest: Path | None = None
    synth: SynthConfig = SynthConfig()
    cache_dir: Path | None = None
    restrict_paths: bool = Field(
        False,
        description=(
            "Refuse manifest paths that are absolute or leave the manifest's folder (for shared or hosted "
            "deployments where a manifest must not reach other files). Off by default: absolute paths and "
            "paths such as ../scans/x.nii.gz work."
        ),
    )
    dicom_series: dict[str, str] = {}
    preprocess_threads: int | None = Field(
        None,
        ge=1,
        description=(
            "Threads that preprocess files missing from the cache (decoding, resampling and hashing release "
            "the GIL); default min(8, CPUs). The demo cohort's 720 files: 11.0 s with 1 thread, 6.6 s with 2 "
            "on 2 cores. The tensors are the same for any number of threads."
        ),
    )


class MRIPreprocessConfig(_Strict):
    """MRI preprocessing: canonical orientation, spacing, robust intensity scaling, crop/pad."""

    orientation: str = "RAS"
    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)
    size: tuple[int, int, int] = (32, 32, 32)
    percentiles: tuple[float, float] = (0.5, 99.5)
    crop: Literal["center", "foreground"] = "foreground"
    interpolation: Literal["linear", "nearest"] = "linear"

    @model_validator(mode="after")
    def _check(self) -> MRIPreprocessConfig:
        if any(s <= 0 for s in self.spacing):
            raise ValueError("spacing must be positive")
        if any(s < 4 or s > 1024 for s in self.size):
            raise ValueError("size must be between 4 and 1024 voxels per axis")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        return self


class ClipPreprocessConfig(_Strict):
    """Ultrasound clip preprocessing: grayscale, sector crop, resize, temporal sampling."""

    frames: int = Field(8, ge=1, le=512)
    size: tuple[int, int] = (64, 64)
    sector_crop: bool = True
    fps: float | None = Field(None, gt=0)
    max_source_frames: int = Field(4096, ge=1)


class TeacherConfig(_Strict):
    """The video teacher (ResNet(2+1)D)."""

    arch: Literal["r2plus1d_18", "r2plus1d_narrow"] = "r2plus1d_narrow"
    width: int = Field(8, ge=2)
    weights: Path | None = None
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    folds: int = Field(1, ge=1)
    holdout_fraction: float = Field(0.25, gt=0, lt=1)
    ensemble: int = Field(
        1,
        ge=1,
        le=6,
        description=(
            "Teacher networks trained per cross-validation fold, each from its own seed (same folds, same clips): "
            "held-out predictions and KD targets are the mean of the members' logits; the deployable teacher "
            "holds every member. Under cross-validation only (folds > 1 or targets oof)."
        ),
    )
    targets: Literal["in_sample", "oof"] = "in_sample"
    augment: bool = True
    # Subtract each pixel's temporal mean from the clip: static anatomy out, motion (the sliding sign) in.
    motion_input: bool = True
    motion: Literal["mean", "diff", "flow"] = Field(
        "mean",
        description=(
            "How motion_input removes the static anatomy: 'mean' subtracts each pixel's temporal mean "
            "(T frames in), 'diff' feeds the T - 1 frame-to-frame differences, 'flow' feeds dense optical "
            "flow (Farneback at the clip's native resolution, cached with the clip preprocessing): the "
            "2-channel (x, y) motion between consecutive sampled frames (T - 1 steps)."
        ),
    )
    flow_size: tuple[int, int] | None = Field(
        None,
        description=(
            "Grid (H, W) the optical flow of motion 'flow' is pooled to; tvus.size when unset. Flow is smooth, "
            "so a coarser grid than the grey frames loses little and makes every teacher step cheaper."
        ),
    )
    # Scale each clip's motion input to unit RMS (a per-clip gain: pressure and echo gain vary between clips).
    motion_norm: bool = False
    # Augmentations (with `augment`): play a training clip backwards / mirror it left-right, each with p=0.5.
    time_reverse: bool = False
    hflip: bool = False
    # Report a logistic regression on motion features of the same clips, on the same folds, next to the teacher.
    clip_baseline: bool = True
    clip_features: Literal["auto", "grey", "coupling"] = Field(
        "auto",
        description=(
            "Features of the clip baseline: 'grey' pooled temporal std and frame differences of the grey "
            "frames; 'coupling' percentiles of the coupling map of the teacher's optical flow (each pixel's "
            "share of the clip's dominant motion; needs motion 'flow'); 'auto' coupling with flow, else grey."
        ),
    )
    # Train the teacher on labels permuted among the labelled clips (a control of the kd_controls study:
    # a teacher that knows nothing of the sign). Evaluation still uses the true labels.
    shuffle_labels: bool = False
    channels_last: Literal["auto"] | bool = Field(
        "auto",
        description=(
            "Run the teacher (weights and clips) in torch.channels_last_3d. 'auto': on CUDA; on CPU when "
            "oneDNN runs every convolution (more than one thread, or batch_size >= 16). Measured on CPU, "
            "1 thread, training step channels-last/contiguous: 0.76 (demo, batch 16), 0.49 (16x112x112 "
            "clips, width 8, batch 16); inference at batch 32: 0.6; but 1.14 at paper size with batch 1-2, "
            "where PyTorch's own kernel runs the temporal 3x1x1 convolutions; with 2 threads 0.4-0.8 at "
            "every batch. Results differ from contiguous at rounding level; reruns stay bit-identical."
        ),
    )

    @property
    def clip_feature_set(self) -> str:
        """The clip baseline's features with ``auto`` resolved: ``coupling`` on optical flow, else ``grey``."""
        if self.clip_features == "auto":
            return "coupling" if self.motion == "flow" else "grey"
        return self.clip_features

    @property
    def cross_validated(self) -> bool:
        """Whether the teacher is cross-validated (``folds`` > 1, or cross-fitted ``oof`` targets)."""
        return self.folds > 1 or self.targets == "oof"

    @model_validator(mode="after")
    def _check_inputs(self) -> TeacherConfig:
        if self.motion == "flow" and not self.motion_input:
            raise ValueError("teacher.motion 'flow' is a motion input: it needs motion_input true")
        if self.clip_features == "coupling" and self.motion != "flow":
            raise ValueError(
                "teacher.clip_features 'coupling' reads optical flow: it needs teacher.motion 'flow'"
            )
        if self.flow_size is not None and min(self.flow_size) < 4:
            raise ValueError(f"teacher.flow_size must be at least 4 x 4, got {list(self.flow_size)}")
        if self.ensemble > 1 and not self.cross_validated:
            raise ValueError(
                "teacher.ensemble > 1 needs cross-validation: set teacher.folds > 1 or targets oof"
            )
        return self


class StudentConfig(_Strict):
    """The MRI student: a 3D ViT (MONAI ``ViT``), shared by MAE pre-training."""

    patch_size: tuple[int, int, int] = (8, 8, 8)
    hidden_size: int = Field(48, ge=6)
    mlp_dim: int = Field(96, ge=1)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(3, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    qkv_bias: bool = True
    stem: Literal["linear", "mlp"] = Field(
        "linear",
        description=(
            "Patch embedding: 'linear' (one strided convolution, MONAI's default) or 'mlp' (a two-layer MLP "
            "on each flattened patch; patch-local, so the MAE's masked patches stay hidden from the encoder)."
        ),
    )
    stem_width: int = Field(96, ge=1, description="Hidden width of the 'mlp' stem.")
    pool: Literal["cls", "mean", "flat"] = Field(
        "cls", description="What the head reads: the cls token, or the mean of the patch tokens."
    )

    @model_validator(mode="after")
    def _check(self) -> StudentConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.hidden_size % 6:
            raise ValueError("hidden_size must be divisible by 6 (3D sin-cos position embedding of the MAE)")
        return self


class MAEConfig(_Strict):
    """3D masked auto-encoder pre-training on the unlabelled pool."""

    enabled: bool = True
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1.5e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    mask_ratio: float = Field(0.5, gt=0, lt=1)
    # Random translation of each pre-training volume by up to this many voxels per axis; 0: none.
    translate: int = Field(0, ge=0)
    norm_pix_loss: bool = False
    decoder_hidden_size: int = Field(48, ge=6)
    decoder_layers: int = Field(1, ge=1)
    decoder_heads: int = Field(3, ge=1)
    use_labelled_train: bool = False
    probe_draws: int = Field(
        8,
        ge=1,
        le=64,
        description=(
            "Untrained encoders of the MAE's shape its linear probe is compared with (the first is the MAE's own "
            "initialisation, the others are drawn from their own seeds); mae.random_probe_auc is their mean. One "
            "draw's probe AUC varies by 0.03-0.05 (standard deviation) between initialisations on the demo "
            "cohorts, comparable to the margin it is compared with; the mean of 8 has 0.01-0.02."
        ),
    )
    # Share of the unlabelled pool the MAE sees (a seeded subset; the pool study). Epochs are scaled by
    # 1 / pool_fraction so that every pool size gets the same number of optimiser steps.
    pool_fraction: float = Field(1.0, gt=0, le=1)


class ScheduleConfig(_Strict):
    """The KD weight a_e over epochs e: ``exp`` alpha**e (paper), ``constant``, ``linear``, ``cosine``."""

    kind: Literal["exp", "constant", "linear", "cosine"] = "exp"
    alpha: float = Field(0.85, ge=0, le=1)


class MethodConfig(_Strict):
    """One compared method: initialisation, KD loss and its weight schedule (``kind: distill``), or the
    joint model trained on unpaired MRI and TVUS (``kind: joint``, :mod:`endodistill.train.joint`)."""

    # distill: the paper's student (teacher outputs as KD targets); joint: one network with a tokenizer per
    # modality, a shared transformer and a shared head, trained on the fold's MRI and TVUS clips together
    # (the schedule, KD and pairing fields below do not apply to it; init does).
    kind: Literal["distill", "joint"] = "distill"
    init: Literal["scratch", "mae"] = "mae"
    schedule: ScheduleConfig = ScheduleConfig()
    kd_loss: Literal["mse_logits", "mse_probs", "kl", "prototype"] = "mse_logits"
    temperature: float = Field(2.0, gt=0)
    pairing: Literal["label_matched", "paired"] = "label_matched"
    # What the KD target of a case is (the kd_controls study): the partner clip's teacher output
    # ("teacher", the paper), the per-class mean teacher output ("class_mean"), a label-smoothed one-hot
    # whose confidence equals the teacher's mean confidence on the class ("smoothed_labels"), or the
    # teacher outputs permuted among the clips of each class ("permuted").
    kd_target: Literal["teacher", "class_mean", "smoothed_labels", "permuted"] = "teacher"
    # Fraction of KD partners drawn from the other class (label-matching noise; the pairing study).
    pairing_noise: float = Field(0.0, ge=0, le=1)
    # kind joint: weight of the cross-modal alignment term (class prototypes of the shared features of the
    # batch's MRI cases and clips pulled together, 1 - cosine per class); 0: no alignment term.
    align_weight: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> MethodConfig:
        if self.kind == "distill" and self.align_weight > 0:
            raise ValueError("align_weight applies to kind 'joint' only")
        return self


def default_methods() -> dict[str, MethodConfig]:
    """The paper's ablation: the five methods every run compares."""
    return {
        "scratch_ce": MethodConfig(init="scratch", schedule=ScheduleConfig(kind="constant", alpha=0.0)),
        "mae_ce": MethodConfig(init="mae", schedule=ScheduleConfig(kind="constant", alpha=0.0)),
        "scratch_kd_ce": MethodConfig(init="scratch", schedule=ScheduleConfig(kind="exp", alpha=0.85)),
        "mae_kd": MethodConfig(init="mae", schedule=ScheduleConfig(kind="constant", alpha=1.0)),
        "mae_kd_ce": MethodConfig(init="mae", schedule=ScheduleConfig(kind="exp", alpha=0.85)),
    }


class FinetuneConfig(_Strict):
    """Distillation + fine-tuning of the student on labelled MRI."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    # Layer-wise lr decay (MAE fine-tuning recipe): block i gets lr * layer_decay**(num_layers - i); 1.0 = off.
    layer_decay: float = Field(1.0, gt=0, le=1)
    val_fraction: float = Field(0.2, ge=0, lt=1)
    class_balance: Literal["weights", "sampler", "none"] = "weights"
    augment: bool = True
    # Random translation of each training volume by up to this many voxels per axis (edge-replicated), in
    # the fine-tuning, joint and cnn3d batches alike (with `augment`); 0: none.
    translate: int = Field(0, ge=0)


class JointConfig(_Strict):
    """The joint model (methods of ``kind: joint``): our design, the follow-up paper's details are not public.

    The network (:class:`endodistill.models.joint.JointViT`) is the student's ViT (``cfg.student``: patch
    embedding of the MRI, transformer blocks, final norm) plus a tubelet embedding of the clip, both feeding
    the same blocks and the same head. The clip enters as the teacher sees it (``cfg.tvus`` frames and size,
    the teacher's motion transform and augmentation); the MRI as the student sees it.
    """

    clip_patch: tuple[int, int] = Field(
        (4, 4), description="Spatial size (pixels) of a clip tubelet; must divide tvus.size."
    )
    tubelet_frames: int | None = Field(
        None,
        ge=1,
        description=(
            "Frames of a tubelet; None: all frames of the (motion-transformed) clip, one token per spatial "
            "patch. Must divide the clip's frame count (tvus.frames, minus one with teacher.motion 'diff')."
        ),
    )
    clip_weight: float = Field(1.0, ge=0, description="Weight of the TVUS cross-entropy (the MRI's is 1).")
    epochs: int | None = Field(None, ge=1, description="Epochs of a joint fit; None: finetune.epochs.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate of a joint fit; None: finetune.lr.")
    pool: Literal["cls", "mean"] = Field(
        "cls",
        description=(
            "What the shared head reads: the cls token or the mean of the tokens. No 'flat' head: the two "
            "modalities' token positions do not correspond."
        ),
    )


class ProtocolConfig(_Strict):
    """The cross-validated experiment."""

    folds: int = Field(5, ge=2)
    # Share of each fold's labelled training subjects the fits may use (stratified, seeded per fold; the
    # test folds are unchanged, so runs at different shares are compared case by case). The label-count
    # question of the `labels` study: does MAE pre-training help more when labels are few?
    train_fraction: float = Field(1.0, gt=0, le=1)
    methods: dict[str, MethodConfig] = Field(default_factory=default_methods)
    full_method: str = "mae_kd_ce"
    high_sensitivity: float = Field(0.9, gt=0, lt=1)
    final_model: bool = True
    # The method trained on all labelled data into RUN_DIR/model (None: full_method). A method of kind
    # 'joint' gives a model directory of kind 'joint', which predicts MRI volumes and TVUS clips.
    final_method: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ProtocolConfig:
        if self.full_method not in self.methods:
            raise ValueError(f"full_method {self.full_method!r} is not one of methods")
        if self.final_method is not None and self.final_method not in self.methods:
            raise ValueError(f"final_method {self.final_method!r} is not one of methods")
        return self

    @property
    def deployed_method(self) -> str:
        """The method of the run's deployable model (``final_method``, else ``full_method``)."""
        return self.final_method or self.full_method


class LogRegBaselineConfig(_Strict):
    """The ``logreg`` baseline (and the per-sign probes): L2 logistic regression on the preprocessed voxels."""

    enabled: bool = True
    # Candidate C in units of 1 / (voxels per volume): every standardised voxel has unit variance, so a row's
    # squared norm is about the voxel count and the same grid fits any grid size. Chosen by inner CV.
    c_grid: list[float] = Field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0])
    inner_folds: int = Field(5, ge=2)

    @model_validator(mode="after")
    def _check(self) -> LogRegBaselineConfig:
        if not self.c_grid or any(c <= 0 for c in self.c_grid):
            raise ValueError("c_grid must hold positive values")
        if sorted(self.c_grid) != list(self.c_grid):
            raise ValueError("c_grid must be increasing (ties go to the smaller C)")
        return self


class CNN3DBaselineConfig(_Strict):
    """The ``cnn3d`` baseline: a small 3D CNN (MONAI ``Classifier``) with a fixed schedule, last epoch kept."""

    # Defaults: the demo's recipe (chosen on cohort seeds 10-12, see configs/demo.yaml).
    enabled: bool = True
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(16, ge=2)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    width: int = Field(4, ge=1, description="channels of the first conv block (doubled by every block)")
    blocks: int = Field(4, ge=1, le=8)
    dropout: float = Field(0.0, ge=0, lt=1)
    augment: bool = True


class BaselinesConfig(_Strict):
    """Reference baselines on the run's own folds (``results.json`` ``baselines``, apart from the methods)."""

    enabled: bool = True
    logreg: LogRegBaselineConfig = LogRegBaselineConfig()
    cnn3d: CNN3DBaselineConfig = CNN3DBaselineConfig()
    # Synthetic cohorts only (latents.csv beside the manifest); absent without it.
    oracle: bool = True
    sign_visibility: bool = True
    visible_auc: float = Field(
        0.65,
        gt=0.5,
        lt=1.0,
        description=(
            "A latent sign counts as shown by the preprocessing grid when its probe AUC (sign_visibility) "
            "reaches this; the run reports the population AUC ceiling of the posterior from those signs alone."
        ),
    )


class TrainerConfig(_Strict):
    """Hardware and Lightning settings shared by every stage."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "cpu"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = Field(1, ge=1)
    precision: str = "32-true"
    num_workers: int = Field(0, ge=0)
    compile: bool = Field(
        False,
        description=(
            "torch.compile (default mode) the student, MAE and teacher networks for training (saved weights "
            "keep their plain key names; falls back to eager with a warning where Inductor cannot run). "
            "Off by default: measured on CPU (1 thread, demo size, benchmarks/bench_compile.py) a compiled "
            "training step takes 0.85x (student), 0.85x (MAE), 0.9x (teacher) of eager, but the first "
            "compilation costs 28 s (student), 21 s (MAE), 40-45 s (teacher; 2-3 s each with a warm "
            "Inductor cache), so one 3-epoch student fit takes 56-66x as long as eager."
        ),
    )
    threads: int | None = Field(None, ge=1)
    deterministic: bool = True
    log_every_n_steps: int = Field(10, ge=1)
    spread_fits: bool = Field(
        False,
        description=(
            "Under torchrun (several processes), spread the independent cross-validation fits over the "
            "processes, one fit per process and device (round robin), instead of running them all in every "
            "process; rank 0 trains the teacher and MAE first and gathers the results. No effect without "
            "torchrun. Needs trainer.devices=1 (see endodistill.experiment.spread)."
        ),
    )
    lookahead: bool = Field(
        True,
        description=(
            "With num_workers 0, build the next batch in a thread while the model steps on the current one "
            "(same batches either way). Demo fine-tune: data time 6 % of step time with it, 12 % without "
            "(benchmarks/bench_speedups.py)."
        ),
    )
    checkpoint_every_s: float = Field(
        60.0,
        ge=0.0,
        description=(
            "Write a fit's resumable checkpoints/last.ckpt at an epoch end only when at least this many "
            "seconds have passed since the last one (0: every epoch). A kill then loses at most this much "
            "training plus one epoch, and resuming stays exact (checkpoints are always at epoch ends). "
            "Per-epoch checkpoints cost 8 % of the demo's cross-validation fits (0.3 s per 3.7 s fit) and "
            "about 1.4 GB per epoch for a ViT-B student with its AdamW state."
        ),
    )


class Config(_Strict):
    """The whole configuration of a run."""

    name: str = "endodistill"
    seed: int = 0
    task: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()
    mri: MRIPreprocessConfig = MRIPreprocessConfig()
    tvus: ClipPreprocessConfig = ClipPreprocessConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    mae: MAEConfig = MAEConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    joint: JointConfig = JointConfig()
    protocol: ProtocolConfig = ProtocolConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    trainer: TrainerConfig = TrainerConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        for ax, (s, p) in enumerate(zip(self.mri.size, self.student.patch_size)):
            if s % p:
                raise ValueError(f"mri.size[{ax}]={s} is not a multiple of student.patch_size[{ax}]={p}")
        if self.teacher.motion_input and self.tvus.frames < 2:
            # Motion is a change between frames: one frame has none (the teacher would see zeros or nothing).
            raise ValueError(f"teacher.motion_input needs tvus.frames >= 2, got {self.tvus.frames}")
        if any(m.kind == "joint" for m in self.protocol.methods.values()):
            frames = joint_clip_frames(self)
            tub = self.joint.tubelet_frames or frames
            if frames % tub:
                raise ValueError(
                    f"joint.tubelet_frames={tub} does not divide the clip's {frames} input frames"
                )
            for ax, (s, p) in enumerate(zip(clip_input_shape(self)[2:], self.joint.clip_patch)):
                if s % p:
                    raise ValueError(
                        f"the clip input's size {s} (axis {ax}; tvus.size, or teacher.flow_size with flow) "
                        f"is not a multiple of joint.clip_patch[{ax}]={p}"
                    )
        return self


def joint_clip_frames(cfg: Config) -> int:
    """Frames of a clip after the teacher's motion transform (what the joint model's tubelets cut)."""
    t = cfg.teacher
    return cfg.tvus.frames - 1 if t.motion_input and t.motion in ("diff", "flow") else cfg.tvus.frames


def student_vit_spec(cfg: Config) -> dict[str, Any]:
    """The MRI ViT's shape, under the argument names of MONAI's ``ViT``: what the student and its MAE are
    built with, what a model directory's ``arch`` summary records and what a MONAI bundle's network is.

    The stem, dropout and head are not in it: each of those readers names them its own way.
    """
    s = cfg.student
    return {
        "in_channels": 1,
        "img_size": tuple(cfg.mri.size),
        "patch_size": tuple(s.patch_size),
        "hidden_size": s.hidden_size,
        "mlp_dim": s.mlp_dim,
        "num_layers": s.num_layers,
        "num_heads": s.num_heads,
        "qkv_bias": s.qkv_bias,
    }


def clip_input_shape(cfg: Config) -> tuple[int, int, int, int]:
    """``(C, T, H, W)`` of a clip as the teacher (and the joint model) reads it: grey frames (C = 1) at
    ``tvus.size``, or with ``teacher.motion: flow`` displacement fields (C = 2) on the flow grid."""
    t = cfg.teacher
    if t.motion == "flow":
        h, w = t.flow_size if t.flow_size is not None else cfg.tvus.size
        return (2, cfg.tvus.frames, int(h), int(w))
    return (1, cfg.tvus.frames, int(cfg.tvus.size[0]), int(cfg.tvus.size[1]))


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        else:
            parts.append(f"'{key}': {e['msg']}")
    return f"{source}: invalid config: " + "; ".join(parts)


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(None, f"--set {dotted}: '{k}' is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(None, f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key.strip(), value)
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``extra`` into a copy of ``base``."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def preset_path(name: str) -> Path:
    """Path of a preset shipped with the package (``demo``, ``paper``, ``tiny``)."""
    p = Path(str(resources.files("endodistill") / "configs" / f"{name}.yaml"))
    if not p.is_file():
        raise ConfigError(name, "no such preset (known: demo, paper, tiny)")
    return p


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> Config:
    """Read and validate a YAML config, apply ``--set`` overrides.

    Args:
        path: a YAML file, or a preset name (``demo``, ``paper``, ``tiny``); None gives the defaults.
        overrides: ``KEY=VALUE`` strings or a nested dict applied on top.

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types or impossible values.
    """
    raw: dict[str, Any] = {}
    source = "<defaults>"
    base_dir: Path | None = None
    if path is not None:
        p = Path(path)
        # A preset name wins over a folder of that name in the working directory (a run called "demo").
        if (not p.exists() or p.is_dir()) and p.suffix == "" and "/" not in str(path):
            p = preset_path(str(path))
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(p, "config file not found") from None
        except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
            raise ConfigError(p, f"cannot read config ({type(e).__name__})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" at line {line + 1}" if line is not None else ""
            raise ConfigError(p, f"not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(p, "config must be a YAML mapping of sections")
        raw = loaded
        base_dir = p.parent
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        raw = deep_merge(raw, extra)
        source = f"{source} (with --set overrides)"
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(None, _format_validation_error(e, source)) from None
    # A relative manifest path in a config file is relative to that file, like nnU-Net's plans.
    if base_dir is not None and cfg.data.manifest is not None and not cfg.data.manifest.is_absolute():
        candidate = (base_dir / cfg.data.manifest).resolve()
        if candidate.exists():
            cfg.data.manifest = candidate
    return cfg


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML (what every run saves)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

"""Teacher, student and MAE networks: shapes, SDPA, patch order, masked loss, MAE -> ViT key mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from einops import rearrange
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import ViT
from safetensors.torch import load_file, save_file

from endodistill.config import TeacherConfig, load_config, student_vit_spec
from endodistill.errors import ConfigError, InputError
from endodistill.models.student import (
    MAE,
    PatchConv3d,
    StudentViT,
    build_mae,
    build_student,
    enable_sdpa,
    load_mae_encoder,
    mae_encoder_state,
)
from endodistill.models.teacher import adapt_stem_weight, build_teacher


@pytest.fixture(scope="module")
def cfg3():
    """The tiny preset with three classes."""
    return load_config(
        "tiny", {"task": {"num_classes": 3, "class_names": ["a", "b", "c"], "positive_class": 1}}
    )


def _vol(cfg, b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, *cfg.mri.size, generator=g)


# ---------------------------------------------------------------- teacher


def test_narrow_teacher_shapes_and_channels_last(cfg3) -> None:
    torch.manual_seed(0)
    t = build_teacher(cfg3.teacher, num_classes=3).eval()
    w = cfg3.teacher.width
    assert t.arch == "r2plus1d_narrow" and t.in_channels == 1
    assert [t.backbone.layer1[0].conv1[0][0].in_channels, t.backbone.fc.in_features] == [w, 8 * w]
    x = torch.rand(2, 1, cfg3.tvus.frames, *cfg3.tvus.size)
    logits, feats = t(x), t.features(x)
    assert logits.shape == (2, 3) and feats.shape == (2, 8 * w)
    torch.testing.assert_close(t.backbone.fc(feats), logits)
    t_cl = t.to(memory_format=torch.channels_last_3d)
    out_cl = t_cl(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out_cl, logits, rtol=1e-4, atol=1e-5)


def test_full_r2plus1d_18_grayscale() -> None:
    t = build_teacher(TeacherConfig(arch="r2plus1d_18"), num_classes=2, in_channels=1).eval()
    assert t.backbone.stem[0].weight.shape == (45, 1, 1, 7, 7)
    assert t.num_features == 512
    with torch.no_grad():
        assert t(torch.rand(1, 1, 4, 32, 32)).shape == (1, 2)


def test_stem_adaptation_sums_rgb() -> None:
    w = torch.randn(5, 3, 1, 7, 7)
    g = adapt_stem_weight(w, 1)
    torch.testing.assert_close(g, w.sum(1, keepdim=True))
    # A grey image replicated to RGB through the RGB kernel == the grey image through the summed kernel.
    x = torch.rand(1, 1, 1, 9, 9)
    rgb = torch.nn.functional.conv3d(x.repeat(1, 3, 1, 1, 1), w)
    torch.testing.assert_close(torch.nn.functional.conv3d(x, g), rgb)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_pretrained_rgb_weights(tmp_path: Path, suffix: str) -> None:
    # An RGB "Kinetics-like" network with 400 classes (narrow, so the test stays small).
    src = build_teacher(TeacherConfig(width=4), num_classes=400, in_channels=3)
    state = {k: v.contiguous() for k, v in src.backbone.state_dict().items()}
    path = tmp_path / f"k400{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    t = build_teacher(TeacherConfig(width=4, weights=path), num_classes=2, in_channels=1)
    torch.testing.assert_close(t.backbone.stem[0].weight, state["stem.0.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(t.backbone.layer3[1].conv2[0][3].weight, state["layer3.1.conv2.0.3.weight"])
    assert t.backbone.fc.out_features == 2

    with pytest.raises(InputError, match=r"key '[\w.]+' has shape"):
        build_teacher(TeacherConfig(width=8, weights=path), num_classes=2)
    del state["layer2.0.downsample.1.bias"]
    bad = tmp_path / "missing.safetensors"
    save_file(state, str(bad))
    with pytest.raises(InputError, match=r"layer2\.0\.downsample\.1\.bias"):
        build_teacher(TeacherConfig(width=4, weights=bad), num_classes=2)
    with pytest.raises(InputError, match="not found"):
        build_teacher(TeacherConfig(width=4, weights=tmp_path / "nope.pth"), num_classes=2)


# ---------------------------------------------------------------- student


def test_student_shapes_head_and_sdpa(cfg3) -> None:
    torch.manual_seed(0)
    s = build_student(cfg3)
    assert isinstance(s.classification_head, torch.nn.Linear)  # post_activation=None: no Tanh
    blocks = [m for m in s.modules() if isinstance(m, SABlock)]
    assert len(blocks) == cfg3.student.num_layers and all(b.use_flash_attention for b in blocks)
    x = _vol(cfg3)
    n = 1
    for a, p in zip(cfg3.mri.size, cfg3.student.patch_size):
        n *= a // p
    tokens = s.encode(x)
    assert tokens.shape == (2, n + 1, cfg3.student.hidden_size)
    logits = s(x)
    assert logits.shape == (2, 3)
    # The head reads the cls token after the final norm.
    torch.testing.assert_close(logits, s.classification_head(tokens[:, 0]))


def test_sdpa_eval_deterministic_with_dropout(cfg3) -> None:
    cfg = cfg3.model_copy(deep=True)
    cfg.student.dropout = 0.5
    torch.manual_seed(0)
    s = build_student(cfg)
    x = _vol(cfg)
    s.eval()
    a, b = s(x), s(x)
    assert torch.equal(a, b)
    # SDPA matches MONAI's explicit attention in eval.
    enable_sdpa(s, False)
    torch.testing.assert_close(s(x), a, rtol=1e-5, atol=1e-6)
    enable_sdpa(s, True)
    s.train()
    assert not torch.equal(s(x), s(x))  # dropout still acts in training
    assert all(m.dropout_rate == 0.5 for m in s.modules() if isinstance(m, SABlock))


# ---------------------------------------------------------------- MAE


def test_mae_shapes_and_mask_ratio(cfg3) -> None:
    cfg = cfg3.model_copy(deep=True)
    cfg.mri.size = (16, 16, 16)
    torch.manual_seed(0)
    m = build_mae(cfg)
    x = _vol(cfg)
    loss, pred, mask = m(x)
    assert pred.shape == (2, 8, 512) and mask.shape == (2, 8)
    assert mask.sum(1).tolist() == [4, 4] and loss.ndim == 0
    assert m.patchify(x).shape == pred.shape


def test_patchify_matches_conv_patch_embedding_order(cfg3) -> None:
    cfg = cfg3.model_copy(deep=True)
    cfg.mri.size, cfg.student.patch_size = (8, 12, 16), (4, 4, 8)
    torch.manual_seed(0)
    m = build_mae(cfg)
    x = _vol(cfg)
    conv = m.patch_embedding.patch_embeddings
    tokens = conv(x).flatten(2).transpose(1, 2)  # what PatchEmbeddingBlock does, before position embeddings
    w = rearrange(conv.weight, "o c p0 p1 p2 -> o (p0 p1 p2 c)")
    torch.testing.assert_close(m.patchify(x) @ w.T + conv.bias, tokens, rtol=1e-4, atol=1e-5)
    assert torch.equal(m.unpatchify(m.patchify(x)), x)


@pytest.mark.parametrize("in_channels", [1, 2])
def test_patch_conv_equals_the_strided_convolution(in_channels: int) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(in_channels, 6, (4, 2, 4), stride=(4, 2, 4))
    fast = PatchConv3d(in_channels, 6, (4, 2, 4), stride=(4, 2, 4))
    fast.load_state_dict(conv.state_dict())  # same parameters and keys
    x = torch.randn(3, in_channels, 8, 6, 12, requires_grad=True)
    a, b = conv(x), fast(x)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), [x, conv.weight, conv.bias])
    gb = torch.autograd.grad(b.square().sum(), [x, fast.weight, fast.bias])
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-4)


def test_students_and_maes_embed_patches_by_matrix_product(cfg3) -> None:
    # The default stem runs as PatchConv3d in every network (the joint model's clip tubelets too), and its
    # weights still load into MONAI's ViT.
    from endodistill.models.joint import build_joint

    student, mae = build_student(cfg3), build_mae(cfg3)
    assert isinstance(student.patch_embedding.patch_embeddings, PatchConv3d)
    assert isinstance(mae.patch_embedding.patch_embeddings, PatchConv3d)
    joint = build_joint(cfg3)
    assert isinstance(joint.patch_embedding.patch_embeddings, PatchConv3d)
    assert isinstance(joint.clip_embedding.proj, PatchConv3d)
    plain = ViT(**student_vit_spec(cfg3), proj_type="conv", spatial_dims=3, classification=True)
    state = {k: v for k, v in student.state_dict().items() if not k.startswith("classification_head")}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("classification_head") for k in missing)


def test_mae_loss_counts_only_masked_patches(cfg3) -> None:
    cfg = cfg3.model_copy(deep=True)
    cfg.mri.size = (16, 16, 16)
    torch.manual_seed(0)
    m = build_mae(cfg)
    x = _vol(cfg)
    loss, pred, mask = m(x)
    target = m.patchify(x)
    manual = ((pred - target) ** 2).mean(-1)[mask.bool()].mean()
    torch.testing.assert_close(loss, manual)
    visible = ~mask.bool()
    changed = pred.detach().clone()
    changed[visible] += 10.0
    torch.testing.assert_close(m.loss(x, changed, mask), loss.detach())
    changed = pred.detach().clone()
    changed[mask.bool()] += 10.0
    assert m.loss(x, changed, mask) > loss + 50
    # Perfect prediction of the masked patches: zero loss whatever the visible ones are.
    perfect = torch.where(mask.bool()[..., None], target, torch.randn_like(target))
    assert m.loss(x, perfect, mask) == 0
    # Normalised-pixel targets.
    m.norm_pix_loss = True
    norm = (target - target.mean(-1, keepdim=True)) / (
        target.var(-1, keepdim=True, unbiased=False) + 1e-6
    ).sqrt()
    assert m.loss(x, norm, mask) < 1e-10
    assert m.loss(x * 3 + 1, 3 * target + 1, mask) > 1.0


def test_mae_masks_reproducible_from_generator(cfg3) -> None:
    cfg = cfg3.model_copy(deep=True)
    cfg.mri.size = (16, 16, 32)
    torch.manual_seed(0)
    m = build_mae(cfg)
    x = _vol(cfg)
    state = torch.get_rng_state()
    _, _, m1 = m(x, generator=torch.Generator().manual_seed(7))
    _, _, m2 = m(x, generator=torch.Generator().manual_seed(7))
    _, _, m3 = m(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not touched
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    torch.manual_seed(3)
    _, _, g1 = m(x)
    torch.manual_seed(3)
    _, _, g2 = m(x)
    assert torch.equal(g1, g2)


def test_build_mae_rejects_bad_sizes(cfg3) -> None:
    with pytest.raises(ConfigError, match="decoder_hidden_size"):
        build_mae(load_config("tiny", ["mae.decoder_hidden_size=16"]))
    with pytest.raises(ConfigError, match="mask_ratio"):
        build_mae(load_config("tiny", ["mae.mask_ratio=0.9"]))  # 4 patches: keeps none


# ---------------------------------------------------------------- MAE -> ViT


def _pair(cfg, seed: int = 0) -> tuple[MAE, StudentViT]:
    torch.manual_seed(seed)
    mae = build_mae(cfg)
    # Move every weight away from its initial value so a missed key cannot pass by accident.
    with torch.no_grad():
        for p in mae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mae.eval(), build_student(cfg).eval()


def test_mae_encoder_loads_into_student(cfg3) -> None:
    cfg = cfg3.model_copy(deep=True)
    cfg.mri.size, cfg.student.num_layers = (16, 16, 16), 2
    mae, student = _pair(cfg)
    state = mae_encoder_state(mae)
    assert not any(k.startswith(("decoder_", "mask_tokens")) for k in state)
    assert {"norm.weight", "norm.bias", "cls_token"} <= state.keys() and "blocks.2.weight" not in state
    head = student.classification_head.weight.detach().clone()
    load_mae_encoder(student, state)
    assert torch.equal(student.classification_head.weight, head)  # the head keeps its own init
    x = _vol(cfg)
    with torch.no_grad():
        enc = student.encode(x)
        torch.testing.assert_close(enc, mae.encode(x), rtol=0, atol=0)

        # Against MONAI's own forward path with masking off: capture the encoder output and the token order.
        seen: dict[str, torch.Tensor] = {}
        orig = mae._masking

        def capture(t, masking_ratio=None):
            out = orig(t, masking_ratio)
            seen["idx"] = out[1]
            return out

        mae._masking = capture
        hook = mae.blocks.register_forward_hook(lambda mod, i, o: seen.__setitem__("enc", o))
        mae(x, masking_ratio=0.0)
        hook.remove()
        del mae._masking
    full = torch.empty_like(enc[:, 1:])
    for b in range(x.shape[0]):
        full[b, seen["idx"][b]] = seen["enc"][b, 1:]
    torch.testing.assert_close(full, enc[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["enc"][:, 0], enc[:, 0], rtol=1e-5, atol=1e-5)


def test_encoder_state_roundtrips_through_safetensors_and_raw_state(cfg3, tmp_path: Path) -> None:
    mae, student = _pair(cfg3)
    path = tmp_path / "encoder.safetensors"
    save_file(mae_encoder_state(mae), str(path))
    load_mae_encoder(student, load_file(str(path)), source=path)
    other = build_student(cfg3).eval()
    load_mae_encoder(other, mae.state_dict())  # a raw MAE state dict is mapped too
    x = _vol(cfg3)
    with torch.no_grad():
        assert torch.equal(student.encode(x), other.encode(x))


def test_mismatched_architectures_are_errors(cfg3) -> None:
    mae, _ = _pair(cfg3)
    state = mae_encoder_state(mae)
    deeper = build_student(load_config("tiny", ["student.num_layers=2"]))
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(InputError, match=r"missing key 'blocks\.1\."):
        load_mae_encoder(deeper, state)
    assert all(torch.equal(v, deeper.state_dict()[k]) for k, v in before.items())  # nothing loaded
    wider = build_student(load_config("tiny", ["student.mlp_dim=36"]))
    with pytest.raises(InputError, match=r"blocks\.0\.mlp\.linear1\.bias.*shape"):
        load_mae_encoder(wider, state)
    student = build_student(cfg3)
    with pytest.raises(InputError, match="unexpected key 'extra'"):
        load_mae_encoder(student, {**state, "extra": torch.zeros(1)}, source="enc.safetensors")


@pytest.mark.parametrize("pool", ["mean", "flat"])
def test_student_pooling_reads_the_patch_tokens(cfg3, pool: str) -> None:
    cfg = cfg3.model_copy(deep=True)
    cfg.student.pool = pool
    torch.manual_seed(0)
    s = build_student(cfg).eval()
    x = _vol(cfg)
    with torch.no_grad():
        tokens = s.encode(x)
        pooled = tokens[:, 1:].mean(1) if pool == "mean" else tokens[:, 1:].flatten(1)
        torch.testing.assert_close(s(x), s.classification_head(pooled))


def test_mlp_stem_is_patch_local_and_loads_from_the_mae(cfg3) -> None:
    cfg = cfg3.model_copy(deep=True)
    cfg.mri.size, cfg.student.num_layers, cfg.student.stem = (16, 16, 16), 2, "mlp"
    mae, student = _pair(cfg)
    embed = student.patch_embedding.patch_embeddings
    x = _vol(cfg)
    with torch.no_grad():
        base = embed(x).flatten(2)
        y = x.clone()
        p0, p1, p2 = cfg.student.patch_size
        y[:, :, :p0, :p1, :p2] += 1.0  # change the first patch only
        changed = (embed(y).flatten(2) - base).abs().amax(dim=(0, 1)) > 0
    # Only token 0 (the first patch in the conv embedding's row-major order) sees the change.
    assert changed[0] and not changed[1:].any()
    load_mae_encoder(student, mae_encoder_state(mae))
    with torch.no_grad():
        torch.testing.assert_close(student.encode(x), mae.encode(x), rtol=0, atol=0)

from __future__ import annotations

from pathlib import Path

import pytest

from endodistill.config import Config, dump_config, load_config
from endodistill.errors import ConfigError


@pytest.mark.parametrize("preset", ["demo", "paper", "tiny"])
def test_presets_load(preset: str) -> None:
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert set(cfg.protocol.methods) >= {"scratch_ce", "mae_ce", "scratch_kd_ce", "mae_kd", "mae_kd_ce"}


def test_unknown_key_is_named(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("finetune:\n  epochs: 3\n  epochz: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'finetune.epochz'"):
        load_config(p)


def test_wrong_type_is_named(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("finetune:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"'finetune.epochs'"):
        load_config(p)


def test_impossible_size() -> None:
    with pytest.raises(ConfigError, match=r"multiple of student\.patch_size"):
        load_config(None, ["mri.size=[30,32,32]"])


def test_overrides_apply_and_roundtrip(tmp_path: Path) -> None:
    cfg = load_config("demo", ["finetune.epochs=3", "protocol.methods.mae_kd_ce.schedule.alpha=0.5"])
    assert cfg.finetune.epochs == 3
    assert cfg.protocol.methods["mae_kd_ce"].schedule.alpha == 0.5
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["finetune.epochs"])


def test_preset_name_wins_over_a_folder_of_that_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--config demo`` run next to a run directory called ``demo`` still means the preset."""
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config("demo").name == "demo"

"""Speed switches: the teacher's memory layout (and its bit-identical reruns) and ``trainer.compile``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from endodistill.config import Config, load_config
from endodistill.train import speed


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**sections: dict) -> Config:
    return load_config("tiny", sections)


def test_teacher_channels_last_auto_follows_the_measured_rule(one_thread: None) -> None:
    auto = {"channels_last": "auto"}
    # One thread: oneDNN runs every convolution only from batch 16 on (PyTorch's own 3x1x1 kernel below).
    assert speed.teacher_channels_last(_cfg(teacher={**auto, "batch_size": 16}), "cpu")
    assert not speed.teacher_channels_last(_cfg(teacher={**auto, "batch_size": 8}), "cpu")
    assert speed.teacher_channels_last(_cfg(teacher={**auto, "batch_size": 1}), torch.device("cuda"))
    torch.set_num_threads(2)
    assert speed.teacher_channels_last(_cfg(teacher={**auto, "batch_size": 2}), "cpu")
    # Explicit settings are obeyed; YAML/--set strings are parsed as booleans.
    assert not speed.teacher_channels_last(_cfg(teacher={"channels_last": False, "batch_size": 32}), "cpu")
    assert speed.teacher_channels_last(_cfg(teacher={"channels_last": "true", "batch_size": 1}), "cpu")
    with pytest.raises(Exception, match="channels_last"):
        _cfg(teacher={"channels_last": "sometimes"})


def test_channels_last_teacher_fits_are_bit_identical_and_reload_alike(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    from endodistill.train.data import load_cohort
    from endodistill.train.seeding import configure_torch
    from endodistill.train.teacher import fit_teacher, teacher_forward

    cfg = load_config(
        "tiny",
        {
            "data": {"manifest": str(tiny_cohort / "manifest.csv"), "cache_dir": str(tmp_path / "cache")},
            "teacher": {"epochs": 2, "channels_last": True},
            "trainer": {"threads": 1},
        },
    )
    configure_torch(cfg)
    data = load_cohort(cfg, cfg.data.manifest)
    idx = np.flatnonzero(data.tvus.labels >= 0)
    nets = [
        fit_teacher(cfg, data, idx, tmp_path / f"fit_{i}", 7, "teacher", resume=False)[0] for i in range(2)
    ]
    conv = nets[0].backbone.layer1[0].conv1[0][0].weight  # in_channels > 1: the layout is unambiguous
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    a, b = (n.state_dict() for n in nets)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A finished fit reloaded (resume) is put in the same layout, so its outputs are the fresh ones exactly.
    reloaded, _ = fit_teacher(cfg, data, idx, tmp_path / "fit_0", 7, "teacher", resume=True)
    x = data.tvus.eval_tensor(cfg.tvus.frames)[:6]
    fresh_out, re_out = teacher_forward(nets[0], x, cfg), teacher_forward(reloaded, x, cfg)
    assert all(torch.equal(u, v) for u, v in zip(fresh_out, re_out))


def test_compile_keeps_state_dict_keys_and_outputs(one_thread: None) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 2))
    keys = list(net.state_dict())
    x = torch.randn(3, 6)
    eager = net(x).detach()
    assert speed.compile_if_enabled(net, _cfg()) is net  # trainer.compile is off: nothing happens
    assert speed.compile_if_enabled(net, _cfg(trainer={"compile": True}), "cpu") is net
    out = net(x)
    out.sum().backward()  # the compiled backward runs too
    assert list(net.state_dict()) == keys  # no "_orig_mod." prefix in saved weights
    assert torch.allclose(out, eager, atol=1e-6)


def test_compile_falls_back_to_eager_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(speed._COMPILE_PROBE, "cpu", "InductorError: no C++ compiler")
    net = nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="endodistill"):
        speed.compile_if_enabled(net, _cfg(trainer={"compile": True}), "cpu")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0] and "eagerly" in msgs[0]
    assert net._compiled_call_impl is None  # still the eager module

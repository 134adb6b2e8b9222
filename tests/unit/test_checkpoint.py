"""Checkpoints: bit-identical round trip, durable atomic saves, pruning, and falling back past damaged ones."""

import copy
import json
import os
import random

import pytest
from io_events import inode, position, publish_index, record_io
import torch
from safetensors.torch import load_file, save_file

from tunelab.atomic import atomic_dir
from tunelab.errors import TunelabError
from tunelab.training import checkpoint
from tunelab.training.checkpoint import (
    Restored,
    UnreadableCheckpointError,
    checkpoint_dirs,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)


def _setup(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    return model, opt


def test_roundtrip_restores_params_optimizer_and_rng(tmp_path):
    model, opt = _setup(0)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    save_checkpoint(tmp_path, 3, params, opt, {"epoch": 0}, keep_last=2)
    expected_rng = torch.rand(5)

    other, other_opt = _setup(1)
    state = load_checkpoint(tmp_path / "step-00000003", dict(other.named_parameters()), other_opt)
    assert state["step"] == 3 and state["epoch"] == 0
    assert torch.equal(torch.rand(5), expected_rng)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict(), other_opt.state_dict()
    for i in sa["state"]:
        for key in sa["state"][i]:
            assert torch.equal(torch.as_tensor(sa["state"][i][key]), torch.as_tensor(sb["state"][i][key]))
    assert sa["param_groups"][0]["lr"] == sb["param_groups"][0]["lr"]


def test_keep_last_and_no_temporaries(tmp_path):
    model, opt = _setup(0)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, dict(model.named_parameters()), opt, {}, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000003", "step-00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]


def test_atomic_dir_keeps_old_on_failure(tmp_path):
    target = tmp_path / "artifact"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("good")
    try:
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    except RuntimeError:
        pass
    assert (target / "a.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


# --- durability, pruning and temporaries -------------------------------------------------------------------




def _train_steps(model, opt, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()


def test_save_flushes_every_file_then_publishes_then_deletes_the_previous(tmp_path, monkeypatch):
    model, opt = _setup(0)
    params = dict(model.named_parameters())
    save_checkpoint(tmp_path, 1, params, opt, {}, keep_last=1)
    previous = tmp_path / "step-00000001"
    events = record_io(monkeypatch)
    target = save_checkpoint(tmp_path, 2, params, opt, {}, keep_last=1)
    published = publish_index(events, target)
    for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        assert position(events, ("fsync", inode(target / name))) < published, name
    assert position(events, ("fsync", inode(target))) < published
    parent_flushed = events.index(("fsync", inode(tmp_path)), published)
    moved_away = [i for i, e in enumerate(events) if e[0] == "replace" and e[1] == os.fspath(previous)]
    assert moved_away and moved_away[0] > parent_flushed
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]


def test_previous_checkpoint_survives_a_failed_save(tmp_path, monkeypatch):
    model, opt = _setup(0)
    params = dict(model.named_parameters())
    save_checkpoint(tmp_path, 1, params, opt, {}, keep_last=1)

    def full_disk(tensors, filename, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, params, opt, {}, keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]


def test_keep_last_one_never_deletes_the_checkpoint_just_written(tmp_path):
    """After resuming from an older checkpoint (a newer one was damaged), the new save must survive pruning."""
    model, opt = _setup(0)
    params = dict(model.named_parameters())
    save_checkpoint(tmp_path, 5, params, opt, {}, keep_last=1)
    written = save_checkpoint(tmp_path, 3, params, opt, {}, keep_last=1)
    assert checkpoint_dirs(tmp_path) == [written]
    save_checkpoint(tmp_path, 9, params, opt, {}, keep_last=2)
    save_checkpoint(tmp_path, 4, params, opt, {}, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000004", "step-00000009"]


def test_stale_temporaries_of_a_killed_save_are_removed_by_the_next(tmp_path):
    model, opt = _setup(0)
    params = dict(model.named_parameters())
    save_checkpoint(tmp_path, 1, params, opt, {}, keep_last=2)
    for stale in (".step-00000002.tmp-k1ll3d", ".step-00000001.old-4242", ".step-00000001.tmp-del"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "trainable.safetensors").write_bytes(b"half")
    (tmp_path / ".notes.tmp-1").mkdir()  # not a tunelab checkpoint temporary: left alone
    (tmp_path / "step-x.tmp-1").mkdir()
    save_checkpoint(tmp_path, 2, params, opt, {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp-1", "step-00000001", "step-00000002", "step-x.tmp-1"]


# --- loading: damaged checkpoints change nothing and are skipped ---------------------------------------------


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()),
            torch.get_rng_state(), random.getstate())


def _assert_unchanged(model, opt, snapshot):
    params, opt_state, rng, py_rng = snapshot
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    now = opt.state_dict()
    assert now["state"].keys() == opt_state["state"].keys()
    for i in now["state"]:
        assert all(torch.equal(now["state"][i][k], opt_state["state"][i][k]) for k in now["state"][i])
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


DAMAGE = {
    "truncated optimizer": lambda ckpt: _truncate(ckpt / "optimizer.safetensors"),
    "truncated rng": lambda ckpt: _truncate(ckpt / "rng.safetensors"),
    "garbage trainable": lambda ckpt: (ckpt / "trainable.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{not json"),
    "missing rng": lambda ckpt: (ckpt / "rng.safetensors").unlink(),
    "bad state.json": lambda ckpt: (ckpt / "state.json").write_text('{"step": 2, "param_gr'),
    "state.json not an object": lambda ckpt: (ckpt / "state.json").write_text("[]"),
    "wrong step": lambda ckpt: (ckpt / "state.json").write_text(
        (ckpt / "state.json").read_text().replace('"step": 2', '"step": 7')),
    "bad python rng": lambda ckpt: (ckpt / "state.json").write_text(
        json.dumps({**json.loads((ckpt / "state.json").read_text()), "python_random": [3, [1, 2], None]})),
    "moment of wrong shape": lambda ckpt: save_file(
        {**load_file(ckpt / "optimizer.safetensors"), "0.exp_avg": torch.zeros(2)}, ckpt / "optimizer.safetensors"),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_checkpoint_changes_nothing_and_falls_back_to_the_previous(tmp_path, damage):
    model, opt = _setup(0)
    params = dict(model.named_parameters())
    _train_steps(model, opt, 1)
    save_checkpoint(tmp_path, 1, params, opt, {"epoch": 0}, keep_last=3)
    expected = [p.detach().clone() for p in model.parameters()]
    _train_steps(model, opt, 1)
    newest = save_checkpoint(tmp_path, 2, params, opt, {"epoch": 0}, keep_last=3)
    damage(newest)

    other, other_opt = _setup(1)
    other_params = dict(other.named_parameters())
    before = _snapshot(other, other_opt)
    with pytest.raises(UnreadableCheckpointError, match="cannot be read"):
        load_checkpoint(newest, other_params, other_opt)
    _assert_unchanged(other, other_opt, before)

    skipped = []
    restored = load_latest_checkpoint(tmp_path, other_params, other_opt, on_skip=lambda p, r: skipped.append((p, r)))
    assert restored == Restored(tmp_path / "step-00000001", 1, restored.state) and restored.state["epoch"] == 0
    assert [p for p, _ in skipped] == [newest] and skipped[0][1]
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), expected))


def test_load_latest_warns_by_default_and_returns_none_without_a_readable_checkpoint(tmp_path):
    model, opt = _setup(0)
    params = dict(model.named_parameters())
    assert load_latest_checkpoint(tmp_path / "absent", params, opt) is None
    assert load_latest_checkpoint(tmp_path, params, opt) is None
    (save_checkpoint(tmp_path, 1, params, opt, {}, keep_last=2) / "trainable.safetensors").unlink()
    (tmp_path / "step-00000002").mkdir()  # a step directory without state.json is damaged too
    before = _snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="skipping checkpoint") as caught:
        assert load_latest_checkpoint(tmp_path, params, opt) is None
    assert [str(w.message).split(":")[0] for w in caught] == [
        f"skipping checkpoint {tmp_path / 'step-00000002'}", f"skipping checkpoint {tmp_path / 'step-00000001'}"]
    _assert_unchanged(model, opt, before)


def test_checkpoint_of_other_method_options_is_an_error_not_a_fallback(tmp_path):
    model, opt = _setup(0)
    save_checkpoint(tmp_path, 1, dict(model.named_parameters()), opt, {}, keep_last=2)
    torch.manual_seed(0)
    wider = torch.nn.Linear(4, 5)  # "the user changed method options": same names, other shapes
    wider_opt = torch.optim.AdamW(wider.parameters(), lr=0.1)
    save_checkpoint(tmp_path, 2, dict(wider.named_parameters()), wider_opt, {}, keep_last=2)
    before = _snapshot(model, opt)
    with pytest.raises(TunelabError, match="does not fit this model") as raised:
        load_latest_checkpoint(tmp_path, dict(model.named_parameters()), opt, on_skip=pytest.fail)
    assert not isinstance(raised.value, UnreadableCheckpointError)
    _assert_unchanged(model, opt, before)

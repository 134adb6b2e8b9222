import torch

from tunelab.atomic import atomic_dir
from tunelab.training.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint


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

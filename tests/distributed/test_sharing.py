"""The pure parts of multi-process training: each rank's share of a step, the config section, the launch command,
the per-rank memory plan."""

from __future__ import annotations

import pytest

from tunelab.resolve import load_config
from tunelab.errors import ConfigError
from tunelab.planning.distributed import per_rank
from tunelab.planning.memory import MemoryEstimate
from tunelab.planning.shape import ModelShape
from tunelab.training.distributed import World, share
from tunelab.cli import launch_command, launch_env
from tunelab.training.plan import StepPlan


def _plan(world: World, n: int = 22) -> StepPlan:
    return StepPlan.build(n, batch_size=2, grad_accum=2, epochs=2, max_steps=None, seed=1, lr=1e-3, schedule="cosine",
                          warmup_ratio=0, world=world)


def test_ranks_split_the_one_process_step_and_pad_the_short_one_with_fillers():
    one = StepPlan.build(22, batch_size=2, grad_accum=4, epochs=2, max_steps=None, seed=1, lr=1e-3, schedule="cosine",
                         warmup_ratio=0)
    ranks = [_plan(World(r, 2)) for r in range(2)]
    assert all(p.total == one.total == 6 for p in ranks)
    for step in range(one.total):
        whole = one.micro_batches(step)
        mine = [p.micro_batches(step) for p in ranks]
        fillers = [p.fillers(step) for p in ranks]
        real = [m[: len(m) - f] for m, f in zip(mine, fillers)]
        assert sorted(map(tuple, real[0] + real[1])) == sorted(map(tuple, whole))  # every micro-batch once
        assert len(mine[0]) == len(mine[1])  # the same number of passes on every rank
        assert all(m[len(m) - f:] == [whole[0]] * f for m, f in zip(mine, fillers))
    assert [p.fillers(2) for p in ranks] == [0, 1]  # the epoch's last step has 3 micro-batches for 2 ranks


def test_share_in_one_process_is_everything():
    assert share([[1], [2], [3]], World()) == ([[1], [2], [3]], 0)
    assert share([], World(1, 2)) == ([], 0)
    assert share([[1]], World(1, 2)) == ([[1]], 1)


def test_distributed_section_is_validated_with_its_key():
    config = load_config(None, ["data.train=x.jsonl", "distributed.strategy=fsdp", "distributed.cpu_offload=true"])
    assert config.distributed.strategy == "fsdp" and config.distributed.cpu_offload
    with pytest.raises(ConfigError, match="distributed"):
        load_config(None, ["data.train=x.jsonl", "distributed.strategy=horovod"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(None, ["data.train=x.jsonl", "distributed.zero_stage=2"])
    with pytest.raises(ConfigError, match="distributed"):
        load_config(None, ["data.train=x.jsonl", "distributed.nodes=2"])


def test_strategies_that_cannot_run_are_refused_before_anything_loads(monkeypatch):
    from tunelab.errors import TunelabError
    from tunelab.stages.training import check_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    deepspeed = load_config(None, ["data.train=x.jsonl", "distributed.strategy=deepspeed", "distributed.zero_stage=3"])
    with pytest.raises(TunelabError, match="use fsdp"):
        check_distributed(deepspeed)
    grpo = load_config(None, ["data.train=x.jsonl", "distributed.strategy=fsdp", "recipe.name=grpo"])
    with pytest.raises(TunelabError, match="grpo"):
        check_distributed(grpo)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_distributed(deepspeed)  # one process ignores the section


def test_launch_is_torchrun_with_the_cores_shared_out(monkeypatch):
    command = launch_command(2, ["cfg.yaml", "train.lr=1e-3", "--resume"])
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert command[-6:] == ["-m", "tunelab", "train", "cfg.yaml", "train.lr=1e-3", "--resume"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert launch_env(4)["OMP_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch_env(4)["OMP_NUM_THREADS"] == "3"


def test_per_rank_memory_shards_what_each_strategy_shards():
    gib = 2**30
    memory = MemoryEstimate(weights=16 * gib, trainable_weights=0, gradients=16 * gib, optimizer_states=64 * gib,
                            activations=8 * gib, weight_copies=0, logits=2 * gib, attention_mask=0, workspace=0,
                            overhead=1 * gib, peak_phase="backward")
    shape = ModelShape("llama", 4096, 14336, 32, 32, 8, 128, 128256, False)
    rows = {s: per_rank(memory, shape, 8, s) for s in ("ddp", "zero1", "zero2", "zero3/fsdp")}
    assert rows["ddp"].total == memory.total + 16 * gib  # the gradient buckets
    assert rows["zero1"].total == memory.total - 64 * gib + 8 * gib
    assert rows["zero2"].total == rows["zero1"].total - 16 * gib + 2 * gib
    assert rows["zero3/fsdp"].total == (2 + 2 + 8 + 8 + 2 + 1) * gib + 2 * 16 * gib // 32
    assert "h100-80gb" not in rows["ddp"].fits_on and "h100-80gb" in rows["zero3/fsdp"].fits_on


def test_a_checkpoint_gives_each_rank_its_own_random_state(tmp_path, monkeypatch):
    import random

    import torch

    from tunelab.training import checkpoint

    layer = torch.nn.Linear(2, 2)
    params = dict(layer.named_parameters())
    optimizer = torch.optim.AdamW(layer.parameters())
    torch.manual_seed(1)
    random.seed(1)
    rank1 = checkpoint.rng_states()
    torch.manual_seed(0)
    random.seed(0)
    rank0 = checkpoint.rng_states()
    checkpoint.save_checkpoint(tmp_path, 1, params, optimizer, {}, keep_last=1, other_ranks=[rank1])
    for rank, expected in ((1, rank1), (0, rank0)):
        torch.manual_seed(5)
        monkeypatch.setattr(checkpoint, "world", lambda rank=rank: World(rank, 2))
        checkpoint.load_checkpoint(tmp_path / "step-00000001", params, optimizer)
        assert torch.equal(torch.get_rng_state(), expected["torch"]["torch_cpu"])
        assert list(random.getstate()[1]) == list(expected["python_random"][1])

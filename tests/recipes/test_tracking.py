"""``tracking: [mlflow]``: a run is mirrored into MLflow (read back with mlflow's own client): the resolved config
as params, every logged step as metrics, the hashes as tags, the reports as artifacts, FINISHED at the end;
a resumed run continues its MLflow run; without tensorboard in ``tracking`` no event file is written."""

from __future__ import annotations

import json

import pytest

from tunelab.recipes import sft

pytest.importorskip("mlflow", reason="the tracking extra is not installed")


def test_a_run_is_mirrored_into_mlflow(make_config, tmp_path):
    from mlflow.tracking import MlflowClient

    config = make_config("tracking=[mlflow]", "train.max_steps=3", "train.batch_size=4", output="tracked")
    result = sft.main(config)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    client = MlflowClient(f"sqlite:///{result.run_dir.parent / 'mlflow.db'}")
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["train.max_steps"] == "3" and run.data.params["method.name"] == "lora"
    assert run.data.tags["config_hash"] == manifest["config_hash"] and run.data.tags["recipe"] == "sft"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3]
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m.value for m in losses] == pytest.approx([r["loss"] for r in logged if "loss" in r and "step" in r][:3])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.json", "config.yaml", "manifest.json"} <= artifacts
    assert not (result.run_dir / "tensorboard").exists()  # tensorboard was not asked for


def test_a_resumed_run_continues_its_mlflow_run(make_config, tmp_path):
    from mlflow.tracking import MlflowClient

    first = sft.main(make_config("tracking=[mlflow, tensorboard]", "train.max_steps=2", "train.batch_size=4", output="again"))
    run_id = json.loads((first.run_dir / "manifest.json").read_text())["mlflow_run_id"]
    longer = sft.main(make_config("tracking=[mlflow, tensorboard]", "train.max_steps=4", "train.batch_size=4", output="again"),
                      resume=True, force=True)
    assert json.loads((longer.run_dir / "manifest.json").read_text())["mlflow_run_id"] == run_id
    client = MlflowClient(f"sqlite:///{first.run_dir.parent / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]  # each step once
    assert (first.run_dir / "tensorboard").is_dir()

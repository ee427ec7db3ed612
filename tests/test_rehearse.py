"""The scale rehearsal end to end at iNat 2018's 8,142 classes (``-k scale``)."""

from __future__ import annotations

import csv
import json

import pytest
from slurm_helpers import cluster_env
from train_helpers import ENV, explain, run_module

from gala_scale.shards import like


@pytest.mark.slow
@pytest.mark.parametrize(
    "where", ["local", pytest.param("slurm", marks=pytest.mark.xdist_group("slurm"))]
)
def test_scale_rehearsal_at_8142_classes(tmp_path, where):
    """synth -> the real iNat builder -> configs/inat2018.yaml on 2 processes (or through
    slurm/inat_gala.sh on the two-node test cluster), preempted once and resumed -> test with
    PN -> (local: stage 2, then export -> gala-serve -> gala-batch over gRPC: the served top-1
    on the val images is the trainer's; the same after a Slurm run, so run once). Tiny model,
    32 x 32 images, 2 epochs."""
    if not (like.DATA / "lt_splits" / "cls_freq" / "iNaturalist18.json").is_file():
        pytest.skip(f"no iNat 2018 class profile under {like.DATA}")
    env = cluster_env() if where == "slurm" else ENV
    out = tmp_path / "rehearsal"
    args = ["--like", "inat2018", "--out", str(out), "--scale", "0.0005"]
    args += ["--image-size", "32x32", "--epochs", "2", "--set", "data.preset=cifar"]
    args += ["--slurm", "--no-serve"] if where == "slurm" else ["--stage2"]
    proc = run_module("gala_scale.rehearse", *args, timeout=900, env=env)
    assert proc.returncode == 0, explain(proc)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_classes"] == 8142
    assert "model.name=tiny" in result["overrides"] and "data.preset=cifar" in result["overrides"]
    stages = result["stages"]
    for stage in ("synthesize raw data", "build the shard set"):
        assert stages[stage]["seconds"] > 0 and stages[stage]["peak_rss_mib"] > 0
    run = out / "run"
    with open(run / "per_class.csv") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 8143 and rows[1][1] == "Plantae species 0000"
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"per_class_accuracy.png"}
    if where == "slurm":
        assert "completed after 1 requeue(s)" in proc.stdout
        (log,) = out.glob("slurm-*.out")
        assert "trainer exit 99" in log.read_text() and "resuming from" in log.read_text()
        assert "served_top1" not in result and not (out / "export").exists()
        return
    assert stages["train, resumed"]["peak_rss_mib"] > 0
    assert "the trainer checkpointed and exited 99" in proc.stdout
    assert "resuming from" in proc.stdout + proc.stderr
    second = result["stage2"]  # stage 2 at K = 8,142 on 2 processes, the cache built once
    assert set(second["top1"]) == {"gala", "balanced_softmax"}
    assert second["feature_cache_mib"] > 0 and len(list(run.glob("features/*/meta.json"))) == 1
    assert "stage 2, reading the feature cache" in stages
    assert stages["export to ONNX"]["seconds"] > 0 and stages["export to ONNX"]["peak_rss_mib"] > 0
    served = result["served"]
    assert served["images"] == json.loads((run / "results.json").read_text())["test_samples"]
    assert served["images"] >= 8142  # every class has val images
    assert result["served_top1"] == pytest.approx(result["trainer_top1"], abs=1.5 / 8142)
    names = json.loads((out / "shards" / "manifest.json").read_text())["class_names"]
    for line in (out / "served_predictions.jsonl").read_text().splitlines()[:100]:
        record = json.loads(line)  # class names from the iNat JSON, through the server
        assert record["pred_class"] == names[record["pred"]]
        assert len(record["top_k"]) == 5

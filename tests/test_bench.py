"""`make bench` on the CPU: the harness runs, records its conditions, and says what it skipped."""

import json

from benchmarks.steploop import bench_hooks
from conftest import run_module


def test_bench_quick_writes_json_and_markdown_with_conditions(tmp_path):
    run_module("benchmarks.bench", "--out", str(tmp_path), "--quick", "--only", "model,prep")
    results = json.loads((tmp_path / "results.json").read_text())
    env = results["environment"]
    assert {"device", "torch", "torchvision", "dali", "date", "command"} <= env.keys()
    records = results["records"]
    model = [r for r in records if r["section"] == "model"]
    assert any("reference fp32" in r["name"] and r["value"] > 0 for r in model)
    if "CPU" in env["device"]:
        assert all(r["value"] is None and "skipped" in r["notes"] for r in model if "bf16" in r["name"])
    profile = [r for r in records if r["section"] == "profile" and r["unit"] != "% of step time"]  # not GPU busy
    assert abs(sum(r["value"] for r in profile) - 100) < 0.1  # every operator's time in one kind
    assert max(profile, key=lambda r: r["value"])["name"].endswith("convolution / matmul")
    assert "convolution_backward" in (tmp_path / "profile_resnet18.txt").read_text()
    prep = {r["name"]: r for r in records if r["section"] == "prep"}
    assert len(prep) == 6 and all(r["value"] > 0 for r in prep.values())
    table = (tmp_path / "results.md").read_text()
    assert "### model" in table and "### profile" in table and "### prep" in table and env["device"] in table


def test_the_straggler_timing_calls_one_hook_per_synchronising_backward():
    (record,) = bench_hooks()
    assert record.value == 1 and "before: 161" in record.notes  # ResNet-50: 161 trainable parameters

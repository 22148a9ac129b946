"""CLI glue: compile-policy and plan show through argparse, exit codes, no partial output."""

from __future__ import annotations

import argparse
import json

import pytest

from ditplan.policy import commands
from ditplan.policy.plan_io import load_plan
from tests.policy.policy_factories import LayerTruth, TraceSpec, write_traces


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    layers = (LayerTruth(True), LayerTruth(False), LayerTruth(False), LayerTruth(True))
    return write_traces(tmp_path_factory.mktemp("traces"), TraceSpec(layers=layers))


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ditplan")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_compile_then_show(traces, tmp_path, capsys):
    out = tmp_path / "plans" / "tiny.json"
    assert run(["compile-policy", str(traces), "--out", str(out), "--quality", "fast"]) == 0
    plan = load_plan(out)
    assert plan.provenance.compiler_settings["quality"] == "fast"
    assert f"{plan.provenance.predicted_speedup:.2f}x" in capsys.readouterr().out
    assert run(["plan", "show", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("plan for WanTransformer3DModel") and "speedup" in lines[1]
    header = lines[3].split()
    assert header[:3] == ["layer", "role", "density"]
    rows = {line.split()[0]: line for line in lines[4:]}
    assert list(rows) == list(plan.block_order)
    steps = plan.workload.steps
    actions = plan.runs[0].actions("cond")
    assert "foreground" in rows["blocks.0"] and f"C{steps} R0 F0" in rows["blocks.0"]
    counts = " ".join(f"{a}{actions.count(a)}" for a in "CRF")
    assert f"{counts} (run blocks.1..blocks.2)" in rows["blocks.1"]


def test_overrides_for_a_benchmark_plan(traces, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["compile-policy", str(traces), "--out", str(out), "--all-roles", "foreground",
            "--role", "blocks.2=background", "--role", "blocks.3=background",
            "--density", "0.2", "--density", "blocks.0=0.5"]
    assert run(argv) == 0
    plan = load_plan(out)
    assert [g.blocks for g in plan.runs] == [("blocks.2", "blocks.3")]
    assert [plan.layers[b].attention.density for b in plan.block_order] == [0.5, 0.2, 0.2, 0.2]


def test_estimate_all_needs_no_measured_errors(traces, tmp_path, capsys):
    out = tmp_path / "all.json"
    assert run(["compile-policy", str(traces), "--out", str(out), "--estimate-dropped",
                "--density", "0.2"]) == 0  # the flag alone: every sparse head
    plan = load_plan(out)
    assert plan.provenance.compiler_settings["estimate_dropped"] == "all"
    assert all(layer.attention.estimate_heads == (True, True) for layer in plan.layers.values())
    capsys.readouterr()
    assert run(["plan", "show", str(out)]) == 0
    assert "0.20 +est 2/2" in capsys.readouterr().out


def test_mixed_heads_flag_reaches_the_compiler(traces, tmp_path):
    out = tmp_path / "mixed.json"
    assert run(["compile-policy", str(traces), "--out", str(out), "--mixed-heads"]) == 0
    assert load_plan(out).provenance.compiler_settings["mixed_heads"] is True


@pytest.mark.parametrize("extra, code, message", [
    (["--role", "blocks.1"], 2, "expected BLOCK=ROLE"),
    (["--density", "blocks.1=lots"], 2, "expected [BLOCK=]D"),
    (["--role", "blocks.1=middle"], 1, "roles must be one of"),
    (["--role", "blocks.77=background"], 1, "unknown blocks"),
    (["--target-speedup", "40"], 1, "not reachable"),
    # these synthetic traces, like any profiled without --output-error, lack output errors
    (["--estimate-dropped", "measured"], 1, "ditplan profile --output-error"),
])
def test_bad_arguments_write_nothing(traces, tmp_path, capsys, extra, code, message):
    out = tmp_path / "plan.json"
    assert run(["compile-policy", str(traces), "--out", str(out), *extra]) == code
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_traces_and_bad_plan_files(tmp_path, capsys):
    assert run(["compile-policy", str(tmp_path / "none"), "--out", str(tmp_path / "p.json")]) == 1
    assert "no trace files" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text(json.dumps({"schema_version": "9.0"}))
    assert run(["plan", "show", str(tmp_path / "broken.json")]) == 1
    assert "upgrade ditplan" in capsys.readouterr().err

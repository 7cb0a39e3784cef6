"""Smoke tests of the benchmark harness (``python -m muon_ext.bench``) at tiny sizes.

No timed assertions: timings on a shared 2-core CPU mean nothing. What is checked: the
floors' arithmetic, that every baseline computes the same Muon update as the float64
reference, the result file's contents, the skip rule, ``--compare`` and the chart fallback.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from muon_ext.bench import main
from muon_ext.benchmarking import report
from muon_ext.benchmarking.baselines import StepConfig, make_step
from muon_ext.benchmarking.shapes import SUITES, elementwise_bytes, get_suite, ns_flops
from muon_ext.benchmarking.timing import percentile
from muon_ext.coefficients import PRESETS, matrix_shape, update_scale
from muon_ext.reference import muon_step_reference

HAS_TORCH_MUON = hasattr(torch.optim, "Muon")
FAST = ["--device", "cpu", "--quick-peaks", "--repeats", "2", "--warmup", "1", "--no-plot"]


def test_anchor_floor_arithmetic():
    # ANCHORS.md: GPT-2 small 1.63 TFLOP (5 it.) and 20 B x 84.9 M elements; Llama-3-8B layer 21 TFLOP.
    small = get_suite("gpt2_small")
    assert small.num_matrices == 72
    assert ns_flops(small.shapes(), 5) == pytest.approx(1.631e12, rel=1e-3)
    assert elementwise_bytes(small.shapes()) == 20 * small.numel
    assert small.buckets() == {(768, 768): 48, (768, 3072): 24}
    medium = get_suite("gpt2_medium")
    assert medium.buckets() == {(1024, 1024): 96, (1024, 4096): 48}
    assert ns_flops(get_suite("llama3_8b_layer").shapes(), 5) == pytest.approx(20.8e12, rel=1e-2)
    assert ns_flops([(3, 4)], 1) == 4 * 9 * 4 + 2 * 27  # tall: m = 3, n = 4
    assert get_suite("moe_64x1024x4096").buckets() == {(1024, 4096): 128}
    resnet = get_suite("resnet50_convs")
    assert resnet.num_params == 53 and all(len(s) == 4 for s in resnet.shapes())
    # the fused-qkv variant holds the same elements as the separate one
    assert get_suite("gpt2_small_fused_qkv").numel == small.numel
    for suite in SUITES.values():
        assert len(suite.names()) == suite.num_params


def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 20) == pytest.approx(1.8)
    assert percentile(xs, 80) == pytest.approx(4.2)
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize("impl", ["muon_ext", "torch_loop", "torch_batched"])
@pytest.mark.parametrize("preset", ["jordan", "polar_express"])
def test_baseline_step_matches_float64_reference(impl, preset, seed):
    """Each timed implementation computes Muon: one step against the float64 oracle."""
    from muon_ext.coefficients import resolve_ns_coefficients

    schedule = resolve_ns_coefficients(preset, 5)
    cfg = StepConfig(lr=0.05, weight_decay=0.1, schedule=schedule)
    shapes = get_suite("tiny").shapes() + [(40, 12)]
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    ref_p = [p.double() for p in params]
    ref_m = [torch.zeros_like(p) for p in ref_p]
    step = make_step(impl, params, grads, cfg)
    for _ in range(2):  # the second step also exercises the momentum carried over
        step()
        muon_step_reference(
            ref_p,
            [g.double() for g in grads],
            ref_m,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            eps=cfg.eps,
            ns_coefficients=schedule,
            update_scales=[update_scale(*matrix_shape(s)[1:], None) for s in shapes],
        )
    for p, r in zip(params, ref_p):
        err = (p.double() - r).norm() / r.norm()
        assert err < 1e-4, f"{impl} {tuple(p.shape)}: relative error {err:.2e}"


@pytest.mark.skipif(not HAS_TORCH_MUON, reason="torch.optim.Muon needs torch >= 2.9")
def test_torch_muon_baseline_updates_stacks_through_views(seed):
    params = [torch.randn(2, 24, 8), torch.randn(8, 4, 3, 3)]
    grads = [torch.randn_like(p) for p in params]
    before = [p.clone() for p in params]
    make_step("torch_muon", params, grads, StepConfig())()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


def test_cpu_step_bench_writes_a_complete_record(tmp_path):
    out = tmp_path / "step.json"
    assert main(["step", "--suite", "tiny", *FAST, "--out", str(out), "--label", "smoke"]) == 0
    record = json.loads(out.read_text())
    env = record["env"]
    for key in (
        "device",
        "driver",
        "torch",
        "cuda",
        "build_info",
        "commit",
        "dirty",
        "date_utc",
        "cpu_model",
        "torch_threads",
    ):
        assert key in env, key
    assert env["device_type"] == "cpu" and env["driver"] == "n/a"
    assert record["label"] == "smoke" and record["benches"] == ["step"]
    assert record["peaks"]["matmul_flops"] > 0 and record["peaks"]["copy_bytes_per_s"] > 0
    rows = {r["impl"]: r for r in record["rows"]}
    expected = {"muon_ext", "torch_muon", "torch_loop", "torch_batched"}
    assert set(rows) == expected
    for impl, row in rows.items():
        for key in (
            "suite",
            "impl",
            "median_ms",
            "p20_ms",
            "p80_ms",
            "floor_ms",
            "ratio_to_floor",
            "ratio_to_muon_ext",
            "note",
            "status",
        ):
            assert key in row, (impl, key)
        if impl == "torch_muon" and not HAS_TORCH_MUON:
            assert row["status"] == "skipped"
            continue
        assert row["status"] == "ok", row["note"]
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["repeats"] == 2 and len(row["times_ms"]) == 2
        assert row["floor_ms"] == pytest.approx(record["suites"]["tiny"]["floor_ms"])
        # same data, same algorithm: the fp32 rows agree closely, torch_muon (bf16 NS) loosely
        assert row["update_rel_diff"] < (5e-2 if impl == "torch_muon" else 1e-4), impl
    assert rows["muon_ext"]["ratio_to_muon_ext"] == 1.0
    assert "3-D/4-D params passed as 2-D views" in rows["torch_muon"]["note"] or not HAS_TORCH_MUON
    # the printed table comes back from the file alone
    text = report.format_record(record)
    assert "torch_batched" in text and "x muon_ext" in text


def test_budget_rule_skips_and_records_why(tmp_path, capsys):
    out = tmp_path / "skip.json"
    main(
        [
            "step",
            "--suite",
            "cpu_small",
            "--impl",
            "torch_muon",
            *FAST,
            "--budget-s",
            "1e-9",
            "--out",
            str(out),
        ]
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "skipped" and row["median_ms"] is None
    assert row["note"].startswith("skipped: estimated") and "budget" in row["note"]
    assert "skipped: estimated" in capsys.readouterr().out


def test_ns_bench_accuracy_per_preset(tmp_path):
    out = tmp_path / "ns.json"
    main(
        ["ns", "--shapes", "24x16", "--batch", "3", "--presets", *PRESETS, *FAST, "--out", str(out)]
    )
    rows = json.loads(out.read_text())["rows"]
    assert {(r["impl"], r["preset"]) for r in rows} == {
        (i, p) for i in ("muon_ext", "torch_bmm") for p in PRESETS
    }
    for r in rows:
        assert r["status"] == "ok", r["note"]
        assert (r["m"], r["n"], r["batch"]) == (16, 24, 3)  # oriented wide
        assert 0.0 < r["sigma_min"] <= r["sigma_max"] < 1.5
    err = {(r["impl"], r["preset"]): r["max_sigma_err"] for r in rows}
    # deepseek_v4 ends with two convergent iterations: near-exact on this spectrum
    assert err["muon_ext", "deepseek_v4"] < 1e-2
    assert err["muon_ext", "polar_express"] < err["muon_ext", "jordan"]
    for p in PRESETS:  # fused and torch bmm agree (both fp32 on CPU)
        assert err["muon_ext", p] == pytest.approx(err["torch_bmm", p], abs=1e-3)


def _record(rows):
    env = {
        "device": "CPU: test",
        "torch": "x",
        "commit": "abc",
        "dirty": False,
        "date_utc": "2026-01-01T00:00:00+00:00",
    }
    return {"env": env, "rows": rows}


def _row(impl, med, p20, p80, suite="s"):
    return {
        "bench": "step",
        "suite": suite,
        "preset": "jordan",
        "impl": impl,
        "median_ms": med,
        "p20_ms": p20,
        "p80_ms": p80,
    }


def test_compare_verdicts_use_the_percentile_bands():
    old = _record(
        [_row("a", 10, 9, 11), _row("b", 10, 9, 11), _row("c", 10, 9, 11), _row("gone", 1, 1, 1)]
    )
    new = _record(
        [_row("a", 5, 4, 6), _row("b", 20, 19, 21), _row("c", 10.5, 10, 12), _row("added", 1, 1, 1)]
    )
    lines = {line.split()[3]: line for line in report.compare_records(old, new).splitlines()[4:]}
    assert "faster" in lines["a"] and "-50.0%" in lines["a"]
    assert "slower" in lines["b"] and "+100.0%" in lines["b"]
    assert "bands overlap" in lines["c"]
    assert "only in old" in lines["gone"] and "only in new" in lines["added"]


def test_compare_flag_on_two_result_files(tmp_path, capsys):
    paths = []
    for i in range(2):
        path = tmp_path / f"r{i}.json"
        main(
            [
                "step",
                "--suite",
                "tiny",
                "--impl",
                "muon_ext",
                "torch_batched",
                *FAST,
                "--out",
                str(path),
            ]
        )
        paths.append(str(path))
    capsys.readouterr()
    assert main(["--compare", *paths]) == 0
    out = capsys.readouterr().out
    assert "muon_ext" in out and "torch_batched" in out and "change" in out


def test_chart_degrades_without_matplotlib(tmp_path, monkeypatch, capsys):
    record = {
        "benches": ["step"],
        "env": {"device": "d", "torch": "t", "date_utc": "now"},
        "rows": [dict(_row("muon_ext", 1.0, 0.9, 1.1), ratio_to_floor=2.0)],
    }
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    assert report.plot_record(record, tmp_path / "x.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


def test_chart_is_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    record = {
        "benches": ["step"],
        "env": {"device": "d", "torch": "t", "date_utc": "now"},
        "rows": [
            dict(_row("muon_ext", 1.0, 0.9, 1.1), ratio_to_floor=2.0),
            dict(_row("torch_loop", 3.0, 2.9, 3.1), ratio_to_floor=6.0),
        ],
    }
    path = report.plot_record(record, tmp_path / "x.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_has_no_nan(tmp_path):
    path = report.write_json(
        {"rows": [{"x": float("nan"), "y": [float("inf"), 1.0]}]}, tmp_path / "r.json"
    )
    assert json.loads(path.read_text()) == {"rows": [{"x": None, "y": [None, 1.0]}]}

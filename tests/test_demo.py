"""The demo (the README's first command) on a tiny configuration: seconds, not minutes."""

from __future__ import annotations

import json

import pytest

from muon_ext import demo


def test_tiny_demo_trains_and_writes_curves(tmp_path):
    cfg = demo.parse_args(["--preset", "tiny", "--steps", "24", "--eval-every", "6",
                           "--corpus-bytes", "100000", "--out", str(tmp_path), "--no-progress",
                           "--no-plot"])
    record = demo.run(cfg)
    by_kind = {r["optimizer"]: r for r in record["results"]}
    assert set(by_kind) == {"muon", "adamw"}
    muon = by_kind["muon"]
    assert muon["final_val_loss"] < muon["first_val_loss"] - 0.2, muon["curve"]["val_loss"]
    assert muon["final_val_loss"] < 5.0  # log(256) = 5.55: better than uniform over bytes
    saved = json.loads((tmp_path / "curves.json").read_text())
    assert saved["results"][0]["curve"]["train_loss"] == muon["curve"]["train_loss"]


def test_demo_is_deterministic_with_a_seed(tmp_path):
    args = ["--preset", "tiny", "--steps", "5", "--corpus-bytes", "50000", "--only", "muon",
            "--no-progress", "--no-plot", "--seed", "3"]
    a = demo.run(demo.parse_args(args + ["--out", str(tmp_path / "a")]))
    b = demo.run(demo.parse_args(args + ["--out", str(tmp_path / "b")]))
    assert a["results"][0]["curve"]["train_loss"] == b["results"][0]["curve"]["train_loss"]


def test_stdlib_corpus_is_read_in_process():
    corpus = demo.stdlib_corpus(30_000)
    assert len(corpus) == 30_000 and b"def " in corpus


@pytest.mark.parametrize(
    "argv,match",
    [(["--steps", "0"], "positive integer"), (["--muon-lr", "-1"], "positive"),
     (["--heads", "3", "--d-model", "32"], "divisible"), (["--device", "tpu"], "device"),
     (["--preset", "huge"], "invalid choice"), (["--weight-decay", "nan"], "weight-decay")],
    ids=["steps", "lr", "heads", "device", "preset", "wd"],
)
def test_bad_arguments_give_clear_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        demo.parse_args(argv)
    assert info.value.code == 2
    assert match in capsys.readouterr().err

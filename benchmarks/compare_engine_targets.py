"""Runs bench_engine_targets.py in two trees, interleaved, and writes the results as JSON.

    python benchmarks/compare_engine_targets.py BEFORE_TREE AFTER_TREE OUT.json \\
        "host" "fsdp" "step cpu_small" "step gpt2_small_1layer" "mem 48" ...

Each measurement runs in a fresh process with PYTHONPATH set to its tree (each tree built in
place), in the order before, after, before, after, ... (``--repeats`` rounds), so that load on
a shared machine hits both alike. The JSON holds every run, the machine and the commits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _commit(tree: str) -> str:
    out = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _run(tree: str, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run([sys.executable, str(HERE / "bench_engine_targets.py"), *args],
                         capture_output=True, text=True, env=env, cwd=tree, timeout=1800)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("out")
    ap.add_argument("what", nargs="+", help='measurements, e.g. "host" or "step cpu_small"')
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    import torch

    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "before": {"tree": a.before, "commit": _commit(a.before)},
        "after": {"tree": a.after, "commit": _commit(a.after)},
        "runs": [],
    }
    for what in a.what:
        args = what.split()
        for r in range(a.repeats):
            for side in ("before", "after"):
                result = _run(record[side]["tree"], args)
                record["runs"].append({"what": what, "side": side, "round": r, **result})
                print(json.dumps(record["runs"][-1]), flush=True)
    Path(a.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()

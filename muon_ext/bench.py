"""``python -m muon_ext.bench``: the Muon step and Newton-Schulz, timed against baselines and floors.

Examples::

    python -m muon_ext.bench                                 # full step, default suites
    python -m muon_ext.bench step --suite cpu_small --repeats 5
    python -m muon_ext.bench ns --shapes 768x3072 --batch 1 24 --presets jordan polar_express
    python -m muon_ext.bench ns --algorithm standard gram auto --shapes 512x2048 --batch 16
    python -m muon_ext.bench all --out-dir results/
    python -m muon_ext.bench --compare old.json new.json
    python -m muon_ext.bench --list

Each run prints a table and writes one JSON file (device, driver, versions, commit, date,
measured peaks, one row per suite and implementation) and a PNG chart when matplotlib is
installed. See benchmarks/README.md in the repository for how to read the numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .benchmarking import report
from .benchmarking.baselines import IMPLS
from .benchmarking.env import collect_env
from .benchmarking.newton_schulz import DEFAULT_CPU_CASES, DEFAULT_GPU_CASES, NS_IMPLS, run_ns_bench
from .benchmarking.shapes import DEFAULT_CPU_SUITES, DEFAULT_GPU_SUITES, SUITES, get_suite
from .benchmarking.step import DEFAULT_CPU_IMPLS, DEFAULT_GPU_IMPLS, run_step_bench
from .benchmarking.timing import measure_peaks
from .coefficients import NS_ALGORITHM_CHOICES, PRESETS

__all__ = ["build_parser", "main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Per device type: repeats, warm-up, rotating input sets, time budget per row (s).
_DEFAULTS = {"cuda": (50, 5, 3, 300.0), "cpu": (10, 2, 2, 60.0)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m muon_ext.bench",
        description="Time the Muon step (step) and Newton-Schulz alone (ns) against baselines "
        "and the FLOP/byte floors; write JSON + PNG; diff two result files with --compare.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "bench",
        nargs="?",
        choices=("step", "ns", "all"),
        default="step",
        help="what to run (default: step)",
    )
    p.add_argument(
        "--compare", nargs=2, metavar=("OLD", "NEW"), help="diff two result JSON files and exit"
    )
    p.add_argument("--list", action="store_true", help="list suites, implementations, presets")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    g = p.add_argument_group("full step (step)")
    g.add_argument(
        "--suite",
        nargs="+",
        metavar="NAME",
        help=f"suites, or 'all' (default: {' '.join(DEFAULT_GPU_SUITES)} on CUDA, "
        f"{' '.join(DEFAULT_CPU_SUITES)} on CPU)",
    )
    g.add_argument(
        "--impl",
        nargs="+",
        choices=list(IMPLS),
        metavar="IMPL",
        help=f"implementations, from {', '.join(IMPLS)} (default: all on CUDA; "
        "all but torch_batched_compiled on CPU)",
    )
    g.add_argument("--param-dtype", choices=list(_DTYPES), default="float32")
    g.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="jordan",
        help="Newton-Schulz coefficient schedule of the step (default: jordan)",
    )
    p.add_argument(
        "--algorithm",
        nargs="+",
        choices=NS_ALGORITHM_CHOICES,
        default=["standard"],
        help="Newton-Schulz algorithm(s) of muon_ext's rows, step and ns (default: standard); "
        "each gets its own row, named muon_ext[gram] etc., floored by its own FLOPs",
    )
    g.add_argument(
        "--normuon",
        action="store_true",
        help="also a muon_ext[normuon] row (standard NS, normuon=True), next to muon_ext's",
    )
    g = p.add_argument_group("Newton-Schulz alone (ns)")
    g.add_argument(
        "--shapes", nargs="+", metavar="MxN", help="matrix shapes (default: the model buckets)"
    )
    g.add_argument(
        "--batch", nargs="+", type=int, metavar="B", help="batch sizes for --shapes (default 1)"
    )
    g.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    g.add_argument(
        "--ns-impl",
        nargs="+",
        choices=list(NS_IMPLS),
        metavar="IMPL",
        help=f"from {', '.join(NS_IMPLS)} (default: all on CUDA; no compiled one on CPU)",
    )
    g.add_argument("--no-accuracy", action="store_true", help="skip the singular-value check")
    g = p.add_argument_group("timing")
    g.add_argument("--repeats", type=int, help="timed steps per row (default: 50 CUDA, 10 CPU)")
    g.add_argument("--warmup", type=int, help="untimed steps first (default: 5 CUDA, 2 CPU)")
    g.add_argument("--rotate", type=int, help="input sets cycled through (default: 3 CUDA, 2 CPU)")
    g.add_argument(
        "--budget-s",
        type=float,
        help="time budget per row in seconds; 0 = none (default: 300 CUDA, 60 CPU)",
    )
    g.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--quick-peaks", action="store_true", help="smaller peak measurements (smoke tests)"
    )
    g.add_argument("--no-nvtx", action="store_true", help="no bench::<suite>::<impl> NVTX ranges")
    g.add_argument(
        "--no-memory", action="store_true",
        help="skip the peak-extra-memory column (on the CPU it runs one fresh process per row)",
    )
    g.add_argument(
        "--profiler-range",
        action="store_true",
        help="cudaProfilerStart/Stop around the timed steps "
        "(for nsys --capture-range=cudaProfilerApi)",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--out-dir",
        help="where result files go (default: benchmarks/results if it "
        "exists here, else the current directory)",
    )
    g.add_argument("--out", help="result JSON path (the PNG goes beside it)")
    g.add_argument("--no-json", action="store_true")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--label", default="", help="free text stored in the result file")
    return p


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        m, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: expected MxN (e.g. 768x3072), got {text!r}") from None
    if m < 1 or n < 1:
        raise SystemExit(f"--shapes: sizes must be positive, got {text!r}")
    return m, n


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to this torch")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device: cpu or cuda, got {text!r}")
    return device


def _list() -> str:
    lines = ["suites:"]
    for s in SUITES.values():
        where = "CPU and GPU" if s.cpu_friendly else "GPU"
        lines.append(f"  {s.name:24s} {s.num_matrices:4d} matrices  ({where})  {s.description}")
    lines.append("step implementations:")
    lines += [f"  {name:24s} {info.description}" for name, info in IMPLS.items()]
    lines.append(f"ns implementations: {', '.join(NS_IMPLS)}")
    lines.append(f"presets: {', '.join(PRESETS)}")
    lines.append(
        "ns cases (m, n, batch) on CUDA: "
        + " ".join(f"{m}x{n}:{b}" for m, n, b in DEFAULT_GPU_CASES)
    )
    lines.append(
        "ns cases (m, n, batch) on CPU:  "
        + " ".join(f"{m}x{n}:{b}" for m, n, b in DEFAULT_CPU_CASES)
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        old, new = (report.load_record(f) for f in args.compare)
        print(report.compare_records(old, new))
        return 0
    if args.list:
        print(_list())
        return 0

    device = _device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    d_rep, d_warm, d_rot, d_budget = _DEFAULTS[device.type]
    repeats = args.repeats if args.repeats is not None else d_rep
    warmup = args.warmup if args.warmup is not None else d_warm
    rotate = args.rotate if args.rotate is not None else d_rot
    budget = args.budget_s if args.budget_s is not None else d_budget
    if repeats < 1 or warmup < 0 or rotate < 1:
        raise SystemExit("--repeats and --rotate must be >= 1, --warmup >= 0")
    benches = ["step", "ns"] if args.bench == "all" else [args.bench]

    env = collect_env(device)
    print(
        f"muon_ext bench on {env['device']} (torch {env['torch']}); measuring peaks ...", flush=True
    )
    peaks = measure_peaks(device, quick=args.quick_peaks)
    record: dict = {
        "schema": report.SCHEMA,
        "benches": benches,
        "label": args.label,
        "env": env,
        "peaks": peaks,
        "config": {
            "repeats": repeats,
            "warmup": warmup,
            "rotate": rotate,
            "budget_s": budget,
            "seed": args.seed,
            "l2_flush": device.type == "cuda",
            "timer": "cuda events" if device.type == "cuda" else "perf_counter",
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "rows": [],
    }

    if "step" in benches:
        names = args.suite or list(
            DEFAULT_GPU_SUITES if device.type == "cuda" else DEFAULT_CPU_SUITES
        )
        if names == ["all"]:
            names = list(SUITES)
        try:
            suites = [get_suite(n) for n in names]
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        impls = args.impl or list(DEFAULT_GPU_IMPLS if device.type == "cuda" else DEFAULT_CPU_IMPLS)
        param_dtype = _DTYPES[args.param_dtype]
        record["config"].update(step_impls=impls, param_dtype=args.param_dtype, preset=args.preset,
                                ns_algorithms=args.algorithm)
        print(f"full step: {', '.join(names)}", flush=True)
        rows, infos = run_step_bench(
            suites,
            impls,
            device,
            peaks,
            param_dtype=param_dtype,
            preset=args.preset,
            repeats=repeats,
            warmup=warmup,
            rotate=rotate,
            budget_s=budget,
            seed=args.seed,
            nvtx=not args.no_nvtx,
            profiler_range=args.profiler_range,
            memory=not args.no_memory,
            ns_algorithms=args.algorithm,
            normuon=args.normuon,
            log=lambda s: print(s, flush=True),
        )
        record["rows"] += rows
        record["suites"] = infos

    if "ns" in benches:
        if args.shapes:
            batches = args.batch or [1]
            cases = [(*_parse_shape(s), b) for s in args.shapes for b in batches]
        else:
            cases = list(DEFAULT_GPU_CASES if device.type == "cuda" else DEFAULT_CPU_CASES)
        ns_impls = args.ns_impl or (
            list(NS_IMPLS) if device.type == "cuda" else ["muon_ext", "torch_bmm"]
        )
        record["ns"] = {
            "cases": [list(c) for c in cases],
            "presets": args.presets,
            "impls": ns_impls,
            "dtype_note": "NS in bf16, fp32 in/out"
            if device.type == "cuda"
            else "NS in fp32 on CPU, fp32 in/out",
        }
        print(f"Newton-Schulz: {len(cases)} cases x {len(args.presets)} presets", flush=True)
        record["rows"] += run_ns_bench(
            cases,
            args.presets,
            ns_impls,
            device,
            peaks,
            repeats=repeats,
            warmup=warmup,
            rotate=rotate,
            budget_s=budget,
            accuracy=not args.no_accuracy,
            seed=args.seed,
            nvtx=not args.no_nvtx,
            ns_algorithms=args.algorithm,
            log=lambda s: print(s, flush=True),
        )

    report.add_ratios(record["rows"])
    record["warnings"] = report.floor_warnings(record["rows"])
    print()
    print(report.format_record(record))

    if not args.no_json or not args.no_plot:
        if args.out:
            json_path = Path(args.out)
        else:
            out_dir = (
                Path(args.out_dir)
                if args.out_dir
                else (
                    Path("benchmarks/results") if Path("benchmarks/results").is_dir() else Path(".")
                )
            )
            json_path = out_dir / f"{report.result_stem(record)}.json"
        if not args.no_json:
            print(f"\nresults: {report.write_json(record, json_path)}")
        if not args.no_plot:
            png = report.plot_record(record, json_path.with_suffix(".png"))
            if png is not None:
                print(f"chart:   {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

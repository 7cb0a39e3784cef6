"""Result records: JSON files, the printed table, a PNG chart and ``--compare``.

A record is one run: ``{"schema", "benches", "env", "peaks", "config", "suites", "rows"}``.
Each row is ``{bench, suite, impl, median_ms, p20_ms, p80_ms, floor_ms, ratio_to_floor,
ratio_to_muon_ext, note, status, ...}``; ``status`` is ``ok``, ``skipped`` or ``error`` and the
timing fields of a row that did not run are null.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SCHEMA",
    "add_ratios",
    "compare_records",
    "floor_warnings",
    "format_record",
    "load_record",
    "plot_record",
    "result_stem",
    "write_json",
]

SCHEMA = "muon_ext.bench/1"


def _clean(value: Any) -> Any:
    """NaN/inf are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(record: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(record), indent=1, allow_nan=False) + "\n")
    return path


def load_record(path: str | Path) -> dict:
    record = json.loads(Path(path).read_text())
    if not isinstance(record, dict) or "rows" not in record:
        raise ValueError(f"{path}: not a muon_ext benchmark result (no 'rows')")
    return record


def result_stem(record: dict) -> str:
    """``<benches>_<device>_<YYYYmmddTHHMMSSZ>``: one file name per run."""
    env = record["env"]
    device = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()[:40]
    stamp = re.sub(r"[^0-9T]", "", env["date_utc"].split("+")[0]) + "Z"
    return f"{'-'.join(record['benches'])}_{device}_{stamp}"


def row_key(row: dict) -> tuple:
    return (row.get("bench"), row.get("suite"), row.get("preset"), row.get("impl"))


def floor_warnings(rows: list[dict]) -> list[str]:
    """A row faster than its floor means the peaks measured in this run are too low."""
    fast = [r for r in rows if r.get("ratio_to_floor") is not None and r["ratio_to_floor"] < 1.0]
    if not fast:
        return []
    worst = min(fast, key=lambda r: r["ratio_to_floor"])
    return [
        (
            f"{len(fast)} row(s) ran faster than their floor (lowest: {worst['suite']} {worst['impl']} at "
            f"{worst['ratio_to_floor']:.2f}x): the peaks measured in this run are too low (a busy "
            "machine, or a faster unit than the one measured, e.g. bf16 matmul on a CPU with "
            "AVX512-BF16/AMX); ratios to the floor are not meaningful for them"
        )
    ]


def add_ratios(rows: list[dict], reference_impl: str = "muon_ext") -> None:
    """Fills ratio_to_floor and ratio_to_muon_ext (impl time / muon_ext time, same case)."""
    ref: dict[tuple, float] = {}
    for r in rows:
        if r["impl"] == reference_impl and r.get("median_ms") is not None:
            ref[row_key(r)[:3]] = r["median_ms"]
    for r in rows:
        med = r.get("median_ms")
        floor = r.get("floor_ms")
        r["ratio_to_floor"] = med / floor if med is not None and floor else None
        base = ref.get(row_key(r)[:3])
        r["ratio_to_muon_ext"] = med / base if med is not None and base else None


# ---------------------------------------------------------------------- table


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _fmt_x(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}x"
    if v >= 10:
        return f"{v:.1f}x"
    return f"{v:.2f}x" if v >= 0.1 else f"{v:.3f}x"


def _fmt_sci(v: float | None) -> str:
    return "-" if v is None else f"{v:.1e}"


_NUMERIC = re.compile(r"^[-+0-9.ex%\[\], ]*$")


def _table(rows: Sequence[dict], columns: Sequence[tuple[str, Callable[[dict], str]]]) -> str:
    cells = [[h for h, _ in columns]] + [[f(r) for _, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    numeric = [
        i < len(columns) - 1 and all(_NUMERIC.match(line[i]) for line in cells[1:])
        for i in range(len(columns))
    ]
    lines = []
    for n, line in enumerate(cells):
        parts = [
            c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))
        ]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _si(v: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def format_header(record: dict) -> str:
    env, peaks = record["env"], record["peaks"]
    commit = env.get("commit", "n/a")
    commit = commit[:10] + (" (dirty)" if env.get("dirty") else "")
    threads = f", {env.get('torch_threads')} threads" if env["device_type"] == "cpu" else ""
    lines = [
        (
            f"device: {env['device']}{threads} | driver {env['driver']} | torch {env['torch']} | "
            f"CUDA {env['cuda']} | muon_ext {env['muon_ext']} @ {commit} | {env['date_utc']}"
        ),
    ]
    shape = "x".join(str(s) for s in peaks["matmul_shape"])
    extra = ""
    by_dtype = peaks.get("matmul_flops_by_dtype", {})
    others = [f"{d} {_si(v, 'FLOP/s')}" for d, v in by_dtype.items() if d != peaks["matmul_dtype"]]
    if others:
        extra = f" (also {', '.join(others)})"
    lines.append(
        f"peaks measured in this run: {peaks['matmul_dtype']} matmul {shape} "
        f"{_si(peaks['matmul_flops'], 'FLOP/s')}{extra}; copy {_si(peaks['copy_bytes_per_s'], 'B/s')} "
        "(read + write)"
    )
    if env["device_type"] == "cpu":
        lines.append(
            "floors use the fp32 matmul rate: the CPU path computes Newton-Schulz in fp32. "
            "CPU timings on a shared machine are noisy."
        )
    return "\n".join(lines)


def _suite_line(name: str, s: dict) -> str:
    return (
        f"  {name}: {s['description']} | {s['num_params']} params, {s['num_matrices']} matrices, "
        f"{s['numel'] / 1e6:.2f} M elements | NS {_si(s['ns_flops'], 'FLOP')} "
        f"({s['ns_iterations']} it.) floor {_fmt_ms(s['ns_floor_ms'])} ms + elementwise "
        f"{_si(s['ew_bytes'], 'B')} floor {_fmt_ms(s['ew_floor_ms'])} ms = {_fmt_ms(s['floor_ms'])} ms"
    )


# The timing columns both tables share, after each table's own leading columns.
_TIMING_COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("median ms", lambda r: _fmt_ms(r.get("median_ms"))),
    ("p20", lambda r: _fmt_ms(r.get("p20_ms"))),
    ("p80", lambda r: _fmt_ms(r.get("p80_ms"))),
    # The Newton-Schulz FLOPs of the row's algorithm (Gram rows count fewer), in its floor.
    ("NS FLOP", lambda r: "-" if r.get("ns_flops") is None else _si(r["ns_flops"], "")),
    ("floor ms", lambda r: _fmt_ms(r.get("floor_ms"))),
    ("x floor", lambda r: _fmt_x(r.get("ratio_to_floor"))),
    ("x muon_ext", lambda r: _fmt_x(r.get("ratio_to_muon_ext"))),
]

STEP_COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("suite", lambda r: r["suite"]),
    ("impl", lambda r: r["impl"]),
    *_TIMING_COLUMNS,
    ("host ms", lambda r: _fmt_ms(r.get("host_ms"))),
    ("peak extra MiB", lambda r: "-" if r.get("peak_extra_mib") is None else f"{r['peak_extra_mib']:.1f}"),
    ("upd diff", lambda r: _fmt_sci(r.get("update_rel_diff"))),
    ("note", lambda r: r.get("note", "")),
]

NS_COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("case", lambda r: r["suite"]),
    ("preset", lambda r: r.get("preset", "")),
    ("impl", lambda r: r["impl"]),
    *_TIMING_COLUMNS,
    ("max|s-1|", lambda r: "-" if r.get("max_sigma_err") is None else f"{r['max_sigma_err']:.3f}"),
    (
        "s range",
        lambda r: (
            "-" if r.get("sigma_min") is None else f"[{r['sigma_min']:.3f}, {r['sigma_max']:.3f}]"
        ),
    ),
    ("note", lambda r: r.get("note", "")),
]


def format_record(record: dict) -> str:
    out = [format_header(record)]
    for w in record.get("warnings", []):
        out.append(f"WARNING: {w}")
    for bench in record["benches"]:
        rows = [r for r in record["rows"] if r.get("bench") == bench]
        if bench == "step":
            out.append("\nfull optimizer step (one step over all of a suite's matrices)")
            suites = record.get("suites", {})
            for name in dict.fromkeys(r["suite"] for r in rows):
                if name in suites:
                    out.append(_suite_line(name, suites[name]))
            out.append(_table(rows, STEP_COLUMNS))
            out.append(
                "x floor = median / (NS floor + elementwise floor); x muon_ext = median / muon_ext's "
                "median (above 1: slower than muon_ext); upd diff = |update - reference update| / "
                "|reference update| on the first step from the same state (reference: the suite's "
                "first row, muon_ext by default)"
            )
        else:
            ns = record.get("ns", {})
            out.append(
                "\nNewton-Schulz alone on a (B, m, n) batch"
                + (f" ({ns.get('dtype_note')})" if ns.get("dtype_note") else "")
            )
            out.append(_table(rows, NS_COLUMNS))
            out.append(
                "max|s-1|, s range: singular values of the result for inputs whose singular values "
                "are log-spaced in [1e-3, 1] (before the Frobenius normalization)"
            )
    return "\n".join(out)


# ---------------------------------------------------------------------- chart


def plot_record(record: dict, path: str | Path) -> Path | None:
    """Bar chart of each row's time over its floor (log scale). Returns None (and says why)
    when matplotlib is not installed: ``pip install muon_ext[plot]``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("chart skipped: matplotlib is not installed (pip install 'muon_ext[plot]')")
        return None
    benches = record["benches"]
    fig, axes = plt.subplots(len(benches), 1, figsize=(12, 4.2 * len(benches)), squeeze=False)
    for ax, bench in zip(axes[:, 0], benches):
        rows = [r for r in record["rows"] if r.get("bench") == bench and r.get("median_ms")]
        if bench == "ns":  # one preset keeps the chart readable; the table has them all
            presets = [r.get("preset") for r in rows]
            rows = [r for r in rows if r.get("preset") == (presets[0] if presets else None)]
        cases = list(dict.fromkeys(r["suite"] for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / max(len(impls), 1)
        use_floor = all(r.get("ratio_to_floor") for r in rows)
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, case in enumerate(cases):
                for r in rows:
                    if r["suite"] == case and r["impl"] == impl:
                        xs.append(i + (j - (len(impls) - 1) / 2) * width)
                        ys.append(r["ratio_to_floor"] if use_floor else r["median_ms"])
            meds = [
                r["median_ms"]
                for case in cases
                for r in rows
                if r["suite"] == case and r["impl"] == impl
            ]
            bars = ax.bar(xs, ys, width=width, label=impl)
            ax.bar_label(bars, labels=[_fmt_ms(m) for m in meds], fontsize=6, padding=1)
        ax.set_yscale("log")
        if use_floor:
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel("time / floor (log); labels: median ms")
        else:
            ax.set_ylabel("median ms (log)")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
        title = "full optimizer step" if bench == "step" else "Newton-Schulz alone"
        if bench == "ns" and rows:
            title += f" (preset {rows[0].get('preset')})"
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    env = record["env"]
    fig.suptitle(
        f"muon_ext benchmarks: {env['device']}, torch {env['torch']}, {env['date_utc']}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- compare


def compare_records(old: dict, new: dict) -> str:
    """Row-by-row diff of two result files (matched on bench, suite, preset, impl).

    A change counts only when the p20-p80 bands do not overlap; otherwise it is noise.
    """
    lines = []
    for label, rec in (("old", old), ("new", new)):
        env = rec["env"]
        commit = str(env.get("commit", "n/a"))[:10] + (" (dirty)" if env.get("dirty") else "")
        lines.append(
            f"{label}: {env['device']} | torch {env['torch']} | {commit} | {env['date_utc']}"
        )
    if old["env"]["device"] != new["env"]["device"]:
        lines.append("WARNING: different devices: the ratios compare machines, not code")
    old_rows = {row_key(r): r for r in old["rows"]}
    new_rows = {row_key(r): r for r in new["rows"]}
    table = []
    for key in list(dict.fromkeys(list(old_rows) + list(new_rows))):
        a, b = old_rows.get(key), new_rows.get(key)
        am = a.get("median_ms") if a else None
        bm = b.get("median_ms") if b else None
        if am is None or bm is None:
            verdict = "only in old" if b is None else "only in new" if a is None else "not timed"
            change = "-"
        else:
            change = f"{(bm / am - 1) * 100:+.1f}%"
            if b["p80_ms"] is not None and a["p20_ms"] is not None and b["p80_ms"] < a["p20_ms"]:
                verdict = "faster"
            elif b["p20_ms"] is not None and a["p80_ms"] is not None and b["p20_ms"] > a["p80_ms"]:
                verdict = "slower"
            else:
                verdict = "~ (bands overlap)"
        bench, suite, preset, impl = key
        table.append(
            {
                "bench": bench or "",
                "case": suite + (f" [{preset}]" if preset else ""),
                "impl": impl,
                "old": _fmt_ms(am),
                "new": _fmt_ms(bm),
                "change": change,
                "verdict": verdict,
            }
        )
    cols = [
        ("bench", lambda r: r["bench"]),
        ("case", lambda r: r["case"]),
        ("impl", lambda r: r["impl"]),
        ("old ms", lambda r: r["old"]),
        ("new ms", lambda r: r["new"]),
        ("change", lambda r: r["change"]),
        ("verdict", lambda r: r["verdict"]),
    ]
    lines.append(_table(table, cols))
    return "\n".join(lines)

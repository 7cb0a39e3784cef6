"""What a result file records about the machine and the code it measured."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["collect_env", "device_name"]


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git(repo_dir: str) -> dict:
    commit = _run(["git", "rev-parse", "HEAD"], cwd=repo_dir)
    if commit is None:
        return {"commit": "n/a", "dirty": None}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir)
    return {"commit": commit, "dirty": bool(status)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {_cpu_model()}"


def _driver(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a"
    index = device.index if device.index is not None else torch.cuda.current_device()
    out = _run(
        ["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"]
    )
    return out.splitlines()[0].strip() if out else "unknown (nvidia-smi not found)"


def collect_env(device: torch.device) -> dict:
    import muon_ext

    pkg_dir = str(Path(muon_ext.__file__).resolve().parent)
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "driver": _driver(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "n/a",
        "muon_ext": muon_ext.__version__,
        "build_info": muon_ext.build_info(),
        **_git(pkg_dir),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_bytes": getattr(props, "L2_cache_size", None),
        }
    return env

"""``python -m muon_ext.info``: what was built, for which torch/CUDA, and what this machine has."""

from __future__ import annotations

import platform
import sys

import torch


def collect() -> dict:
    from . import __version__, build_info

    info = {
        "muon_ext": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "build": build_info(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    kernels = {}
    for op in ("muon_step_", "newton_schulz"):
        kernels[op] = [
            key for key in ("CPU", "CUDA")
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"muon_ext::{op}", key)
        ]
    info["kernels"] = kernels
    return info


def torch_mismatch_warning(built: str | None, running: str) -> str | None:
    """The warning to print when the extension was built against torch ``built`` (``"2.14.1"``)
    but torch ``running`` (``torch.__version__``, maybe ``"2.15.0+cu130"``) is imported, else None.
    The local suffix (``+cpu``, ``+cu130``) is ignored: the C++ ABI is that of the release."""
    if not built:
        return None
    if built.split("+")[0] == running.split("+")[0]:
        return None
    return (
        f"warning: muon_ext was built against torch {built} but torch {running} is running: "
        "the compiled core may fail to load or misbehave; rebuild it against this torch with "
        "`pip install --no-build-isolation .`"
    )


def main() -> None:
    info = collect()
    width = max(map(len, info))
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key:<{width}} :")
            for k, v in value.items():
                print(f"  {k:<{width}} {v}")
        else:
            print(f"{key:<{width}} : {value}")
    build = info["build"]
    if not build.get("available"):
        sys.exit(1)
    warning = torch_mismatch_warning(build.get("torch_version"), torch.__version__)
    if warning:
        print(warning, file=sys.stderr)


if __name__ == "__main__":
    main()

"""Where the figures were taken: device, driver, package versions, git commit."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

# Distribution names, first installed one wins (onnxruntime-gpu installs the `onnxruntime` module).
PACKAGES = {
    "torch": ["torch"], "onnxruntime": ["onnxruntime-gpu", "onnxruntime"], "transformers": ["transformers"],
    "fla": ["flash-linear-attention", "fla-core"], "causal_conv1d": ["causal-conv1d", "causal_conv1d"],
    "triton": ["triton"], "numpy": ["numpy"], "matplotlib": ["matplotlib"],
}


def package_versions() -> dict:
    versions = {}
    for name, dists in PACKAGES.items():
        versions[name] = None
        for dist in dists:
            try:
                versions[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def device_info(device: str) -> dict:
    if device == "cuda":
        import torch
        props = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                "driver": _nvidia_driver()}
    return {"type": "cpu", "name": cpu_name(), "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "capability": None, "cuda": None, "driver": None}


def git_commit() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def environment(device: str) -> dict:
    return {"device": device_info(device), "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": package_versions(), "git": git_commit(),
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

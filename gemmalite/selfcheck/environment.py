"""The machine under the engine: torch, CUDA, the device, bf16, and whether inductor can compile.

Figures (versions, the device, the load) are INFO. bf16 and inductor are claims, so they are
tried, not read from flags: a small bf16 matmul is checked against float32, and a small function
is compiled from scratch, caches off, and run.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
import warnings

import torch

from .report import ENVIRONMENT, FAIL, INFO, PASS, Add, error_text


def environment(device: torch.device, add: Add) -> None:
    """Every environment result, in report order."""
    add(ENVIRONMENT, "torch", INFO, f"{torch.__version__} (Python {platform.python_version()})")
    add(ENVIRONMENT, "CUDA", INFO, _cuda_text())
    add(ENVIRONMENT, "device", INFO, _device_text(device))
    check_bf16(device, add)
    check_inductor(device, add)


def _cuda_text() -> str:
    if torch.cuda.is_available():
        return f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)"
    if torch.version.cuda:
        return f"no CUDA (torch is built for CUDA {torch.version.cuda}, but no GPU is visible)"
    return "no CUDA (a CPU-only torch build)"


def _device_text(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device}: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}"
    ram = _total_ram()
    return (
        f"cpu: {_cpu_name()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"
        + (f", {ram / 2**30:.1f} GiB RAM" if ram else "")
        + _load_text()
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"


def _load_text() -> str:
    """The 1-minute load average: other work on the cores makes the speed figures unreliable."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return ""
    busy = load >= (os.cpu_count() or 1) * 0.5
    return f", load average {load:.1f}" + (" (busy: speed figures will be low and noisy)" if busy else "")


def _total_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_bf16(device: torch.device, add: Add) -> None:
    name = "bf16"
    try:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            add(ENVIRONMENT, name, FAIL, f"torch.cuda.is_bf16_supported() is False on {device}; use --dtype float32")
            return
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randn(64, 64, generator=generator).to(device) for _ in range(2))
        exact = a @ b
        got = (a.bfloat16() @ b.bfloat16()).float()
        error = ((got - exact).abs().max() / exact.abs().max()).item()
        how = "torch.cuda.is_bf16_supported() is True; " if device.type == "cuda" else ""
        if error < 2e-2:
            add(ENVIRONMENT, name, PASS, f"{how}a 64x64 bf16 matmul runs, max error {error:.1e} of the largest value")
        else:
            add(ENVIRONMENT, name, FAIL, f"{how}a 64x64 bf16 matmul is off by {error:.1e} of the largest value")
    except Exception as e:  # noqa: BLE001 - any failure here is the finding
        add(ENVIRONMENT, name, FAIL, f"a bf16 matmul failed: {error_text(e)}")


def check_inductor(device: torch.device, add: Add) -> None:
    name = "inductor + compiler"
    backend = _backend_text(device)
    probe = _fresh_probe()
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.randn(8, 8, generator=generator).to(device) for _ in range(2))
    started = time.perf_counter()
    try:
        # Caches off: the compiler must really run, not a kernel built on another day.
        with torch.compiler.config.patch(force_disable_caches=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "dynamo_pgo force disabled by ... force_disable_caches"
            got = torch.compile(probe, fullgraph=True)(x, y)
        seconds = time.perf_counter() - started
    except Exception as e:  # noqa: BLE001
        add(ENVIRONMENT, name, FAIL, f"torch.compile of a small function failed ({backend}): {error_text(e)}")
        return
    if torch.allclose(got, probe(x, y), rtol=1e-4, atol=1e-5):
        add(ENVIRONMENT, name, PASS, f"compiled (caches off) and ran a small function in {seconds:.1f} s; {backend}")
    else:
        add(ENVIRONMENT, name, FAIL, f"a compiled small function gives different results from eager; {backend}")


def _fresh_probe():
    """A new function object with its own code object, so that dynamo has nothing cached for it."""
    namespace = {"torch": torch}
    exec(
        "def probe(x, y):\n    return torch.nn.functional.gelu(x @ y + 1.0).softmax(-1) * 3.0\n",
        namespace,
    )
    return namespace["probe"]


def _backend_text(device: torch.device) -> str:
    """What inductor will compile with: the C++ compiler, and Triton on CUDA."""
    backend = f"C++ compiler {_cpp_compiler()}"
    if device.type != "cuda":
        return backend
    try:
        import triton
    except ImportError:
        return f"no Triton; {backend}"
    return f"Triton {triton.__version__}; {backend}"


def _cpp_compiler() -> str:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
    except Exception:  # noqa: BLE001 - fall back to looking on PATH
        compiler = next((c for c in ("g++", "c++", "clang++", "cc") if shutil.which(c)), None)
    if not compiler:
        return "none found"
    path = shutil.which(compiler) or compiler
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        version = out.splitlines()[0].strip() if out.strip() else ""
    except (OSError, subprocess.SubprocessError):
        version = ""
    return f"{path} ({version})" if version else path

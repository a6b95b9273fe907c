"""`gemmalite check`: prove the compiled decode path on the machine at hand.

One call, `check()`, measures instead of assuming:
- the environment (environment.py): torch and CUDA versions, the device, bf16 support, and
  whether inductor and a C++ compiler work;
- on a tiny random Gemma 3 built in memory (or on `model=` when given), with two engines that
  share one model, one eager and one compiled (engines.py): compiled tokens equal eager ones,
  graphs stay bounded, nothing breaks the graph (compiled.py), compiled prefill equals eager
  prefill with bounded graphs (prefill.py), compiled speculative verification gives plain
  decoding's tokens, its graphs listed (verify.py), and on CUDA, decode steps are
  CUDA graph replays whose kept outputs stay intact (cuda_graphs.py);
- decode speed, eager against compiled (speed.py).

Each result is a `CheckResult` (report.py). A check is a function of the engines and an `add`
callback; `ENGINE_CHECKS` lists them in the order they run. The package is named `selfcheck` so that
`gemmalite.check` stays the function.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from ..errors import InvalidArgumentError
from ..loading import parse_device, parse_dtype
from . import compiled, cuda_graphs, prefill, speed, verify
from .engines import TINY_CONFIG, Engines, loaded_engines, tiny_engines, tiny_model
from .environment import environment
from .report import CHECKS, FAIL, INFO, PASS, SKIP, Add, CheckReport, CheckResult

__all__ = [
    "ENGINE_CHECKS", "FAIL", "INFO", "PASS", "SKIP", "TINY_CONFIG", "CheckReport", "CheckResult", "check", "tiny_model",
]

# Every check on the engines, in report order. Later checks count on the calls of earlier ones:
# the graph checks on the equality checks' calls, the CUDA checks on the graphs they compiled.
ENGINE_CHECKS: tuple[Callable[[Engines, Add], None], ...] = (
    compiled.greedy_matches_eager,
    compiled.sampled_matches_eager,
    compiled.graphs_bounded,
    compiled.no_graph_breaks,
    prefill.prefill_matches_eager,
    verify.verification_matches_eager,
    cuda_graphs.decode_steps_replay,
    cuda_graphs.kept_outputs_intact,
    speed.decode_speed,
)


def check(
    device: str | torch.device | None = None,
    model: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    steps: int = 200,
    *,
    on_result: Callable[[CheckResult], None] | None = None,
) -> CheckReport:
    """Run every check on `device` (default: cuda when available) and return the report.

    `model` (a checkpoint dir, .gguf or Hub id) replaces the tiny random model. `dtype` defaults
    to float32: the equality checks compare exact arithmetic. `on_result` sees each result as
    it is produced.
    """
    dev = parse_device(device)
    dt = torch.float32 if dtype is None else parse_dtype(dtype)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"steps must be an integer >= 1, got {steps!r}")
    started = time.perf_counter()
    report = CheckReport()

    def add(section: str, name: str, status: str, detail: str) -> None:
        result = CheckResult(section, name, status, detail)
        report.results.append(result)
        if on_result is not None:
            on_result(result)

    environment(dev, add)
    max_seq_len = max(steps, speed.SPEED_STEPS + 1) + 128
    if model is None:
        engines = tiny_engines(dev, dt, steps, max_seq_len)
    else:
        engines = loaded_engines(model, dev, dt, steps, max_seq_len)
    what = f"{engines.what}, {str(dt).removeprefix('torch.')} on {dev}"
    add(CHECKS, "model", INFO, f"{what}; one eager and one compiled engine")
    for one_check in ENGINE_CHECKS:
        one_check(engines, add)
    report.seconds = time.perf_counter() - started
    return report

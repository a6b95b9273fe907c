"""On CUDA: decode steps are CUDA graph replays, and graph outputs kept across steps stay intact.

Replays are counted with torch.profiler. A CUDA graph writes its outputs into the same memory on
every replay, so tokens that are held for many steps before being read would be overwritten if
the runner did not copy them out; the second check holds them and compares with eager.
Both are SKIP without CUDA.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..engine import Engine
from ..options import GenerationOptions
from .compiled import compare_tokens
from .engines import Engines
from .report import CHECKS, FAIL, NO_CUDA, PASS, SKIP, Add, error_text

REPLAY_TOKENS = 17  # 16 decode steps after the token that prefill chooses
KEPT_BLOCK = 32  # steps whose graph outputs are held before they are read

_GRAPH_LAUNCH = ("cudaGraphLaunch", "cuGraphLaunch")
# Runtime and driver API names as the profiler records them (prefixes: cudaLaunchKernelExC, cuLaunchKernelEx).
_KERNEL_LAUNCH = ("cudaLaunchKernel", "__cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel")


def decode_steps_replay(engines: Engines, add: Add) -> None:
    name = "CUDA graph replays"
    if engines.compiled.device.type != "cuda":
        add(CHECKS, name, SKIP, NO_CUDA)
        return
    prompt, n = engines.greedy_prompt, REPLAY_TOKENS
    try:
        engines.compiled.generate_ids([prompt], max_new_tokens=n, ignore_eos=True)  # graphs recorded already; warm anyway
        graph_launches, compiled_kernels = _launches(engines.compiled, prompt, n)
        _, eager_kernels = _launches(engines.eager, prompt, n)
    except Exception as e:  # noqa: BLE001
        add(CHECKS, name, FAIL, f"profiling the decode steps failed: {error_text(e)}")
        return
    steps = n - 1
    detail = (
        f"{graph_launches} cudaGraphLaunch for {steps} decode steps (torch.profiler); single kernel launches, "
        f"prefill included: {compiled_kernels} compiled vs {eager_kernels} eager"
    )
    add(CHECKS, name, PASS if graph_launches >= steps else FAIL, detail)


def _launches(engine: Engine, prompt: list[int], n: int) -> tuple[int, int]:
    """(CUDA graph launches, single kernel launches) the profiler records over one generation."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate_ids([prompt], max_new_tokens=n, ignore_eos=True)
        torch.cuda.synchronize()
    names = Counter(event.name for event in prof.events())
    graphs = sum(count for name, count in names.items() if name.startswith(_GRAPH_LAUNCH))
    kernels = sum(count for name, count in names.items() if name.startswith(_KERNEL_LAUNCH))
    return graphs, kernels


def kept_outputs_intact(engines: Engines, add: Add) -> None:
    """Hold every step's tokens for KEPT_BLOCK steps (many replays) before reading them; compare to eager."""
    name = "kept graph outputs intact"
    if engines.compiled.device.type != "cuda":
        add(CHECKS, name, SKIP, NO_CUDA)
        return
    expected = engines.eager_greedy()
    if expected is None:
        add(CHECKS, name, FAIL, "no eager tokens to compare with")
        return
    options = GenerationOptions(max_new_tokens=engines.steps, ignore_eos=True)
    try:
        got = []
        for (piece,) in engines.compiled.token_steps([engines.greedy_prompt], options, sync_every=KEPT_BLOCK):
            got.extend(piece)
    except Exception as e:  # noqa: BLE001
        add(CHECKS, name, FAIL, f"compiled generation raised {error_text(e)}")
        return
    same, detail = compare_tokens(expected, got)
    add(
        CHECKS,
        name,
        PASS if same else FAIL,
        f"{detail} equal eager when each step's output is read only after up to {KEPT_BLOCK - 1} later replays",
    )

"""Checks that compiled prefill computes what eager prefill does, with a bounded number of graphs.

Prompts of several lengths (one token, a partial chunk, several chunks) are prefilled on fresh
caches by both engines; their last logits must agree, and the compiled engine must hold at most
one prefill graph per (span, chunk bucket) it has run (prompts are padded to a few fixed lengths).
"""

from __future__ import annotations

import torch

from .engines import Engines, random_prompt
from .report import CHECKS, FAIL, PASS, Add, error_text

PROMPT_LENGTHS = (1, 5, 23, 70)


def prefill_matches_eager(engines: Engines, add: Add) -> None:
    name = "compiled prefill == eager"
    eager, compiled = engines.eager, engines.compiled
    worst = 0.0
    try:
        for seed, length in enumerate(PROMPT_LENGTHS):
            prompt = random_prompt(eager, length, seed=100 + seed)
            expected = eager.runner.prefill(eager.runner.new_cache(1), [prompt])
            got = compiled.runner.prefill(compiled.runner.new_cache(1), [prompt])
            worst = max(worst, (got - expected).abs().max().item() / expected.abs().max().item())
    except Exception as e:  # noqa: BLE001 - reported as a failure, not a crash
        add(CHECKS, name, FAIL, f"prefill raised {error_text(e)}")
        return
    # Every prefill so far, this check's and earlier ones': one graph per (span, chunk bucket) at most.
    shapes = compiled.runner.compiled_shapes("prefill")
    buckets = {shape[1] for _, shape in shapes}
    graphs = compiled.runner.graph_count("prefill")
    tolerance = 1e-4 if compiled.dtype == torch.float32 else 2e-2
    problems = []
    if worst > tolerance:
        problems.append(f"last logits differ by {worst:.1e} of their largest value (tolerance {tolerance:.0e})")
    if graphs > len(shapes):
        problems.append(f"{graphs} prefill graphs for {len(shapes)} chunk shape(s): prefill recompiled")
    detail = (
        f"prompts of {'/'.join(map(str, PROMPT_LENGTHS))} tokens: last logits within {worst:.1e} of eager's "
        f"largest value; {graphs} prefill graph(s) for chunk lengths {sorted(buckets)}; global layers attend over "
        f"one of {compiled.runner.new_cache(1).spans()} slots (a graph each, per mode and batch size, when reached)"
    )
    add(CHECKS, name, FAIL if problems else PASS, "; ".join(problems + [detail]))

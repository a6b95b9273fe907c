"""Checks that the compiled decode step computes what eager does, and compiles only what it should.

They run in this order, on one pair of engines, and each counts on the calls before it:
  a. compiled greedy tokens equal eager ones for `steps` steps, past several ring wraps (and
     seeded sampling gives the same tokens too);
  b. the number of graphs compiled for `decode_step` stays bounded (one greedy and one sampling
     graph per batch size) over those calls with different prompt lengths and sampling settings,
     and does not grow over further steps (run under torch's `fail_on_recompile` stance);
  c. no call so far broke the graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .engines import GREEDY_PROMPT_LENGTH, Engines, random_prompt
from .report import CHECKS, FAIL, PASS, Add, error_text

# (prompt length, sampling settings, new tokens), after the greedy call of check a.
SAMPLED_CALLS = [
    (17, dict(temperature=0.7, seed=1), 32),
    (40, dict(temperature=1.2, top_k=20, top_p=0.9, seed=2), 32),
]
# Run once every graph exists, under fail_on_recompile: neither may compile anything.
REPEAT_GREEDY = (9, 64)  # (prompt length, new tokens)
REPEAT_SAMPLED = (33, dict(temperature=1.0, top_k=5, min_p=0.05, seed=3), 32)


def greedy_matches_eager(engines: Engines, add: Add) -> None:
    name = "compiled == eager greedy"
    expected = engines.eager_greedy()
    got = engines.try_generate(engines.compiled, engines.greedy_prompt, engines.steps)
    if expected is None or got is None:
        add(CHECKS, name, FAIL, engines.errors[-1])
        return
    compiled = engines.compiled
    window = min(compiled.config.sliding_window, compiled.max_seq_len)  # a ring is never longer than the context
    held = compiled.last_stats.prompt_tokens[0] + len(got) - 1  # the last token is never fed
    wraps = max(held - 1, 0) // window
    same, detail = compare_tokens(expected, got)
    detail += f", {wraps} ring wraps (window {window}, {held} positions), {len(set(expected))} distinct tokens"
    if not same:
        detail += _divergence_note(engines, expected, got)
    add(CHECKS, name, PASS if same else FAIL, detail)


def sampled_matches_eager(engines: Engines, add: Add) -> None:
    ok, details = True, []
    for seed, (length, settings, n) in enumerate(SAMPLED_CALLS, start=1):
        prompt = random_prompt(engines.eager, length, seed=seed)
        want = engines.try_generate(engines.eager, prompt, n, **settings)
        have = engines.try_generate(engines.compiled, prompt, n, **settings)
        if want is None or have is None:
            ok = False
            details.append(engines.errors[-1])
            continue
        same, detail = compare_tokens(want, have)
        ok &= same
        details.append(f"{' '.join(f'{k}={v}' for k, v in settings.items())}: {detail}")
    add(CHECKS, "compiled == eager sampled (seeded)", PASS if ok else FAIL, "; ".join(details))


def graphs_bounded(engines: Engines, add: Add) -> None:
    """After the greedy and sampling calls above, more steps and settings must compile nothing."""
    graphs_after = engines.compiled.graph_count()
    repeat_error = _repeat_without_recompiling(engines)
    graphs_final = engines.compiled.graph_count()
    new_graphs = graphs_after - engines.graphs_at_start
    limit = torch._dynamo.config.recompile_limit
    lengths = "/".join(str(n) for n in (GREEDY_PROMPT_LENGTH, *(c[0] for c in SAMPLED_CALLS)))
    detail = (
        f"{new_graphs} new decode_step graph(s) over 3 calls (greedy + 2 sampling, prompts of {lengths} tokens), "
        f"{graphs_final - graphs_after} more over 2 further calls ({REPEAT_GREEDY[1] + REPEAT_SAMPLED[2]} steps, prompts of "
        f"{REPEAT_GREEDY[0]}/{REPEAT_SAMPLED[0]} tokens) under fail_on_recompile; "
        f"{graphs_final} held by this engine (recompile limit {limit}); "
        f"dynamo compiled {engines.dynamo_growth('stats', 'unique_graphs')} graph(s) in all"
    )
    problems = []
    if new_graphs > 3:
        problems.append(
            f"expected at most 3 graphs for batch size 1 (greedy, temperature-only and top-k sampling), got {new_graphs}"
        )
    if graphs_final != graphs_after or repeat_error:
        problems.append(f"graphs grew or recompiled on repeat calls: {repeat_error or graphs_final - graphs_after}")
    if graphs_final >= limit:
        problems.append(f"decode_step reached dynamo's recompile limit ({limit}): later shapes would run eagerly")
    if graphs_final == 0:
        problems.append("no compiled graph exists for decode_step: nothing ran compiled")
    add(CHECKS, "compiled graphs bounded", FAIL if problems else PASS, "; ".join(problems + [detail]))


def _repeat_without_recompiling(engines: Engines) -> str | None:
    """A greedy and a sampling call with new prompt lengths and settings; the error if they recompiled."""
    with torch.compiler.set_stance("fail_on_recompile"):
        try:
            length, n = REPEAT_GREEDY
            engines.generate(engines.compiled, random_prompt(engines.eager, length, seed=9), n)
            length, settings, n = REPEAT_SAMPLED
            engines.generate(engines.compiled, random_prompt(engines.eager, length, seed=10), n, **settings)
        except Exception as e:  # noqa: BLE001
            return error_text(e)
    return None


def no_graph_breaks(engines: Engines, add: Add) -> None:
    breaks = engines.dynamo_growth("graph_break")
    errors = engines.errors
    add(
        CHECKS,
        "graph breaks",
        PASS if breaks == 0 and not errors else FAIL,
        f"{breaks} graph break(s) over {engines.compiled_calls} compiled calls (torch._dynamo counters['graph_break'])"
        + (f"; {errors[0]}" if errors else ""),
    )


def compare_tokens(expected: Sequence[int], got: Sequence[int]) -> tuple[bool, str]:
    """(equal, what to report): the count that agrees, and the first difference if any."""
    at = _first_difference(expected, got)
    if at is None:
        return True, f"{len(got)}/{len(expected)} tokens"
    same = sum(x == y for x, y in zip(expected, got))
    return False, (
        f"{same}/{len(expected)} tokens equal; first difference at token {at}: "
        f"eager {expected[at] if at < len(expected) else 'nothing'}, compiled {got[at] if at < len(got) else 'nothing'}"
    )


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _divergence_note(engines: Engines, expected: list[int], got: list[int]) -> str:
    """How close eager's own choice was where the paths part: a near-tie is what rounding can flip."""
    eager = engines.eager
    at = _first_difference(expected, got)
    if at is None or at >= min(len(expected), len(got)):
        return ""
    try:
        logits = eager.logits(torch.tensor([engines.greedy_prompt + expected[:at]]))[0, -1]
    except Exception:  # noqa: BLE001 - the note is a bonus; the failure stands without it
        return ""
    gap = abs((logits[expected[at]] - logits[got[at]]).item())
    spread = (logits.max() - logits.min()).item()
    note = f"; at token {at} the two choices' logits (eager, no cache) differ by {gap:.3g}, of a spread of {spread:.3g}"
    if eager.dtype != torch.float32:
        note += f"; in {str(eager.dtype).removeprefix('torch.')} fused kernels round differently, so a near-tie can flip: use float32 for an exact check"
    return note

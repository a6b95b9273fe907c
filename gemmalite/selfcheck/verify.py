"""Check that compiled speculative verification gives plain eager decoding's tokens, with its
graphs listed and bounded.

A prompt that repeats itself is decoded by the compiled engine with prompt lookup (so drafts are
proposed and verified in chunks of 1 + k tokens) and by the eager engine plainly; the tokens must
be equal, and the compiled engine must hold one verification graph per (batch size, width, span)
it ran. The graphs are listed, as `gemmalite check` lists every compiled shape it relies on.
"""

from __future__ import annotations

from ..runner import describe_graph
from .engines import Engines, random_prompt
from .report import CHECKS, FAIL, PASS, Add, error_text

NEW_TOKENS = 24


def verification_matches_eager(engines: Engines, add: Add) -> None:
    name = "compiled speculative verification == eager plain decoding"
    eager, compiled = engines.eager, engines.compiled
    piece = random_prompt(eager, 12, seed=300)
    prompt = piece + piece[1:] + piece[1:]  # repeats: lookup has something to draft
    try:
        expected = eager.generate_ids([prompt], max_new_tokens=NEW_TOKENS, ignore_eos=True, speculative="off")
        got = compiled.generate_ids([prompt], max_new_tokens=NEW_TOKENS, ignore_eos=True, speculative="lookup")
        stats = compiled.last_stats
    except Exception as e:  # noqa: BLE001 - reported as a failure, not a crash
        add(CHECKS, name, FAIL, f"speculative decoding raised {error_text(e)}")
        return
    shapes = compiled.runner.compiled_shapes("verify")
    graphs = compiled.runner.graph_count("verify")
    problems = []
    if got != expected:
        first = next(i for i, (a, b) in enumerate(zip(got[0], expected[0])) if a != b)
        problems.append(f"tokens part from plain decoding's at token {first}")
    if not shapes:
        problems.append("no verification chunk ran compiled (no draft was proposed)")
    if graphs > len(shapes):
        problems.append(f"{graphs} verification graphs for {len(shapes)} shape(s): verification recompiled")
    listed = "; ".join(describe_graph(key, shape) for key, shape in shapes) or "none"
    detail = (
        f"{NEW_TOKENS} greedy tokens with prompt lookup equal plain eager decoding's; "
        f"{sum(stats.accepted_tokens)} of {sum(stats.draft_tokens)} drafts accepted; {graphs} graph(s): {listed}"
    )
    add(CHECKS, name, FAIL if problems else PASS, "; ".join(problems + [detail]))

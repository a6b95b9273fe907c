"""Decode speed at batch 1, eager against compiled: figures (INFO), not pass/fail claims."""

from __future__ import annotations

from .engines import Engines, random_prompt
from .report import FAIL, INFO, SPEED, Add, error_text

SPEED_STEPS = 100


def decode_speed(engines: Engines, add: Add) -> None:
    prompt = random_prompt(engines.eager, 5 if engines.tiny else 64, seed=11)
    figures = {}
    for label, engine in (("eager", engines.eager), ("compiled", engines.compiled)):
        try:
            engine.generate_ids([prompt], max_new_tokens=8, ignore_eos=True)  # warm-up
            engine.generate_ids([prompt], max_new_tokens=SPEED_STEPS + 1, ignore_eos=True)
        except Exception as e:  # noqa: BLE001
            add(SPEED, f"decode {label}", FAIL, f"generation raised {error_text(e)}")
            continue
        stats = engine.last_stats
        figures[label] = stats.decode_tokens_per_s
        detail = f"{stats.decode_tokens_per_s:.1f} tok/s at batch 1 over {SPEED_STEPS} steps"
        if not engines.tiny:
            detail += f"; time to first token {stats.prefill_s * 1000:.0f} ms for a {len(prompt)}-token prompt"
        if label == "compiled" and figures.get("eager"):
            detail += f" ({figures['compiled'] / figures['eager']:.1f}x eager)"
        add(SPEED, f"decode {label}", INFO, detail)

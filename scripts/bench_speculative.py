#!/usr/bin/env python
"""Speculative decoding on the real Gemma 3 270M: tok/s and acceptance against plain decoding.

    python scripts/bench_speculative.py                 # the bundled 270M GGUF, bf16, CPU eager
    python scripts/bench_speculative.py --new-tokens 64 --json out.json

One process, one run of each, side by side: for every task, plain greedy decoding, prompt
lookup, and the int8 270M drafting for the bf16 270M, with its head shortlisted (the default for
a draft, see gemmalite/shortlist.py) and whole; for the code edit also prediction= (the
original code). Each speculative output is compared with plain decoding's, token for token: in
bfloat16 a verification chunk can round differently from single steps, so the table says how
often (and where) they part.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemmalite  # noqa: E402

CODE = '''def moving_average(values, window):
    """The average of each run of `window` values."""
    averages = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        if index >= window - 1:
            averages.append(total / window)
    return averages


def normalise(values):
    """Scale values into [0, 1]."""
    low, high = min(values), max(values)
    return [(value - low) / (high - low) for value in values]
'''

DOCUMENT = (
    "The harbour of Port Ellery was built in 1862 to ship granite from the quarries inland. "
    "By 1900 it handled forty ships a month, most of them bound for London and Rotterdam. "
    "The quarries closed in 1931, and the harbour turned to fishing; the old granite sheds became "
    "a market. In 1978 the town council restored the lighthouse, which now houses a small museum "
    "of quarry tools, ship models and photographs of the harbour in its busiest years."
)

TASKS = {
    # Input-grounded: the reply copies long runs of the prompt.
    "code edit": f"{CODE}\n# The same code, with `values` renamed to `samples`:\n\n",
    "quote summary": f"Article:\n{DOCUMENT}\n\nThe article's key sentences, quoted exactly:\n1. \"",
    "re-sent document": f"{DOCUMENT}\n\nHere is the same text again, word for word:\n\n",
    # Open-ended: little to look up.
    "open-ended": "Once upon a time, in a village at the edge of a great forest, there lived",
}


def run(engine, prompt: str, new_tokens: int, **options) -> dict:
    done = engine.complete(prompt, max_new_tokens=new_tokens, ignore_eos=True, **options)
    stats = engine.last_stats
    shown = {k: (v if k != "prediction" else "...") for k, v in options.items()}
    print(f"  {shown}: {stats.decode_tokens_per_s:.1f} tok/s, acceptance {stats.acceptance_rate}", file=sys.stderr, flush=True)
    return {
        "tokens": done.token_ids,
        "tok_s": stats.decode_tokens_per_s,
        "acceptance": stats.acceptance_rate,
        "drafted": sum(stats.draft_tokens),
        "accepted": sum(stats.accepted_tokens),
        "usage": {"accepted_prediction_tokens": done.usage.accepted_prediction_tokens,
                  "rejected_prediction_tokens": done.usage.rejected_prediction_tokens},
    }


def prepare(targets, drafts, k: dict) -> None:
    """Run each mode briefly, so that the engines want their graphs, and build them here."""
    from gemmalite.builder import build

    for target in targets:
        for options in (dict(speculative="off"), dict(speculative="lookup", **k), dict(speculative="draft", **k),
                        dict(prediction=CODE, **k)):  # fmt: skip
            target.complete(TASKS["code edit"], max_new_tokens=16, ignore_eos=True, **options)  # a few rounds: the draft's catch-up too
    for draft in drafts:
        draft.complete(TASKS["code edit"], max_new_tokens=4, ignore_eos=True)
    for engine in (*targets, *drafts):
        packages = engine.runner.packages
        for graph in sorted(packages.wanted, key=str):
            if (packages.root / f"{packages.name(graph)}.pt2").exists():
                continue  # built for another engine on the same model (the two targets share theirs)
            started = time.perf_counter()
            build(engine.runner, graph, packages.root)
            print(f"built {graph.describe()} for {engine.dtype}{' int8' if engine in drafts else ''} in "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        packages.wanted.clear()


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir or .gguf (default: the bundled 270M GGUF)")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--draft-tokens", type=int, default=None, help="num_draft_tokens (default: each drafter's)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), help="which tasks (default: all)")
    parser.add_argument("--no-int8-alone", action="store_true", help="skip the int8 model decoding alone")
    parser.add_argument("--compile", default="cached", choices=["cached", "eager"],
                        help="cached: the CPU default, from the compile cache (see --prepare); eager: none")
    parser.add_argument("--prepare", action="store_true",
                        help="build the compile cache's packages every mode needs (minutes, once), then exit")
    args = parser.parse_args(argv)

    source = args.model
    if source is None:
        from gemmalite.gguf import default_gguf_path

        source = default_gguf_path()
    compile = "cached" if args.compile == "cached" else False
    from gemmalite.shortlist import DEFAULT_SHORTLIST

    whole = gemmalite.load(source, quantize="int8", compile=compile)  # drafts with its whole head, and decodes alone
    shortlisted = gemmalite.load(source, quantize="int8", compile=compile, shortlist=DEFAULT_SHORTLIST)
    target = gemmalite.load(source, draft=shortlisted, compile=compile)  # bf16 and the compile cache: the CPU defaults
    target_whole = gemmalite.Engine(
        target.model, target.tokenizer, device=target.device, dtype=target.dtype, compile=target.compile,
        max_seq_len=target.max_seq_len, defaults=target.defaults, eos_ids=target.eos_ids, draft=whole,
    )  # the same target model and graphs, drafted for by the whole head
    k = {} if args.draft_tokens is None else {"num_draft_tokens": args.draft_tokens}
    if args.prepare:
        return prepare([target, target_whole], [whole, shortlisted], k)
    for engine in (target, target_whole, whole, shortlisted):
        engine.complete("warm up", max_new_tokens=4)

    rows = []
    for task in args.tasks:
        prompt = TASKS[task]
        plain = run(target, prompt, args.new_tokens, speculative="off")
        modes = {"lookup": (target, dict(speculative="lookup", **k)),
                 "int8 draft, shortlisted head": (target, dict(speculative="draft", **k)),
                 "int8 draft, whole head": (target_whole, dict(speculative="draft", **k))}  # fmt: skip
        if task == "code edit":
            modes["prediction"] = (target, dict(prediction=CODE.replace("values", "samples"), **k))
        rows.append({"task": task, "mode": "plain", **plain, "speedup": 1.0, "differs_at": None})
        for mode, (engine, options) in modes.items():
            out = run(engine, prompt, args.new_tokens, **options)
            out["speedup"] = out["tok_s"] / plain["tok_s"] if plain["tok_s"] else None
            out["differs_at"] = first_difference(out["tokens"], plain["tokens"])
            rows.append({"task": task, "mode": mode, **out})
            print(f"{task} / {mode}: {out['speedup']:.2f}x of plain, differs at {out['differs_at']}", file=sys.stderr, flush=True)
        if args.no_int8_alone:
            continue
        int8_plain = run(whole, prompt, args.new_tokens, speculative="off")
        rows.append({"task": task, "mode": "int8 alone (for scale)", **int8_plain, "speedup": int8_plain["tok_s"] / plain["tok_s"],
                     "differs_at": first_difference(int8_plain["tokens"], plain["tokens"])})

    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
          f"bf16 target, {args.new_tokens} new tokens, greedy\n")
    print("| task | mode | decode tok/s | vs plain | acceptance | same tokens as plain |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.0%} ({r['accepted']}/{r['drafted']})"
        same = "" if r["mode"] == "plain" else ("yes" if r["differs_at"] is None else f"no, from token {r['differs_at']}")
        pred = r["usage"]["accepted_prediction_tokens"]
        extra = f"; prediction {pred} accepted, {r['usage']['rejected_prediction_tokens']} rejected" if pred is not None else ""
        print(f"| {r['task']} | {r['mode']} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {acc}{extra} | {same} |")
    speculative = [r for r in rows if r["mode"] not in ("plain", "int8 alone (for scale)")]
    differ = [r for r in speculative if r["differs_at"] is not None]
    print(f"\nbf16: {len(differ)} of {len(speculative)} speculative outputs differ from plain decoding")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

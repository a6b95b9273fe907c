#!/usr/bin/env python
"""Does a repetition penalty keep the CLI's first reply out of a loop? Sampled replies, counted.

    python scripts/repetition_trial.py [--model PATH] [--seeds 1,2,3] [--tokens 160]

For each penalty setting and seed, the README's prompt is completed with the CLI's sampling
defaults (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05), and the reply's most repeated
8-token sequence is counted: a reply stuck in a loop repeats one many times.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemmalite  # noqa: E402

PROMPT = "The three primary colours are"
SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)
SETTINGS = [(1.0, -1), (1.1, 64), (1.1, -1), (1.2, 64)]  # (repetition_penalty, repeat_last_n)


def most_repeated(ids: list[int], n: int = 8) -> int:
    grams = collections.Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    return max(grams.values(), default=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint dir or .gguf (default: the bundled 270M)")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--tokens", type=int, default=160)
    args = p.parse_args()
    if args.model is None:
        from gemmalite.gguf import default_gguf_path

        args.model = default_gguf_path()
    engine = gemmalite.load(args.model, max_seq_len=1024)
    print("| repetition_penalty | repeat_last_n | seed | tokens | finish | most repeated 8-gram |")
    print("|---|---|---|---|---|---|")
    for penalty, last_n in SETTINGS:
        for seed in map(int, args.seeds.split(",")):
            reply = engine.complete(
                PROMPT, max_new_tokens=args.tokens, seed=seed, repetition_penalty=penalty, repeat_last_n=last_n, **SAMPLING
            )
            ids = reply.token_ids
            print(f"| {penalty} | {last_n} | {seed} | {len(ids)} | {reply.finish_reason} | {most_repeated(ids)} |", flush=True)


if __name__ == "__main__":
    main()

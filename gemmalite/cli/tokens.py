"""--logprobs and --json: each new token, its log-probability and the likeliest alternatives.

A token is shown as the text it decodes to alone; tokens that decode to nothing or to half a
character (<eos>, <end_of_turn>, byte pieces such as <0xE2>) are shown as their piece. One record
per token, as a dict:

    {"token": " fox", "id": 1234, "logprob": -0.0213,
     "top": [{"token": " fox", "id": 1234, "logprob": -0.0213}, {"token": " dog", ...}]}

"logprob" and "top" are there only when --logprobs is given; "top" holds N entries, most likely
first, and may or may not include the chosen token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import TextIO


def token_text(engine, token_id: int) -> str:
    text = engine.tokenizer.decode([token_id])
    return text if text and "\ufffd" not in text else engine.tokenizer.sp.id_to_piece(token_id)


def token_records(engine, chunk) -> Iterator[dict]:
    """One record per new token of a CompletionChunk."""
    for i, token_id in enumerate(chunk.token_ids):
        record = {"token": token_text(engine, token_id), "id": token_id}
        if chunk.logprobs is not None:
            record["logprob"] = chunk.logprobs[i]
            top = chunk.top_logprobs[i] if chunk.top_logprobs is not None else []
            record["top"] = [{"token": token_text(engine, t), "id": t, "logprob": lp} for t, lp in top]
        yield record


def json_line(record: dict) -> str:
    """One line of JSON; a log-probability of -inf (a token no sampler could pick) is null."""
    return json.dumps(_finite(record)) + "\n"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class TokenTable:
    """The records as an aligned table for people: step, id, log-probability, token, alternatives.

    Tokens are written as JSON strings, so that spaces and newlines can be seen.
    """

    def __init__(self, top: int):
        self.top = top
        self.rows: list[dict] = []

    def extend(self, records) -> None:
        self.rows.extend(records)

    def write(self, out: TextIO) -> None:
        width = min(max([len(_quoted(r["token"])) for r in self.rows] + [5]), 24)
        header = f"{'step':>5} {'id':>7} {'logprob':>9}  {'token':<{width}}"
        # A blank line first: when stdout and stderr share a terminal or file, the text may not end on one.
        out.write("\n" + (header + (f"  top {self.top}" if self.top else "")).rstrip() + "\n")
        for step, r in enumerate(self.rows):
            alternatives = "  ".join(f"{_quoted(t['token'])} {t['logprob']:.4f}" for t in r["top"])
            line = f"{step:>5} {r['id']:>7} {r['logprob']:>9.4f}  {_quoted(r['token']):<{width}}  {alternatives}"
            out.write(line.rstrip() + "\n")
        out.flush()


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)

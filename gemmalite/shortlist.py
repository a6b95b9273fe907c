"""A draft model's shortlisted head: logits for the tokens a reply is likely to use, -inf for the rest.

Gemma's tied output head scores 262144 tokens: in the 270M it is 63% of the weights, and most of
an int8 draft step (262144 x 640 as int8 took 6.0 ms a row on the AVX-512 CPU of
docs/benchmarks.md, against 0.34 ms for 32768 rows). A draft only proposes, and verification
keeps only what the target itself chooses, so the draft may score fewer tokens: its steps get
cheaper and the output cannot change. Only how often drafts are accepted depends on the choice.
(FR-Spec, Zhao et al. 2025, arXiv 2502.14856, shortlists a draft's vocabulary by frequency.)

Which tokens, with no corpus at hand: SentencePiece's order. A BPE vocabulary lists its merged
pieces in the order they were learned, most frequent pairs first, and its single characters,
after them, by frequency. The shortlist takes the control tokens (<eos>, <end_of_turn>), the
most frequent characters, then the earliest merges. On top, `SPARE` rows hold the tokens of the
transcripts being drafted for that the list lacks (names, rare words of a document being
quoted), refreshed as the drafter feeds its cache (`include`), so copying from the prompt stays
possible. The rows keep the engine's own form of the head (int8 rows when quantized), so a
token's logit is the one the whole head would give it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError

DEFAULT_SHORTLIST = 32768  # the tokens a draft model scores, of Gemma's 262144 (measured: docs/benchmarks.md)
SPARE = 1024  # of those, rows for the transcript's own tokens (at most a quarter of the list)
CHARACTERS = 1024  # of those, the most frequent single characters


def frequent_tokens(sp, count: int) -> list[int]:
    """`count` token ids, the likeliest first by the SentencePiece model `sp`'s own order."""
    n = sp.get_piece_size()
    controls = [i for i in range(n) if sp.is_control(i)]
    characters, merges = [], []
    for i in range(n):
        if sp.is_unused(i) or sp.is_control(i) or sp.is_byte(i):
            continue
        (characters if len(sp.id_to_piece(i)) == 1 else merges).append(i)
    ordered = controls + characters[:CHARACTERS] + merges + characters[CHARACTERS:]
    return ordered[:count]


class ShortlistHead(nn.Module):
    """The output head for a shortlist of token ids: [..., hidden] -> [..., vocab], -inf off the list."""

    def __init__(self, weight: torch.Tensor, ids: list[int], spare: int, int8: bool):
        super().__init__()
        self.vocab = weight.shape[0]
        self.source = weight  # the float rows, to fill spare rows from (the embedding's own, not a copy)
        self.int8 = int8
        ids = torch.tensor(ids + [ids[0]] * spare, dtype=torch.long, device=weight.device)  # spares: a repeat until used
        self.register_buffer("ids", ids, persistent=False)
        if int8:
            from .quantize import Int8Linear

            self.rows = Int8Linear(weight[ids])
        else:
            self.register_buffer("plain", weight[ids].clone(), persistent=False)
        self.fixed = len(ids) - spare
        self.listed = set(ids.tolist())
        self.next_spare = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.rows(x) if self.int8 else F.linear(x, self.plain)
        logits = torch.full((*x.shape[:-1], self.vocab), float("-inf"), dtype=scores.dtype, device=x.device)
        return logits.index_copy_(-1, self.ids, scores)  # a spare's repeat writes the same score twice

    def include(self, tokens: Iterable[int]) -> None:
        """Give tokens off the list a spare row each (the oldest spare goes first when all are taken)."""
        spare = len(self.ids) - self.fixed
        new = [t for t in dict.fromkeys(tokens) if t not in self.listed and 0 <= t < self.vocab][-spare:] if spare else []
        for token in new:
            slot = self.fixed + self.next_spare
            self.next_spare = (self.next_spare + 1) % spare
            self.listed.discard(int(self.ids[slot]))
            self.listed.add(token)
            self.ids[slot] = token
            if self.int8:
                from .quantize import int8_rows

                rows, scales = int8_rows(self.source[token : token + 1])
                self.rows.rows[slot] = rows[0]
                self.rows.scales[slot] = scales[0].to(self.rows.scales.dtype)
            else:
                self.plain[slot] = self.source[token]
        self.listed.add(int(self.ids[0]))


def shortlist_head(model: nn.Module, tokenizer, count: int) -> ShortlistHead | None:
    """Give `model` (a draft's) a head over `count` tokens, in place; returns the head (None: the
    vocabulary is no larger, so the whole head stays)."""
    from .packing import TiedEmbeddingWithHead
    from .quantize import Int8Linear

    vocab = model.config.vocab_size
    if isinstance(count, bool) or not isinstance(count, int) or count < 4:
        raise InvalidArgumentError(f"shortlist must be an integer >= 4 (or None for the whole head), got {count!r}")
    if count >= vocab:
        return None  # the whole head already scores no more than that
    if tokenizer is None:
        raise InvalidArgumentError(
            "shortlist= needs the checkpoint's tokenizer, to rank its tokens; load this draft with shortlist=None"
        )
    embedding = model.embed_tokens
    int8 = isinstance(getattr(embedding, "head", None), Int8Linear)
    spare = min(SPARE, count // 4)
    head = ShortlistHead(embedding.weight, frequent_tokens(tokenizer.sp, count - spare), spare, int8)
    model.embed_tokens = TiedEmbeddingWithHead(embedding.weight, head)
    return head

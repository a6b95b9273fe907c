"""A draft model's shortlisted head: logits for the tokens a reply is likely to use, -inf for the rest.

Gemma's tied output head scores 262144 tokens: in the 270M it is 63% of the weights, and most of
an int8 draft step (262144 x 640 as int8 took 6.0 ms a row on the AVX-512 CPU of
docs/benchmarks.md, against 0.34 ms for 32768 rows). A draft only proposes, and verification
keeps only what the target itself chooses, so the draft may score fewer tokens: its steps get
cheaper and the output cannot change. Only how often drafts are accepted depends on the choice.
(FR-Spec, Zhao et al. 2025, arXiv 2502.14856, shortlists a draft's vocabulary by frequency.)

Which tokens, with no corpus at hand: SentencePiece's order. A BPE vocabulary lists its merged
pieces in the order they were learned, most frequent pairs first, and its single characters
after them (in Gemma's, the newline, "." and "," among the first of those). The shortlist takes the control tokens (<eos>, <end_of_turn>), the
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
from .packing import TiedEmbeddingWithHead
from .quantize import Int8Linear

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
    """The output head for a shortlist of token ids: [..., hidden] -> [..., vocab], -inf off the list.

    `rows` scores the listed tokens: an Int8Linear of their int8 rows, or their float rows."""

    def __init__(self, weight: torch.Tensor, ids: list[int], spare: int, int8: bool):
        super().__init__()
        self.vocab = weight.shape[0]
        self.source = weight  # the float rows, to fill spare rows from (the embedding's own, not a copy)
        ids = torch.tensor(ids + [ids[0]] * spare, dtype=torch.long, device=weight.device)  # spares: a repeat until used
        self.register_buffer("ids", ids, persistent=False)
        self.rows = Int8Linear(weight[ids]) if int8 else None
        self.register_buffer("plain", None if int8 else weight[ids].clone(), persistent=False)
        self.fixed = len(ids) - spare
        self.spares: list[int | None] = [None] * spare  # the transcript token each spare row holds
        self.listed = set(ids[: self.fixed].tolist())  # every token with a row
        self.next_spare = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = F.linear(x, self.plain) if self.rows is None else self.rows(x)
        logits = torch.full((*x.shape[:-1], self.vocab), float("-inf"), dtype=scores.dtype, device=x.device)
        return logits.index_copy_(-1, self.ids, scores)  # an unused spare's repeat writes the same score twice

    def include(self, tokens: Iterable[int]) -> None:
        """Give tokens off the list a spare row each (the oldest spare goes first when all are taken)."""
        spare = len(self.spares)
        new = [t for t in dict.fromkeys(tokens) if t not in self.listed and 0 <= t < self.vocab][-spare:] if spare else []
        if not new:
            return
        slots = []
        for token in new:
            slot, self.next_spare = self.next_spare, (self.next_spare + 1) % spare
            self.listed.discard(self.spares[slot])
            self.spares[slot] = token
            self.listed.add(token)
            slots.append(self.fixed + slot)
        at, chosen = torch.tensor(slots, device=self.ids.device), torch.tensor(new, device=self.ids.device)
        self.ids[at] = chosen
        if self.rows is None:
            self.plain[at] = self.source[chosen]
        else:
            self.rows.set_rows(at, self.source[chosen])  # as the whole head's rows: one scale per row


def shortlist_head(model: nn.Module, tokenizer, count: int) -> ShortlistHead | None:
    """Give `model` (a draft's) a head over `count` tokens, in place; returns the head (None: the
    vocabulary is no larger, so the whole head stays)."""
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

"""Speculative decoding in the scheduler: prompt lookup, predictions and a draft model, per request.

A request whose options ask for speculation (the server's `--lookup` or `--draft`, or a
request's `prediction`) gets a draft at each step, from its own transcript: prompt lookup, its
predicted text followed from where its reply last matched, or the draft model's guesses. The
draft model drafts for all its rows of a step at once, on a cache per batch size of its own
that catches up with each row's transcript (drafts.ModelDrafter: what a row shares with what
that cache row holds is kept, the rest fed anew), so prompt reuse and row moves need nothing
more; it samples with the rows' own sampler, so its guesses use their noise. When any row of the step has a
draft, the step is one verification forward of [last token, drafts] for every busy row
(speculative.verify; a row without drafts feeds its last token alone, as in a decode step), and
each row keeps its drafts up to the first one its own choice disagrees with. Each request still
gets exactly the tokens it would get decoding plainly and alone: every token emitted is the
target's own choice at that position, with the request's own noise and penalty counts. Rows
accept different counts; the rejected drafts are rewound row by row, and so are accepted tokens
fed past a request's end (a stop token or string, or its budget, inside an accepted run).

The scheduler paces itself as a call does (speculative.Pace): it times its verification steps
against its plain ones, per token, and pauses drafting while verifying is slower.

A row with a grammar (json_schema, regex, grammar) has its draft checked against its matcher
first: the draft is cut at the first token the grammar refuses, and each position is chosen
under the mask the grammar gives after the drafts before it, as a decode step there would be
(grammar.Guide.draft_masks). `Budget` (speculative.py) drafts less, and for a while nothing,
after rejections, so a request whose text does not repeat pays for few verification chunks.

`BatchDrafts` is the part of batching.Scheduler that does this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .drafts import ModelDrafter, PredictionDrafter, lookup_draft
from .speculative import Budget, Plan, plan, verify


@dataclass
class RowSpeculation:
    """One request's speculation: how it drafts, and how many tokens next."""

    plan: Plan
    budget: Budget
    predictor: PredictionDrafter | None

    @classmethod
    def of(cls, engine, options) -> "RowSpeculation | None":
        chosen = plan(engine, options)  # checked: bad values are the request's error, before it takes a slot
        if chosen is None:
            return None
        predictor = PredictionDrafter(chosen.prediction, 1) if chosen.source == "prediction" else None
        return cls(chosen, Budget(chosen.num_draft_tokens), predictor)


@dataclass
class DraftCounts:
    """What the scheduler's speculation did, for the server's metrics."""

    rounds: int = 0  # verification forwards
    drafted: int = 0
    accepted: int = 0


class BatchDrafts:
    """Drafting and verifying for the scheduler's busy rows (see the module doc)."""

    def _drafts(self, rows, size: int, sampler, kind: str) -> tuple[list[list[int]], torch.Tensor | None] | None:
        """Each of the step's `size` rows' drafts, and the grammar rows' masks at their draft
        positions (grammar.Guide.draft_masks; None when no row has a grammar), or None when no row
        drafts (a plain step)."""
        if all(s.speculation is None for s in rows):
            return None
        if not self.pace.allows():
            return None
        drafts = [[] for _ in range(size)]
        modelled: list = [None] * size  # the rows the draft model drafts for: their transcripts
        budgets = [0] * size
        for s in rows:
            spec, books = s.speculation, self.cache.tokens[s.row]
            if spec is None or books is None:
                continue
            held = len(books)
            room = min(s.budget - s.produced - 1, self.engine.max_seq_len - 2 - held)
            k = max(0, min(spec.budget.next(), room))
            if not k:
                continue
            context = [*books, s.last]
            if spec.predictor is not None:
                reply = context[len(context) - s.produced :] if s.produced else []
                drafts[s.row] = spec.predictor.draft(0, reply, k)
                fallback = spec.plan.fallback if not drafts[s.row] else "off"
            else:
                fallback = spec.plan.source
            if fallback == "lookup":
                drafts[s.row] = lookup_draft(context, k)
            elif fallback == "draft":
                modelled[s.row], budgets[s.row] = context, k
        if any(budgets):
            drafter = self.drafters.get(size)
            if drafter is None:
                drafter = self.drafters[size] = ModelDrafter(self.engine.draft, size, sampler, kind)
            drafter.follow(sampler, kind)
            for row, draft in enumerate(drafter.draft(modelled, budgets)):
                drafts[row] = drafts[row] or draft
        masks = None
        if any(drafts) and any(s.row in self.guide.rows for s in rows):  # drafts cut where a grammar refuses them
            masks = self.guide.draft_masks(drafts, _width(rows))
        return (drafts, masks) if any(drafts) else None

    def _verify(self, rows, cache, tokens, active, drafts, masks, sampler, penalties, kind, with_logprobs):
        """One verification forward; per row its emitted tokens and their (logprob, values, ids)."""
        _, _, emitted, chosen, accepted = verify(
            self.runner, cache, tokens, active, drafts, _width(rows), sampler, penalties, self.eos, kind, with_logprobs, masks=masks
        )
        self.cache.high = max(self.cache.lengths.tolist())  # rows were rewound: the books follow
        counts = self.draft_counts
        counts.rounds += 1
        for s in rows:
            proposed = len(drafts[s.row])
            if proposed:
                s.speculation.budget.record(proposed, accepted[s.row])
                counts.drafted += proposed
                counts.accepted += accepted[s.row]
        if chosen is not None:
            chosen = [[(float(c[0]), v[0].tolist(), i[0].tolist()) for c, v, i in row] for row in chosen]
        return emitted, chosen

    def _timed(self, rows, drafted: bool, seconds: float, tokens: int) -> None:
        """Tell the pace how long a step took, when a request in it speculates."""
        if any(s.speculation is not None for s in rows):
            self.pace.record(drafted, seconds, tokens)

    def _emit_run(self, slot, tokens: list[int], chosen) -> None:
        """Hand a request the tokens one verification emitted for it, one at a time, as steps would;
        tokens fed past its end are stepped back out of the cache."""
        row, fed = slot.row, 0
        for i, token in enumerate(tokens):
            self.cache.tokens[row].append(slot.last)
            fed += 1
            self._emit(slot, token, None if chosen is None else chosen[i])
            if slot.request is None:  # ended here
                break
        if len(tokens) > fed:
            self.cache.rewind(len(tokens) - fed, row)


def _width(rows) -> int:
    """The verification chunk's positions for a step's rows: the widest plan among them."""
    return max(s.speculation.plan.width for s in rows if s.speculation is not None)

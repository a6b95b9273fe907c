"""Speculative decoding that gives exactly the tokens of plain decoding.

A decode step reads every weight to produce one token per row. Here a drafter proposes a few
tokens d1..dk cheaply, and one forward of [last token, d1..dk] through the target (a chunk of
k+1 tokens, like a prefill chunk, with logits at every position) checks them all at once.

Verification keeps exactly what plain decoding would produce. At each position of the chunk the
target makes its own choice, as a decode step would: penalties over the counts so far (which
include the drafts accepted before it), then greedy or Gumbel-max sampling with the noise of
that position (sampling.py: the noise is a pure function of seed, row, position and token id,
so the choice is fixed by the logits). A draft token is accepted while it equals that choice;
the first mismatch emits the target's choice instead. Whatever the drafts, every token emitted
is the target's own choice given the tokens before it: the output of plain decoding, token for
token (the drafter-invariant coupling). Drafts only decide how many tokens a forward yields.
The rejected drafts are rewound from the cache, row by row (rows accept different counts):
hence k <= the cache's rewind margin.

One caveat: a chunk of k+1 tokens runs other matrix shapes than k+1 single steps, so its
logits can round differently. In float32 that never changes a token in the tests; in bfloat16 a
near tie can flip, and the output then differs from plain decoding (docs/benchmarks.md measures
how often).

Drafters (generation option `speculative`, or `prediction`):
- "lookup": prompt lookup. The last few tokens of prompt and reply (an n-gram, longest first)
  are looked for earlier in the same text; the tokens that followed the latest match are the
  draft. No second model: it pays on input-grounded replies (summaries with quotes, code edits).
- "draft": a smaller model with the same vocabulary (`load(..., draft=...)`), run on a cache of
  its own that steps back with the target's; it samples with the same noise, so it agrees often.
- `prediction="..."`: the caller's guess of the reply (such as the file being edited), followed
  from where the reply last matched it.

A row drafts fewer tokens, and for a while none, when its drafts are rejected; a round with no
draft in any row is a plain decode step, so speculation costs little where it does not pay.
And a call stops drafting for a while when its rounds, timed, yield tokens more slowly than
plain steps (`Pace`): on a CPU, verifying k drafts costs k heads of 262k logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .drafts import ModelDrafter, PredictionDrafter, lookup_draft
from .errors import InvalidArgumentError, ModelLoadError
from .options import MAX_LOGPROBS
from .sampling import Penalties, count_tokens, logprobs

SPECULATIVE = ("off", "lookup", "draft")
DEFAULT_DRAFT_TOKENS = {"lookup": 8, "draft": 4, "prediction": 8}
MAX_PAUSE = 32  # rounds a row waits at most before drafting again after misses


# ---------------------------------------------------------------------- checks at load
def check_draft(target, draft) -> None:
    """Refuse a draft engine that cannot draft for `target`: another vocabulary or tokenizer, too short."""
    t, d = target.config, draft.config
    if d.vocab_size != t.vocab_size:
        raise ModelLoadError(
            f"the draft model's vocabulary has {d.vocab_size} tokens, the target's {t.vocab_size}; "
            "a draft must share the target's tokenizer and vocabulary"
        )
    if (d.bos_token_id, tuple(d.eos_token_ids)) != (t.bos_token_id, tuple(t.eos_token_ids)):
        raise ModelLoadError("the draft model's bos/eos ids differ from the target's; a draft must share its tokenizer")
    if (target.tokenizer is None) != (draft.tokenizer is None) or (
        target.tokenizer is not None and _pieces(target.tokenizer) != _pieces(draft.tokenizer)
    ):
        raise ModelLoadError("the draft model's tokenizer differs from the target's; a draft must share its tokenizer")
    if draft.max_seq_len < target.max_seq_len:
        raise ModelLoadError(
            f"the draft engine's max_seq_len ({draft.max_seq_len}) is below the target's ({target.max_seq_len}); "
            "load the draft with at least the target's max_seq_len"
        )
    if draft.device != target.device:
        raise ModelLoadError(f"the draft model is on {draft.device}, the target on {target.device}; put both on one device")


def _pieces(tokenizer) -> list[str]:
    sp = tokenizer.sp
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


# ---------------------------------------------------------------------- what a call asks for
@dataclass(frozen=True)
class Plan:
    """How one call speculates: which drafter, how many tokens at most, the prediction's ids."""

    source: str  # "lookup", "draft" or "prediction"
    num_draft_tokens: int
    fallback: str = "off"  # with a prediction: what drafts where the prediction has nothing
    prediction: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        """The verification chunk's tokens: the last one and the most drafts."""
        return 1 + self.num_draft_tokens


def plan(engine, options) -> Plan | None:
    """The speculation a call's options ask for on `engine`, checked; None to decode plainly."""
    kind = options.speculative
    if kind is None:
        kind = "draft" if engine.draft is not None else "off"
    if kind == "draft" and engine.draft is None:
        raise InvalidArgumentError(
            'speculative="draft" needs a draft model: load(..., draft=SOURCE_or_Engine) (CLI: --draft SRC)'
        )
    if options.prediction is not None and options.speculative == "off":
        raise InvalidArgumentError('prediction= drafts from the predicted text; it cannot go with speculative="off"')
    if kind == "off" and options.prediction is None:
        return None
    margin = engine.runner.rewind_margin
    if engine.config.sliding_layers and any(engine.config.sliding_layers) and margin < 1:
        raise InvalidArgumentError(
            "speculative decoding steps the cache back over rejected drafts, but this engine was loaded with "
            "rewind_margin=0; load with rewind_margin >= num_draft_tokens"
        )
    source = "prediction" if options.prediction is not None else kind
    k = options.num_draft_tokens
    if k is None:
        k = min(DEFAULT_DRAFT_TOKENS[source], margin)
    if k > margin and any(engine.config.sliding_layers):
        raise InvalidArgumentError(
            f"num_draft_tokens={k} is past the rewind margin ({margin}): rejected drafts must be stepped back; "
            f"ask for at most {margin} or load with rewind_margin >= {k}"
        )
    if k == 0:
        return None
    prediction = options.prediction or ()
    if isinstance(prediction, str):
        if engine.tokenizer is None:
            raise InvalidArgumentError("a text prediction needs a tokenizer.model; this checkpoint has none (give token ids)")
        prediction = engine.tokenizer.encode(prediction, bos=False)
    else:
        engine.check_ids(list(prediction))
    return Plan(source, k, kind, tuple(prediction))


# ---------------------------------------------------------------------- the decoding rounds
class Budget:
    """How many tokens a row drafts next: more after full acceptance, fewer after misses, none for a while."""

    def __init__(self, most: int):
        self.most, self.k, self.misses, self.pause = most, most, 0, 0

    def next(self) -> int:
        if self.pause:
            self.pause -= 1
            return 0
        return self.k

    def record(self, proposed: int, accepted: int) -> None:
        if not proposed:
            return
        if accepted == proposed:
            self.k, self.misses = min(self.most, self.k + 2), 0
        elif accepted == 0:
            self.misses += 1
            self.k = max(1, self.k // 2)
            if self.misses >= 2:
                self.pause = min(MAX_PAUSE, 2 ** (self.misses - 1))
        else:
            self.k, self.misses = max(1, accepted + 1), 0


class Pace:
    """Whether speculating pays here: seconds per emitted token, measured, of plain steps and of
    speculative rounds (drafting included). Acceptance is not enough: on a CPU a verification
    chunk's head costs about as much per position as a step's, so even accepted drafts can lose.
    While rounds are slower than steps, the call pauses drafting, for longer after each loss, and
    probes again; a first plain step is timed after the first round, to compare with."""

    def __init__(self):
        self.plain = self.speculative = None  # seconds per token, smoothed
        self.pause = self.losses = 0

    def allows(self) -> bool:
        if self.pause:
            self.pause -= 1
            return False
        return True

    def record(self, speculative: bool, seconds: float, tokens: int) -> None:
        if not tokens:
            return
        rate = seconds / tokens
        if not speculative:
            self.plain = rate if self.plain is None else (self.plain + rate) / 2
            return
        self.speculative = rate if self.speculative is None else (self.speculative + rate) / 2
        if self.plain is None:
            self.pause = 1  # time a plain step next
        elif self.speculative > self.plain:
            self.losses += 1
            self.pause = min(MAX_PAUSE, 2**self.losses)
            self.speculative = None  # the next probe is judged on its own
        else:
            self.losses = 0


class Speculation:
    """One call's speculative decoding: the loop (loop.generate) hands it the decoding once prefilled."""

    def __init__(self, engine, plan: Plan, stats):
        batch_size = len(stats.prompt_tokens)
        self.plan = plan
        self.budgets = [Budget(plan.num_draft_tokens) for _ in range(batch_size)]
        self.prediction = PredictionDrafter(plan.prediction, batch_size) if plan.source == "prediction" else None
        self.draft_engine = engine.draft if "draft" in (plan.source, plan.fallback) else None
        self.pace = Pace()
        self.model_drafter: ModelDrafter | None = None
        stats.draft_tokens, stats.accepted_tokens = [0] * batch_size, [0] * batch_size
        stats.prediction = plan.prediction if self.prediction is not None else None

    def _drafts(self, contexts, replies, budgets, sampler, kind) -> list[list[int]]:
        """Each row's draft: from the prediction, else from lookup or the draft model."""
        drafts = [[] for _ in budgets]
        if not any(budgets):
            return drafts
        wanted = list(budgets)
        for row, k in enumerate(budgets):
            if not k or contexts[row] is None:
                wanted[row] = 0
                continue
            if self.prediction is not None:
                drafts[row] = self.prediction.draft(row, replies[row], k)
            fallback = self.plan.fallback if self.prediction is not None else self.plan.source
            if not drafts[row] and fallback == "lookup":
                drafts[row] = lookup_draft(contexts[row], k)
            if drafts[row] or fallback != "draft":
                wanted[row] = 0
        if any(wanted):
            if self.model_drafter is None:
                self.model_drafter = ModelDrafter(self.draft_engine, len(budgets), sampler, kind)
            for row, d in enumerate(self.model_drafter.draft(contexts, wanted)):
                if d:
                    drafts[row] = d
        return drafts

    def decode(self, runner, cache, tokens, active, sampler, penalty, eos_ids, kind, top_logprobs, rows, transcripts, stats, make_block,
               kernels=None, guide=None):  # fmt: skip
        """Yield a block per round until every row is done (the loop's `rows` keeps the books).
        `kernels`: the call's packaged steps and verification (Runner.kernels), or None. `guide`:
        the rows' grammars (grammar.Guide), or None: each draft position is then chosen under the
        grammar's mask after the drafts before it, and a draft is cut where the grammar refuses it."""
        batch = len(transcripts)
        reply_starts = [None if t is None else len(t) - p for t, p in zip(transcripts, rows.produced)]
        try:
            while not rows.done:
                started = time.perf_counter()
                lengths = cache.lengths.tolist()
                going = active.tolist()
                budgets = []
                drafting = self.pace.allows()
                for row in range(batch):
                    room = min(rows.limits[row] - rows.produced[row] - 1, runner.max_seq_len - 2 - lengths[row])
                    alive = going[row] and rows.reasons[row] is None and drafting
                    budgets.append(max(0, min(self.budgets[row].next(), room)) if alive else 0)
                replies = [None if t is None else t[s:] for t, s in zip(transcripts, reply_starts)]
                drafts = self._drafts(transcripts, replies, budgets, sampler, kind)
                masks = guide.draft_masks(drafts, self.plan.width) if guide is not None and guide.running and any(drafts) else None
                with torch.no_grad(), runner.lock:
                    if any(drafts):
                        tokens, active, emitted, chosen, accepted = verify(
                            runner, cache, tokens, active, drafts, self.plan.width,
                            sampler, penalty, eos_ids, kind, top_logprobs is not None, kernels, masks=masks,
                        )
                    else:
                        fed = active
                        # No row drafts: a plain decode step, at a plain step's cost.
                        allowed = guide.allowed() if guide is not None else None
                        tokens, active, step_chosen = runner.step(
                            cache, tokens, active, sampler, penalty, eos_ids, kind, top_logprobs is not None, allowed, kernels
                        )
                        count_tokens(penalty, tokens, fed)
                        emitted = [[t] if f else [] for t, f in zip(tokens.tolist(), fed.tolist())]
                        chosen = None if step_chosen is None else [[_row_of(step_chosen, row)] for row in range(batch)]
                        accepted = [0] * batch
                if guide is not None:
                    for row in range(batch):
                        complete = guide.follow(row, emitted[row]) if emitted[row] else None
                        if complete is not None:  # the value ends at this token: the row stops there
                            rows.end_at(row, rows.produced[row] + complete)
                            active[row] = False
                taken = [rows.take(row, emitted[row]) for row in range(batch)]
                self.pace.record(any(drafts), time.perf_counter() - started, sum(map(len, emitted)))
                for row in range(batch):
                    kept = min(accepted[row], len(taken[row]))  # drafts come first in what a round emits
                    if drafts[row]:
                        self.budgets[row].record(len(drafts[row]), accepted[row])
                        stats.draft_tokens[row] += len(drafts[row])
                        stats.accepted_tokens[row] += kept
                    if transcripts[row] is not None:
                        transcripts[row].extend(taken[row])
                yield make_block(taken, *_block_logprobs(chosen, taken, top_logprobs))
        finally:
            if self.model_drafter is not None:
                self.model_drafter.close()


def verify(runner, cache, tokens, active, drafts, width: int, sampler, penalty: Penalties, eos_ids, kind, with_logprobs, kernels=None,
           masks=None):  # fmt: skip
    """Feed [last token, d1..dk] per row in one forward; keep each row's drafts up to the first disagreement.

    `masks` ([B, >= 1 + k, words], grammar.Guide.draft_masks): the grammar's bitmask at each
    position, as a decode step there would take it; None for no grammar.

    Returns the next last token [B] and active [B] (as a decode step would), each row's emitted
    tokens (the target's choices: its accepted drafts and one more), their log-probabilities
    when asked for, and how many drafts each row accepted. The cache keeps only what was accepted.
    """
    from .runner import choose

    device = runner.device
    batch = len(drafts)
    counts = [len(d) for d in drafts]
    going = active.tolist()
    start = cache.lengths.clone()
    ids = torch.zeros(batch, 1 + max(counts), dtype=torch.long)
    ids[:, 0] = tokens.cpu()
    for row, d in enumerate(drafts):
        ids[row, 1 : 1 + len(d)] = torch.tensor(d, dtype=torch.long)
    n_new = torch.tensor([1 + c if g else 0 for c, g in zip(counts, going)], device=device)
    logits = runner.verify(cache, ids.to(device), n_new, width, kernels)  # [B, T, V]
    proposed = ids[:, 1:].to(device)
    k = torch.tensor(counts, device=device)
    alive = active.clone()
    choices, alive_at, picked = [], [], []
    for j in range(1 + max(counts)):
        choice = choose(logits[:, j], sampler, penalty, start + j + 1, kind, None if masks is None else masks[:, j])
        count_tokens(penalty, choice, alive)
        choices.append(choice)
        alive_at.append(alive)
        if with_logprobs:
            picked.append(logprobs(logits[:, j], choice, MAX_LOGPROBS))
        if j == max(counts):
            break
        is_eos = (choice[:, None] == eos_ids).any(-1)
        alive = alive & (j < k) & (proposed[:, j] == choice) & ~is_eos
    emitted_mask = torch.stack(alive_at, 1)  # [B, T]
    chosen = torch.stack(choices, 1)  # [B, T]
    n_emitted = emitted_mask.sum(1)
    # A draft is accepted where it equals the choice emitted there (an eos it proposed included).
    agreed = emitted_mask[:, :-1] & (proposed == chosen[:, :-1]) & (torch.arange(max(counts), device=device) < k[:, None])
    last = chosen.gather(1, (n_emitted - 1).clamp(min=0)[:, None])[:, 0]
    next_tokens = torch.where(active, last, tokens)
    host_emitted, accepted = n_emitted.tolist(), agreed.sum(1).tolist()
    for row in range(batch):
        kept = max(0, host_emitted[row] - 1)  # fed drafts that stay: all emitted but the last
        if going[row] and counts[row] > kept:
            cache.rewind(counts[row] - kept, row)
    finished = (next_tokens[:, None] == eos_ids).any(-1) | (cache.lengths >= cache.max_seq_len - 1)
    rows_tokens = chosen.tolist()
    emitted = [rows_tokens[row][: host_emitted[row]] for row in range(batch)]
    per_row = None
    if with_logprobs:
        per_row = [[_row_of(c, row) for c in picked[: host_emitted[row]]] for row in range(batch)]
    return next_tokens, active & ~finished, emitted, per_row, accepted


def _row_of(chosen: tuple, row: int) -> tuple:
    """One row of a step's (chosen logprob [B], top values [B, N], top ids [B, N])."""
    return tuple(t[row : row + 1] for t in chosen)


def _block_logprobs(chosen, taken, top_logprobs):
    """(logprobs, top) of a Block from per-row lists of per-token (chosen, values, ids) tensors [1], [1, N]."""
    if top_logprobs is None:
        return None, None
    logprob_rows, top_rows = [], []
    for row, new in enumerate(taken):
        entries = (chosen[row] if chosen else [])[: len(new)]
        logprob_rows.append([float(c[0]) for c, _, _ in entries])
        top_rows.append([list(zip(i[0, :top_logprobs].tolist(), v[0, :top_logprobs].tolist())) for _, v, i in entries])
    return logprob_rows, top_rows

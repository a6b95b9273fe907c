"""The drafters of speculative decoding (speculative.py): where the proposed tokens come from.

- prompt lookup: the latest earlier match of the last few tokens of prompt and reply;
- a prediction: the caller's guess of the reply, followed from where the reply last matched it;
- a draft model: a smaller model with the same vocabulary, on a cache of its own that steps
  back with the target's, sampling with the target's noise.

A drafter only proposes: verification (speculative.verify) decides what is kept, so no drafter
can change the output.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch

from .sampling import SamplingSettings, penalties
from .shortlist import ShortlistHead

LOOKUP_NGRAM = 3  # the longest n-gram prompt lookup matches (then shorter ones)
PREDICTION_NGRAM = 8  # a prediction is matched on longer n-grams: it is long and close to the reply
CATCH_UP = 3  # a draft model feeds up to this many new tokens in one short chunk, not a prefill


def add_prediction_usage(usage, prediction: Sequence[int] | None, reply: Sequence[int]) -> None:
    """With prediction=: set usage's counts of predicted tokens the reply has, in order, and has not."""
    if prediction is not None:
        usage.accepted_prediction_tokens, usage.rejected_prediction_tokens = prediction_usage(prediction, reply)


def prediction_usage(prediction: Sequence[int], reply: Sequence[int]) -> tuple[int, int]:
    """(accepted, rejected) predicted tokens: those that appear in the reply, in order, and the rest."""
    matcher = difflib.SequenceMatcher(None, list(prediction), list(reply), autojunk=False)
    accepted = sum(block.size for block in matcher.get_matching_blocks())
    return accepted, len(prediction) - accepted


# ---------------------------------------------------------------------- drafters
def latest_match(context: Sequence[int], suffix: Sequence[int], before: int) -> int | None:
    """Where the latest occurrence of `suffix` that ends before index `before` of `context` ends."""
    n = len(suffix)
    if n == 0 or before < n:
        return None
    text = torch.as_tensor(context[:before], dtype=torch.long)
    windows = text.unfold(0, n, 1)  # [before - n + 1, n]
    hits = (windows == torch.as_tensor(suffix, dtype=torch.long)).all(-1).nonzero()
    return None if hits.numel() == 0 else int(hits[-1]) + n


def lookup_draft(context: Sequence[int], k: int, max_ngram: int = LOOKUP_NGRAM) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last n-gram."""
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        end = latest_match(context, context[-n:], len(context) - 1)
        if end is not None:
            return list(context[end : end + k])
    return []


class PredictionDrafter:
    """Follows each row's reply along the caller's predicted text and proposes what comes next."""

    def __init__(self, prediction: Sequence[int], batch_size: int):
        self.prediction = list(prediction)
        # Per row: (reply index, prediction index) known to line up; the reply has matched since.
        self.anchors = [(0, 0)] * batch_size

    def draft(self, row: int, reply: Sequence[int], k: int) -> list[int]:
        """Up to k predicted tokens that follow the reply: straight on while it follows the
        prediction, else from where its last n-gram (longest first) next occurs in it."""
        p = self.prediction
        reply_at, predicted_at = self.anchors[row]
        followed = len(reply) - reply_at
        if list(reply[reply_at:]) == p[predicted_at : predicted_at + followed]:
            return p[predicted_at + followed : predicted_at + followed + k]
        for n in range(min(PREDICTION_NGRAM, len(reply), len(p)), 0, -1):
            suffix = torch.as_tensor(reply[-n:], dtype=torch.long)
            ends = ((torch.as_tensor(p).unfold(0, n, 1) == suffix).all(-1).nonzero()[:, 0] + n).tolist()
            ends = [e for e in ends if e < len(p)]
            if ends:
                # The first match ahead of the last anchor: the reply moves forward through the prediction.
                ahead = [e for e in ends if e >= predicted_at]
                end = ahead[0] if ahead else ends[-1]
                self.anchors[row] = (len(reply), end)
                return p[end : end + k]
        return []


class ModelDrafter:
    """A draft model on a cache of its own, caught up with each row's transcript before it drafts."""

    def __init__(self, draft_engine, batch_size: int, sampler, kind: str):
        self.engine = draft_engine
        self.runner = draft_engine.runner
        self.cache = self.runner.checkout(batch_size)
        self.cache.reset()
        self.sampler, self.kind = sampler, kind  # the target's: the same noise, so the draft agrees often
        vocab = draft_engine.config.vocab_size
        self.neutral = penalties([SamplingSettings()] * batch_size, [[]] * batch_size, vocab, self.runner.device)
        self.no_eos = self.runner.eos_tensor(())
        # Its packaged prefill and steps when the compile cache has them: a draft only proposes,
        # so which kernels it runs changes how often it is right, never the output.
        self.batch_size = batch_size
        self._choose_kernels()
        head = getattr(self.runner.model.embed_tokens, "head", None)
        self.shortlist = head if isinstance(head, ShortlistHead) else None  # gets the transcripts' own tokens

    def close(self) -> None:
        self.runner.checkin(self.cache)

    def _choose_kernels(self) -> None:
        """The packaged graphs for this batch size and kind: steps and prefill, and the catch-up chunk."""
        self.kernels = self.runner.kernels(self.batch_size, self.kind, False, False)
        self.chunk_kernels = self.runner.kernels(self.batch_size, self.kind, False, False, CATCH_UP)

    def follow(self, sampler, kind: str) -> None:
        """Draft with this sampler and kind from now on (the scheduler's, which change per step)."""
        if sampler is not self.sampler or kind != self.kind:
            self.sampler, self.kind = sampler, kind
            self._choose_kernels()

    def draft(self, contexts: list[Sequence[int] | None], budgets: list[int]) -> list[list[int]]:
        """Up to budgets[row] tokens for each row whose whole transcript (`contexts[row]`) is known."""
        cache, batch = self.cache, len(contexts)
        feeds: list[list[int]] = [[] for _ in range(batch)]
        for row, (context, k) in enumerate(zip(contexts, budgets)):
            if not k or context is None:
                budgets[row] = 0
                continue
            held = cache.tokens[row] or []
            keep = min(cache.shared_prefix(row, list(context)), len(context) - 1)
            if len(held) - keep > cache.rewindable(row) or cache.tokens[row] is None:
                cache.reset(row)
                keep = 0
            elif len(held) > keep:
                cache.rewind(len(held) - keep, row)
            feeds[row] = list(context[keep:])
        if not any(budgets):
            return [[] for _ in range(batch)]
        drafts: list[list[int]] = [[] for _ in range(batch)]
        with torch.no_grad(), self.runner.lock:
            if self.shortlist is not None:
                self.shortlist.include(token for feed in feeds for token in feed)
            tokens = self._catch_up(feeds, budgets)
            for step in range(1, max(budgets) + 1):
                ids = tokens.tolist()
                for row, k in enumerate(budgets):
                    if step <= k:
                        drafts[row].append(ids[row])
                if step == max(budgets):
                    break
                going = torch.tensor([k > step for k in budgets], device=self.runner.device)
                fed = ids
                tokens, _, _ = self.runner.step(
                    cache, tokens, going, self.sampler, self.neutral, self.no_eos, self.kind, False, None, self.kernels
                )
                for row, k in enumerate(budgets):
                    if k > step:
                        cache.tokens[row].append(fed[row])
        return drafts

    def _catch_up(self, feeds: list[list[int]], budgets: list[int]) -> torch.Tensor:
        """Feed each drafting row its new tokens; each row's first draft token [B].

        After a verification a row has one new token (the target's own choice) or two (and the
        last draft, when all were kept). When every row drafts and has the same few, one token
        goes through a decode step and two or three through one chunk of CATCH_UP tokens,
        which costs about a step at batch 1: a packaged prefill chunk is a whole tile (16 tokens)."""
        from .runner import choose

        cache, device, runner = self.cache, self.runner.device, self.runner
        counts = {len(feed) for feed in feeds}
        count = counts.pop() if len(counts) == 1 and all(budgets) else 0
        if count == 1:
            tokens = torch.tensor([feed[0] for feed in feeds], device=device)
            tokens, _, _ = runner.step(cache, tokens, torch.ones_like(tokens, dtype=torch.bool), self.sampler,
                                       self.neutral, self.no_eos, self.kind, False, None, self.kernels)  # fmt: skip
        elif 1 < count <= CATCH_UP:
            ids = torch.tensor(feeds, device=device)
            logits = runner.verify(cache, ids, torch.full((len(feeds),), count, device=device), CATCH_UP, self.chunk_kernels)
            tokens = choose(logits[:, -1].float(), self.sampler, self.neutral, cache.lengths, self.kind)
        else:
            logits = runner.prefill(cache, feeds, None, self.kernels)
            return choose(logits, self.sampler, self.neutral, cache.lengths, self.kind)
        for row, feed in enumerate(feeds):
            if cache.tokens[row] is not None:
                cache.tokens[row] += feed
        return tokens

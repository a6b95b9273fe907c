"""Structured output: the tokens a JSON schema, a regular expression or a grammar lets come next.

The matching itself is llguidance's (the `structured` extra): an Earley parser over the grammar
and a lexer that walks the vocabulary's byte trie. This module gives it what it needs and hands
the decode step what it needs back:

- the vocabulary as bytes (`token_bytes`). SentencePiece writes a space as "▁" and a byte as
  "<0xNN>": a grammar engine that saw those raw pieces could never emit a space. Control pieces
  (<eos>, <start_of_turn>, <unused0>, ...) are never text inside a value;
- one compiled grammar per constraint (`Grammars.compile`, cached), checked before any work: a
  schema that is not valid JSON Schema, or one using a feature the library lacks, is an
  InvalidArgumentError that names it;
- per row of a batch, a matcher (`RowGrammar`) that follows the row's tokens; and per batch a
  `Guide` holding a bitmask [B, ceil(vocab / 32)] int32 (bit t of row b set when token t may
  come next), the same shape at every step, whatever the schema. The decode step takes it as a
  tensor, so a new or changed schema never recompiles anything, and a call without one never
  builds one.

A row's value ends the row ("stop") at the token that completes it. When the grammar could go on
but may also stop (a number, a regex with a tail), the row's stop ids (eos; <end_of_turn> in
chat) are allowed in place of the library's own end-of-sequence token. JSON has at most one
space or newline between tokens, so a model cannot loop on blanks until its token limit, and an
object whose schema lists its properties gets no others unless the schema asks for them
(`additionalProperties`), which keeps small models from inventing keys without end.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .errors import InvalidArgumentError, MissingExtraError
from .schemas import Constraint, bounded_integers, closed_objects

WHITESPACE = r"[\x20\x0A]?"  # between JSON tokens: at most one space or newline
COMPILED_KEPT = 64  # compiled constraints kept per engine (a server sees the same schemas again)
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
CONTROL_PIECE = re.compile(r"<[^<>]+>")  # Gemma's control and placeholder pieces are named like tags


# ---------------------------------------------------------------------- the vocabulary as bytes
def token_bytes(tokenizer, rows: int) -> list[bytes | None]:
    """Each of the head's `rows` token ids as the bytes it adds to the text; None for a control
    token, and for rows past the tokenizer's pieces (Gemma 3 4B and up: 262208 rows, 262144 pieces)."""
    sp = tokenizer.sp
    out: list[bytes | None] = []
    for i in range(min(rows, sp.get_piece_size())):
        piece = sp.id_to_piece(i)
        byte = BYTE_PIECE.fullmatch(piece) if sp.is_byte(i) else None
        if byte:
            out.append(bytes([int(byte.group(1), 16)]))
        elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or CONTROL_PIECE.fullmatch(piece):
            out.append(None)
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out + [None] * (rows - len(out))


class _Vocabulary:
    """The vocabulary in the shape llguidance's TokenizerWrapper reads: bytes per token, a control
    token as 0xFF and its name (so it is never text), and a function that tokenizes text."""

    def __init__(self, tokenizer, pieces: list[bytes | None], eos_id: int):
        self.tokens = [b"\xff<control %d>" % i if p is None else p for i, p in enumerate(pieces)]
        self.special_token_ids = [i for i, p in enumerate(pieces) if p is None]
        self.eos_token_id, self.bos_token_id = eos_id, tokenizer.bos_id
        self._encode = tokenizer.sp.encode

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # llguidance probes for bytes; it hands text to tokenizers that refuse them
            raise TypeError("text only")
        return self._encode(text)


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise MissingExtraError(
            "json_schema, regex and grammar need llguidance: pip install 'gemmalite[structured]'"
        ) from None
    return llguidance


# ---------------------------------------------------------------------- compiled grammars
class Grammars:
    """An engine's grammar compiler: its vocabulary, built on first use, and the grammars compiled so far.

    Building llguidance's view of the vocabulary takes a few seconds for Gemma's 262k pieces
    (docs/benchmarks.md), once per engine; a schema compiles in milliseconds.
    """

    def __init__(self, tokenizer, rows: int, eos_id: int):
        self.tokenizer, self.rows, self.eos_id = tokenizer, rows, eos_id
        self.words = -(-rows // 32)  # int32 words of one row's bitmask
        self._lock = threading.Lock()
        self._lltokenizer = None
        self._compiled: OrderedDict[Constraint, CompiledGrammar] = OrderedDict()

    @property
    def lltokenizer(self):
        with self._lock:
            if self._lltokenizer is None:
                llg = _llguidance()
                if self.tokenizer is None:
                    raise InvalidArgumentError("structured output needs a tokenizer.model; this checkpoint has none")
                pieces = token_bytes(self.tokenizer, self.rows)
                vocab = _Vocabulary(self.tokenizer, pieces, self.eos_id)
                self._lltokenizer = llg.LLTokenizer(llg.TokenizerWrapper(vocab), n_vocab=self.rows)
            return self._lltokenizer

    def compile(self, constraint: Constraint) -> "CompiledGrammar":
        """The constraint compiled for this vocabulary; InvalidArgumentError, naming the problem, when it cannot be."""
        with self._lock:
            if constraint in self._compiled:
                self._compiled.move_to_end(constraint)
                return self._compiled[constraint]
        llg = _llguidance()
        text = self._grammar_text(llg, constraint)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, self.lltokenizer)
        if is_error:
            raise InvalidArgumentError(f"the {constraint.kind.replace('_', ' ')} cannot be used: {_first_line(messages)}")
        compiled = CompiledGrammar(self, text)
        with self._lock:
            self._compiled[constraint] = compiled
            while len(self._compiled) > COMPILED_KEPT:
                self._compiled.popitem(last=False)
        return compiled

    @staticmethod
    def _grammar_text(llg, constraint: Constraint) -> str:
        try:
            if constraint.kind == "json_schema":
                schema = bounded_integers(closed_objects(json.loads(constraint.source)))
                return llg.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_pattern": WHITESPACE})
            if constraint.kind == "regex":
                return llg.LLMatcher.grammar_from_regex(constraint.source)
            return llg.grammar_from("grammar", constraint.source)  # Lark, or GBNF converted to Lark
        except ValueError as e:
            raise InvalidArgumentError(f"the {constraint.kind.replace('_', ' ')} cannot be used: {_first_line([str(e)])}") from None


def _first_line(messages: Sequence[str]) -> str:
    text = " ".join(line.strip() for m in messages for line in m.splitlines() if line.strip())
    return text[:300] or "the grammar library refused it"


class CompiledGrammar:
    """A checked grammar for one vocabulary: it makes a matcher per row that uses it."""

    def __init__(self, grammars: Grammars, text: str):
        self.grammars, self.text = grammars, text

    def matcher(self, stop_ids: Sequence[int]) -> "RowGrammar":
        llg = _llguidance()
        return RowGrammar(llg.LLMatcher(self.grammars.lltokenizer, self.text, log_level=0), self.grammars, stop_ids)


class RowGrammar:
    """One row's matcher: it writes the row's bitmask and follows the row's tokens."""

    def __init__(self, matcher, grammars: Grammars, stop_ids: Sequence[int]):
        self.matcher, self.eos_id, self.stop_ids = matcher, grammars.eos_id, tuple(stop_ids)
        self.words = grammars.words
        self.done = False  # the value is complete, or the row stopped at a stop id

    def fill(self, mask: torch.Tensor) -> None:
        """Write the allowed tokens into `mask`, one row [words] of int32 on the host."""
        words = mask.view(-1)
        assert words.is_contiguous() and words.device.type == "cpu" and words.dtype == torch.int32
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        eos_word, eos_bit = divmod(self.eos_id, 32)
        may_end = bool((int(words[eos_word]) >> eos_bit) & 1)
        words[eos_word] &= ~(1 << eos_bit) if eos_bit < 31 else 0x7FFFFFFF
        if may_end:  # the library's end-of-sequence stands for the row's own stop ids
            for token in self.stop_ids:
                word, bit = divmod(token, 32)
                words[word] |= (1 << bit) if bit < 31 else -(1 << 31)

    def draft_masks(self, draft: Sequence[int], out: torch.Tensor) -> int:
        """For speculative verification: write the bitmask at the current state into out[0], and
        the one after each of the draft's tokens into out[1], out[2], ... (out [>= 1 + len(draft),
        words], host int32). Stops before a draft token the grammar refuses, a stop id, or one
        that completes the value: the target's own choice there needs no state past it. The
        matcher is left as it was. Returns how many draft tokens the masks follow."""
        self.fill(out[0])
        followed = 0
        for token in draft:
            word, bit = divmod(token, 32)
            if self.done or token in self.stop_ids or not (int(out[followed, word]) >> bit) & 1:
                break
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed: {self.matcher.get_error()[:300]}")
            if self.matcher.is_stopped():
                self.matcher.rollback(1)
                break
            followed += 1
            self.fill(out[followed])
        if followed:
            self.matcher.rollback(followed)
        return followed

    def accept(self, token: int) -> bool:
        """Follow the row's new token; True when the row must end here (its value is complete)."""
        if self.done:
            return True
        if token in self.stop_ids:
            self.done = True
            return True
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed: {self.matcher.get_error()[:300]}")
        self.done = self.matcher.is_stopped()
        return self.done


class Guide:
    """The grammar rows of one batch, and the bitmask [B, words] the decode step reads.

    Rows without a grammar keep every bit set. The host copy is written by the matchers; the
    device copy (the same tensor on CPU) is what the step is given.
    """

    def __init__(self, batch_size: int, words: int, device: torch.device):
        self.host = torch.full((batch_size, words), -1, dtype=torch.int32)
        self.device = torch.device(device)
        self.rows: dict[int, RowGrammar] = {}
        self._on_device = self.host if self.device.type == "cpu" else torch.empty_like(self.host, device=self.device)

    def set(self, row: int, grammar: RowGrammar | None) -> None:
        self.host[row] = -1
        if grammar is None:
            self.rows.pop(row, None)
        else:
            self.rows[row] = grammar

    def swap(self, a: int, b: int) -> None:
        """Rows a and b trade places (the scheduler moved their requests between rows)."""
        first, second = self.rows.pop(a, None), self.rows.pop(b, None)
        if first is not None:
            self.rows[b] = first
        if second is not None:
            self.rows[a] = second
        self.host[[a, b]] = self.host[[b, a]]

    @property
    def running(self) -> bool:
        """Some row still follows a grammar: the step needs the mask."""
        return any(not g.done for g in self.rows.values())

    def allowed(self, row: int | None = None) -> torch.Tensor:
        """The bitmask for the next token on the device: [B, words], or [1, words] for one `row`."""
        rows = self.rows.items() if row is None else [(row, self.rows[row])] if row in self.rows else []
        for r, grammar in rows:
            if not grammar.done:
                grammar.fill(self.host[r])
        if self._on_device is not self.host:
            self._on_device.copy_(self.host)
        return self._on_device if row is None else self._on_device[row : row + 1]

    def draft_masks(self, drafts: list[list[int]], width: int) -> torch.Tensor:
        """For a verification chunk of `width` positions: [B, width, words] on the device, each
        grammar row's mask at each of its draft's positions, every bit set elsewhere. A draft is
        cut, in place, where the grammar refuses it or its value would end (RowGrammar.draft_masks):
        no choice the target makes under these masks can accept a draft past that point."""
        masks = torch.full((len(drafts), width, self.host.shape[1]), -1, dtype=torch.int32)
        for row, grammar in self.rows.items():
            if row < len(drafts) and not grammar.done:  # a server's step may cover only its leading rows
                del drafts[row][grammar.draft_masks(drafts[row], masks[row]) :]
        return masks.to(self.device)

    def follow(self, row: int, tokens: Sequence[int]) -> int | None:
        """Follow a row's new tokens; how many of them make its value complete (None: not yet)."""
        grammar = self.rows.get(row)
        if grammar is None:
            return None
        for i, token in enumerate(tokens):
            if grammar.accept(token):
                return i + 1
        return None

    def accept(self, tokens: torch.Tensor | Sequence[int]) -> list[int]:
        """Follow each grammar row's new token (tokens [B]); the rows whose value is complete now.
        Only the grammar rows' tokens are read back from the device."""
        live = [row for row, grammar in self.rows.items() if not grammar.done]
        if not live:
            return []
        values = tokens[live].tolist() if isinstance(tokens, torch.Tensor) else [int(tokens[row]) for row in live]
        return [row for row, token in zip(live, values) if self.rows[row].accept(token)]


# ---------------------------------------------------------------------- inside the decode step
def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] with -inf for each token whose bit is clear in `allowed` [B, ceil(V / 32)] int32.

    Every other logit is unchanged, so the filters and the noise then act on the allowed tokens
    alone. No host sync: this runs inside the compiled step.
    """
    shifts = torch.arange(32, dtype=torch.int32, device=allowed.device)
    bits = ((allowed[:, :, None] >> shifts) & 1).reshape(allowed.shape[0], -1)[:, : logits.shape[-1]]
    return logits.masked_fill(bits == 0, float("-inf"))

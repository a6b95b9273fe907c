"""The two engines every check runs on: one model, an eager engine and a compiled one.

By default the model is a tiny random Gemma 3 built in memory. It has two layers (one sliding,
one global) so that inductor compiles it quickly: on 2 CPU cores, cold caches, its two graphs
take about 25 s, against about 45 s with 7 layers.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..config import GemmaConfig
from ..engine import Engine
from ..loading import load
from ..model import Gemma3
from .report import error_text

TINY_CONFIG = GemmaConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=16,
    sliding_layers=(True, False),  # one sliding layer, one global: both kinds, compiled quickly
)
GREEDY_PROMPT_LENGTH = 5


@dataclass
class Engines:
    """The eager and compiled engines, and what the checks share about them.

    Dynamo's counters and the compiled engine's graph count are read when the pair is made, so a
    check can say what every call since then compiled. Generation goes through `generate` or
    `try_generate`, which count the compiled calls and keep the errors.
    """

    eager: Engine
    compiled: Engine
    steps: int  # how many greedy tokens the equality checks compare
    what: str  # the model, for the report
    tiny: bool  # the tiny random model, not a real checkpoint
    compiled_calls: int = 0
    errors: list[str] = field(default_factory=list)
    greedy_prompt: list[int] = field(init=False)
    graphs_at_start: int = field(init=False)

    def __post_init__(self) -> None:
        self.greedy_prompt = random_prompt(self.eager, GREEDY_PROMPT_LENGTH, seed=0)
        self.graphs_at_start = self.compiled.graph_count()
        self._counters_at_start = _dynamo_counters()
        self._eager_greedy: list[int] | None = None
        self._eager_greedy_tried = False

    def generate(self, engine: Engine, prompt: list[int], n: int, **settings) -> list[int]:
        """`n` new tokens after `prompt`, stop tokens ignored."""
        self.compiled_calls += engine.compiled
        return engine.generate_ids([prompt], max_new_tokens=n, ignore_eos=True, **settings)[0]

    def try_generate(self, engine: Engine, prompt: list[int], n: int, **settings) -> list[int] | None:
        """`generate`, or None with the error kept in `errors`: a failure is reported, not a crash."""
        try:
            return self.generate(engine, prompt, n, **settings)
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"{'compiled' if engine.compiled else 'eager'} generation raised {error_text(e)}")
            return None

    def eager_greedy(self) -> list[int] | None:
        """Eager's `steps` greedy tokens after `greedy_prompt`: the reference, generated once."""
        if not self._eager_greedy_tried:
            self._eager_greedy_tried = True
            self._eager_greedy = self.try_generate(self.eager, self.greedy_prompt, self.steps)
        return self._eager_greedy

    def dynamo_growth(self, group: str, key: str | None = None) -> int:
        """How much dynamo's counters[group] (all keys, or one) grew since the pair was made."""
        now, then = _dynamo_counters().get(group, Counter()), self._counters_at_start.get(group, Counter())
        if key is None:
            return sum(now.values()) - sum(then.values())
        return now[key] - then[key]


def tiny_model(device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> Gemma3:
    """TINY_CONFIG with fixed random weights: normal(0, 0.02), norms normal(0, 0.5) (never all zero)."""
    generator = torch.Generator().manual_seed(seed)
    model = Gemma3(TINY_CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.5 if "norm" in name else 0.02
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model.to(device, dtype).eval().requires_grad_(False)


def tiny_engines(device: torch.device, dtype: torch.dtype, steps: int, max_seq_len: int) -> Engines:
    model = tiny_model(device, dtype)
    eager, compiled = (
        Engine(model, None, device=device, dtype=dtype, compile=flag, max_seq_len=max_seq_len) for flag in (False, True)
    )
    c = TINY_CONFIG
    what = (
        f"tiny random Gemma 3 ({c.num_layers} layers, hidden {c.hidden_size}, window {c.sliding_window}, "
        f"vocab {c.vocab_size})"
    )
    return Engines(eager, compiled, steps, what, tiny=True)


def loaded_engines(
    source: str | os.PathLike, device: torch.device, dtype: torch.dtype, steps: int, max_seq_len: int
) -> Engines:
    """`source` (a checkpoint dir, .gguf or Hub id) loaded once, behind both engines."""
    eager = load(source, device=device, dtype=dtype, compile=False, max_seq_len=max_seq_len)
    compiled = Engine(
        eager.model,
        eager.tokenizer,
        device=eager.device,
        dtype=eager.dtype,
        compile=True,
        max_seq_len=eager.max_seq_len,
        defaults=eager.defaults,
        eos_ids=eager.eos_ids,
    )
    return Engines(eager, compiled, steps, str(source), tiny=False)


def random_prompt(engine: Engine, length: int, seed: int) -> list[int]:
    """<bos> and random ids from the vocab: no tokenizer needed."""
    generator = torch.Generator().manual_seed(seed)
    vocab = engine.config.vocab_size
    return [engine.config.bos_token_id] + torch.randint(4, vocab, (length - 1,), generator=generator).tolist()


def _dynamo_counters() -> dict[str, Counter]:
    from torch._dynamo.utils import counters

    return {group: Counter(values) for group, values in counters.items()}

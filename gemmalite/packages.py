"""Compiled once per machine: prefill and the decode step as AOTInductor packages on disk.

`load(compile="cached")`, the CPU default, runs a call's prefill and decode steps from packages
that torch's AOTInductor compiled ahead of time. A package loads in well under a second, where
torch.compile traces and compiles again in every process. Each package is one graph:

- "prefill" for a batch size, with the chunk length and the attended span left symbolic, so one
  package serves every prompt length and cache fill;
- "decode" for a batch size and a way of choosing (kind of sampling, logprobs, grammar mask),
  with the span symbolic;
- "verify" for a batch size and a chunk width (1 + the most draft tokens), with the span
  symbolic: speculative decoding's verification forward (speculative.py).

The span reaches a package as the size of an empty tensor, and so does the rings' span
(KVCache.ring_span, min(span, ring)), as a size of its own: the tracer cannot reason about a min.

The weights, RoPE tables and cache buffers are inputs of the graph, not constants baked into it:
a package holds code only (a few MB), and serves every checkpoint of the same shapes.

The packages live in the compile cache (`cache_dir`: $GEMMALITE_COMPILE_CACHE, else
<gemmalite's cache>/compiled; "off" turns it off). An entry's name is a digest of everything its
graph depends on: the graph and batch size, the model's config, the name, shape and dtype of every
input tensor (so dtype, quantization, max_seq_len and the rewind margin), the torch version, the
CPU and gemmalite's own source. A changed option, torch or gemmalite makes a new entry; a stale one
is never served. Each entry's JSON record repeats what the digest covers and is checked on load,
and an unreadable package is deleted, announced and built again.

Compiling is slow (about a minute per graph for the 270M on a 2-core CPU), so it never happens in
the call that needs it: a call whose graphs are missing runs eagerly, records them as wanted, and
at exit the process starts a builder (builder.py) in the background, at low priority, to
build them. Later processes find them. See Runner.kernels for how a call chooses, and how a cache
written by other kernels is never reused as if it were not (bfloat16 results are reproducible
only among calls that ran the same kernels).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

FORMAT = 1  # bump when what a package takes or gives changes
RECHECK_S = 10.0  # how often a process looks again for a package it found missing
TILE = 16  # prefill chunk lengths are multiples of this (runner.prefill_bucket)


def cache_dir() -> Path | None:
    """Where packages live: $GEMMALITE_COMPILE_CACHE ("off": nowhere), else <gemmalite's cache>/compiled."""
    value = os.environ.get("GEMMALITE_COMPILE_CACHE")
    if value == "off":
        return None
    if value:
        return Path(value).expanduser()
    from .gguf.cache import cache_root

    return cache_root() / "compiled"


@dataclasses.dataclass(frozen=True)
class Graph:
    """One package's graph: "prefill", "decode" or "verify", a batch size, and for decode how it chooses."""

    name: str
    batch: int
    kind: str = ""  # decode: sampling.sampling_kind
    with_logprobs: bool = False
    masked: bool = False  # decode: takes a grammar bitmask
    width: int = 0  # verify: the chunk's tokens

    def describe(self) -> str:
        if self.name == "prefill":
            return f"prefill (batch {self.batch})"
        if self.name == "verify":
            return f"speculative verification (batch {self.batch}, {self.width} tokens)"
        extras = (", logprobs" if self.with_logprobs else "") + (", grammar mask" if self.masked else "")
        return f"the decode step ({self.kind}{extras}, batch {self.batch})"


def _cpu() -> str:
    """The CPU as compiled code depends on it: model name and instruction-set flags."""
    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and not model.strip():
                model = value.strip()
            if name.strip() == "flags":
                flags = " ".join(sorted(value.split()))
                break
    except OSError:
        pass
    return f"{platform.machine()} {model} {torch.backends.cpu.get_cpu_capability()} {hashlib.sha256(flags.encode()).hexdigest()[:16]}"


@functools.cache
def _source_digest() -> str:
    """A digest of gemmalite's own source: any change to it may change a graph."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _signature(tensors) -> list:
    return [[name, list(t.shape), list(t.stride()), str(t.dtype).removeprefix("torch.")] for name, t in tensors]


# ------------------------------------------------------------------------ what a graph takes
def model_inputs(model) -> tuple[list[str], list[torch.Tensor]]:
    """The model's tensors that a package takes as inputs: parameters, buffers, RoPE tables."""
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    for sliding, (cos, sin) in sorted(model.rope_tables.items()):
        named[f"rope.{int(sliding)}.cos"], named[f"rope.{int(sliding)}.sin"] = cos, sin
    return list(named), list(named.values())


def cache_tensors(cache) -> list[torch.Tensor]:
    return [*cache.keys, *cache.values, cache.lengths, cache.rows]


def step_args(tokens, active, sampler, penalties, eos_ids, allowed) -> tuple:
    """A decode step's arguments as its package takes them (named tuples as plain tuples)."""
    return tokens, active, None if sampler is None else tuple(sampler), tuple(penalties), eos_ids, allowed


def example_args(runner, graph: Graph) -> tuple:
    """Inputs of the graph's shapes and dtypes, to trace with."""
    from .sampling import GREEDY, SamplingSettings, penalties, sampler_state

    B, device = graph.batch, runner.device
    if graph.name in ("prefill", "verify"):  # a chunk of ids [B, T] and each row's count of new ones
        length = graph.width
        if graph.name == "prefill":
            shortest, longest = runner.chunk_lengths(B)
            length = shortest if shortest == longest else 2 * TILE  # one tile would be traced as a constant
        return torch.zeros(B, length, dtype=torch.long, device=device), torch.ones(B, dtype=torch.long, device=device)
    vocab = runner.config.vocab_size
    settings = SamplingSettings(temperature=1.0, seed=0)
    sampler = None if graph.kind == GREEDY else sampler_state(settings, B, device)
    allowed = torch.zeros(B, -(-vocab // 32), dtype=torch.int32, device=device) if graph.masked else None
    tokens = torch.ones(B, dtype=torch.long, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    return step_args(tokens, active, sampler, penalties([settings] * B, [[1]] * B, vocab, device), runner.eos_tensor([1]), allowed)


def identity(runner, graph: Graph) -> dict:
    """Everything `graph` on this runner depends on: the entry's record, and (digested) its name."""
    names, weights = model_inputs(runner.model)
    cache = runner.new_cache(graph.batch, device="meta")
    args = [a for a in torch.utils._pytree.tree_leaves(example_args(runner, graph)) if a is not None]
    return {
        "format": FORMAT,
        "graph": dataclasses.asdict(graph),
        "config": {k: v for k, v in sorted(vars(runner.config).items())},
        "inputs": _signature(zip(names, weights)) + _signature((f"cache.{i}", t) for i, t in enumerate(cache_tensors(cache))),
        "args": _signature((f"arg.{i}", t) for i, t in enumerate(args)),
        "spans": cache.spans(),
        "device": str(runner.device),
        "torch": torch.__version__,
        "cpu": _cpu(),
        "gemmalite": _source_digest(),
    }


def entry_name(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------ the runtime side
class _Package:
    """A loaded package, called as the traced module was. AOTInductor's own loader class is not
    used: importing it loads torch's compiler stack (seconds), and it parses its call spec anew on
    every call."""

    def __init__(self, path: Path):
        from torch.utils import _pytree as pytree

        self.pytree = pytree
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        self.out_spec = pytree.treespec_loads(self.loader.get_call_spec()[1])

    def __call__(self, model: list[torch.Tensor], cache: list[torch.Tensor], args: tuple, spanners: tuple):
        # The traced call's leaves in order; the model's hundreds of tensors are a flat list already.
        flat = [*model, *cache, *(x for x in self.pytree.tree_leaves(args) if isinstance(x, torch.Tensor)), *spanners]
        return self.pytree.tree_unflatten(self.loader.boxed_run(flat), self.out_spec)


class Packages:
    """A runner's view of the compile cache: the packages it loaded, and the ones it wants built."""

    def __init__(self, runner, root: Path | None, recipe: dict | None):
        self.runner = runner
        self.root = root
        self.recipe = recipe  # how to load this model again (see loading.load), for the builder
        self.loaded: dict[Graph, Callable] = {}
        self.missing: dict[Graph, float] = {}  # graph -> when it was last looked for
        self.wanted: set[Graph] = set()
        self._names: dict[Graph, str] = {}
        self.inputs: list[torch.Tensor] | None = None  # the model's tensors, as packages take them
        self.spanners: dict[int, tuple] = {}  # empty tensors per span: their shapes are the span and the rings' span
        # Told of a cache entry that could not be read (it is then deleted and built again).
        self.on_notice: Callable[[str], None] = lambda text: print(f"gemmalite: {text}", file=sys.stderr)
        self._atexit = False

    def kernels(self, batch_size: int, kind: str, with_logprobs: bool, masked: bool, width: int = 0) -> "Kernels | None":
        """A call's packaged prefill and decode step, and with `width` (a speculative call's chunk)
        its verification, when all are here (see Runner.kernels)."""
        prefill = self.get(Graph("prefill", batch_size))
        decode = self.get(Graph("decode", batch_size, kind, with_logprobs, masked))
        verify = self.get(Graph("verify", batch_size, width=width)) if width else None
        if prefill is None or decode is None or (width and verify is None):
            return None
        if self.inputs is None:
            self.inputs = model_inputs(self.runner.model)[1]
        return Kernels(self, prefill, decode, verify)

    def run(self, package: Callable, cache, args: tuple, span: int):
        """Call a package on the model's tensors and the cache's; the spans reach it as shapes."""
        if span not in self.spanners:
            device = self.runner.device
            self.spanners[span] = (torch.empty(span, device=device), torch.empty(cache.ring_span(span), device=device))
        return package(self.inputs, cache_tensors(cache), args, self.spanners[span])

    def name(self, graph: Graph) -> str:
        if graph not in self._names:
            self._names[graph] = entry_name(identity(self.runner, graph))
        return self._names[graph]

    def get(self, graph: Graph) -> Callable | None:
        """The package's callable, loaded on first use; None (and wanted) when there is none yet."""
        if graph in self.loaded:
            return self.loaded[graph]
        if self.root is None:
            return None
        if time.monotonic() - self.missing.get(graph, -RECHECK_S) < RECHECK_S:
            return None
        path = self.root / f"{self.name(graph)}.pt2"
        fn = self._load(graph, path) if path.is_file() else None
        if fn is None:
            self.missing[graph] = time.monotonic()
            if not path.with_suffix(".failed").exists():  # a graph that cannot be built stays eager
                self.want(graph)
            return None
        self.loaded[graph] = fn
        self.missing.pop(graph, None)
        return fn

    def _load(self, graph: Graph, path: Path) -> Callable | None:
        try:
            record = json.loads(path.with_suffix(".json").read_text())
            expected = json.loads(json.dumps(identity(self.runner, graph), sort_keys=True, default=str))
            if record != expected:
                raise ValueError("its record does not match the graph asked for")
            return _Package(path)
        except Exception as e:  # a torn, foreign or corrupt entry: never served, built again
            self.on_notice(f"compile cache entry {path.name} is unreadable ({type(e).__name__}: {e}); it will be rebuilt")
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
                path.with_suffix(".json").unlink(missing_ok=True)
            return None

    def want(self, graph: Graph) -> None:
        """Record a graph for the background builder, started when this process exits."""
        if self.recipe is None or self.root is None:
            return
        self.wanted.add(graph)
        if not self._atexit:
            atexit.register(self.build_in_background)
            self._atexit = True

    def requests(self) -> list[dict]:
        return [{"recipe": self.recipe, "graph": dataclasses.asdict(g), "name": self.name(g)} for g in sorted(self.wanted, key=str)]

    def build_in_background(self) -> subprocess.Popen | None:
        """Queue the wanted graphs and start a low-priority builder, detached from this process."""
        try:
            return self._start_builder()
        except OSError as e:  # a read-only or full cache: the calls simply stay eager
            self.on_notice(f"could not start the compile cache's builder in {self.root} ({e}); calls stay eager")
            return None

    def _start_builder(self) -> subprocess.Popen | None:
        todo = [r for r in self.requests() if not (self.root / f"{r['name']}.pt2").exists()]
        if not todo:
            return None
        queue = self.root / "queue"
        queue.mkdir(parents=True, exist_ok=True)
        for request in todo:
            target = queue / f"{request['name']}.json"
            target.with_suffix(".tmp").write_text(json.dumps(request))
            os.replace(target.with_suffix(".tmp"), target)
        self.wanted.clear()
        log = open(self.root / "build.log", "ab")
        return subprocess.Popen(
            [sys.executable, "-c", "import sys; from gemmalite.builder import main; main(sys.argv[1])", str(self.root)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "GEMMALITE_COMPILE_CACHE": str(self.root)},
        )  # fmt: skip


class Kernels:
    """A call's packaged prefill, decode step and verification (see Runner.kernels)."""

    name = "packaged"

    def __init__(self, packages: Packages, prefill: Callable, decode: Callable, verify: Callable | None = None):
        self.packages, self._prefill, self._decode, self._verify = packages, prefill, decode, verify

    def prefill(self, cache, args: tuple, span: int) -> torch.Tensor:
        return self.packages.run(self._prefill, cache, args, span)

    def decode(self, cache, args: tuple, span: int):
        tokens, active, chosen = self.packages.run(self._decode, cache, args, span)
        return tokens, active, None if chosen is None else tuple(chosen)

    def verify(self, cache, args: tuple, span: int) -> torch.Tensor:
        return self.packages.run(self._verify, cache, args, span)

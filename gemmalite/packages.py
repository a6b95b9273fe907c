"""Compiled once per machine: prefill and the decode step as AOTInductor packages on disk.

`load(compile="cached")`, the CPU default, runs a call's prefill and decode steps from packages
that torch's AOTInductor compiled ahead of time. A package loads in well under a second, where
torch.compile traces and compiles again in every process. Each package is one graph:

- "prefill" for a batch size, with the chunk length and the attended span left symbolic, so one
  package serves every prompt length and cache fill;
- "decode" for a batch size and a way of choosing (kind of sampling, logprobs, grammar mask),
  with the span symbolic.

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
at exit the process starts a builder (`main`) in the background, at low priority, to
build them. Later processes find them. See Runner.kernels for how a call chooses, and how a cache
written by other kernels is never reused as if it were not (bfloat16 results are reproducible
only among calls that ran the same kernels).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import fcntl
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
    """One package's graph: "prefill" or "decode", a batch size, and for decode how it chooses."""

    name: str
    batch: int
    kind: str = ""  # decode: sampling.sampling_kind
    with_logprobs: bool = False
    masked: bool = False  # decode: takes a grammar bitmask

    def describe(self) -> str:
        if self.name == "prefill":
            return f"prefill (batch {self.batch})"
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


class _Traced(torch.nn.Module):
    """prefill_chunk or decode_step as a module whose every tensor is an input, for torch.export.

    The model and a cache template are held outside the module's attributes, so export lifts no
    parameter into a constant: the traced call swaps the inputs in for the model's tensors.
    """

    def __init__(self, runner, graph: Graph, names: list[str]):
        super().__init__()
        self._held = (runner, graph, names)

    def forward(self, weights, cache_tensors, args, spanner):
        from .runner import decode_step, prefill_chunk
        from .sampling import Penalties, SamplerState

        runner, graph, names = self._held
        model = runner.model
        named = dict(zip(names, weights))
        rope = {s: (named.pop(f"rope.{int(s)}.cos"), named.pop(f"rope.{int(s)}.sin")) for s in (True, False)}
        cache = _cache_on(runner, graph.batch, cache_tensors)
        saved, model.rope_tables = model.rope_tables, rope
        try:
            with torch.nn.utils.stateless._reparametrize_module(model, named):
                if graph.name == "prefill":
                    ids, n_new = args
                    return prefill_chunk(model, cache, ids, n_new, spanner.shape[0])
                tokens, active, sampler, penalties, eos_ids, allowed = args
                sampler = None if sampler is None else SamplerState(*sampler)
                return decode_step(
                    model, cache, tokens, active, sampler, Penalties(*penalties), eos_ids,
                    graph.kind, graph.with_logprobs, spanner.shape[0], allowed,
                )  # fmt: skip
        finally:
            model.rope_tables = saved


def _cache_on(runner, batch: int, tensors):
    """A cache of `batch` rows whose buffers are `tensors` (keys..., values..., lengths, rows)."""
    template = runner.new_cache(batch, device="meta")
    cache = copy.copy(template)
    n = len(template.keys)
    cache.keys, cache.values = list(tensors[:n]), list(tensors[n : 2 * n])
    cache.lengths, cache.rows = tensors[2 * n], tensors[2 * n + 1]
    return cache


def cache_tensors(cache) -> list[torch.Tensor]:
    return [*cache.keys, *cache.values, cache.lengths, cache.rows]


def flat_args(graph: Graph, args: tuple) -> tuple:
    """A step's arguments as the package takes them (named tuples as plain tuples)."""
    if graph.name == "prefill":
        return tuple(args)
    tokens, active, sampler, penalties, eos_ids, allowed = args
    return tokens, active, None if sampler is None else tuple(sampler), tuple(penalties), eos_ids, allowed


def _chunk_lengths(runner, batch: int) -> tuple[int, int]:
    """The shortest and longest compiled prefill chunk (see runner.prefill_bucket)."""
    from .runner import prefill_bucket

    width = runner.prefill_width(runner.new_cache(batch, device="meta"))
    return prefill_bucket(1, width), width


def example_args(runner, graph: Graph) -> tuple:
    """Inputs of the graph's shapes and dtypes, to trace with."""
    from .sampling import GREEDY, SamplingSettings, penalties, sampler_state

    B, device = graph.batch, runner.device
    if graph.name == "prefill":
        shortest, longest = _chunk_lengths(runner, B)
        length = shortest if shortest == longest else 2 * TILE  # one tile would be traced as a constant
        return torch.zeros(B, length, dtype=torch.long, device=device), torch.ones(B, dtype=torch.long, device=device)
    vocab = runner.config.vocab_size
    settings = SamplingSettings(temperature=1.0, seed=0)
    sampler = None if graph.kind == GREEDY else sampler_state(settings, B, device)
    allowed = torch.zeros(B, -(-vocab // 32), dtype=torch.int32, device=device) if graph.masked else None
    tokens = torch.ones(B, dtype=torch.long, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    return flat_args(graph, (tokens, active, sampler, penalties([settings] * B, [[1]] * B, vocab, device), runner.eos_tensor([1]), allowed))


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


# ------------------------------------------------------------------------ building
def build(runner, graph: Graph, root: Path) -> Path:
    """Export `graph` of this runner, compile it with AOTInductor and publish it in `root`."""
    from torch.export import Dim

    record = identity(runner, graph)
    name = entry_name(record)
    names, weights = model_inputs(runner.model)
    cache = runner.new_cache(graph.batch)
    spans = cache.spans()
    spanner = torch.empty(spans[0], device=runner.device)
    args = example_args(runner, graph)
    tensors = cache_tensors(cache)
    leaves = lambda tree: torch.utils._pytree.tree_map(lambda _: None, tree)  # noqa: E731
    dynamic = [leaves(weights), leaves(tensors), leaves(args), None]
    if len(spans) > 1:  # a cache shorter than the first span has one span: nothing to leave symbolic
        dynamic[3] = {0: Dim("span", min=spans[0], max=spans[-1])}
    shortest, longest = _chunk_lengths(runner, graph.batch)
    if graph.name == "prefill" and longest > shortest:
        # Chunks are 16, 32, ... tokens long (runner.prefill_bucket): a symbolic number of 16-token
        # tiles, whose attention rows need no padding the tracer would have to reason about.
        if shortest != TILE or longest % TILE:
            raise ValueError(f"prefill chunks of {shortest} to {longest} tokens are not whole {TILE}-token tiles")
        dynamic[2] = ({1: TILE * Dim("tiles", min=1, max=longest // TILE)}, None)
    with torch.no_grad():
        program = torch.export.export(
            _Traced(runner, graph, names), (weights, tensors, args, spanner), dynamic_shapes=tuple(dynamic), strict=False
        )
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{name}.{os.getpid()}.pt2"
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(staging))
        (root / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
        os.replace(staging, root / f"{name}.pt2")  # appears whole or not at all
    finally:
        staging.unlink(missing_ok=True)
    return root / f"{name}.pt2"


# ------------------------------------------------------------------------ the runtime side
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
        # Told of a cache entry that could not be read (it is then deleted and built again).
        self.on_notice: Callable[[str], None] = lambda text: print(f"gemmalite: {text}", file=sys.stderr)
        self._atexit = False

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
            return torch._inductor.aoti_load_package(str(path))
        except Exception as e:  # a torn, foreign or corrupt entry: never served, built again
            self.on_notice(f"compile cache entry {path.name} is unreadable ({type(e).__name__}: {e}); it will be rebuilt")
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
            [sys.executable, "-c", "import sys; from gemmalite.packages import main; main(sys.argv[1])", str(self.root)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "GEMMALITE_COMPILE_CACHE": str(self.root)},
        )  # fmt: skip


def build_queue(root: Path) -> int:
    """Build every queued request in `root` (one builder at a time); how many were built."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another builder is at work, and takes new requests as it goes
        built, engines = 0, {}
        while requests := sorted((root / "queue").glob("*.json")):
            for path in requests:
                request = json.loads(path.read_text())
                if not (root / f"{request['name']}.pt2").exists():
                    built += _build_request(request, root, engines)
                path.unlink(missing_ok=True)
        return built


def _build_request(request: dict, root: Path, engines: dict) -> int:
    from .loading import load

    key = json.dumps(request["recipe"], sort_keys=True)
    started = time.perf_counter()
    graph = Graph(**request["graph"])
    try:
        if key not in engines:
            engines[key] = load(**request["recipe"], compile=False, vision=False)
        if entry_name(identity(engines[key].runner, graph)) != request["name"]:
            # Asked for by another version of gemmalite or torch: this one would build another graph.
            print(f"skipped {request['name']}: the recipe no longer gives that graph", flush=True)
            return 0
        path = build(engines[key].runner, graph, root)
    except Exception as e:  # noqa: BLE001 - the builder reports, marks it, and goes on with the rest
        text = f"could not build {request['name']} ({request['graph']}): {type(e).__name__}: {e}"
        print(text, flush=True)
        (root / f"{request['name']}.failed").write_text(text + "\n")
        return 0
    print(f"built {graph.describe()} as {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return 1


def main(root: str) -> None:
    """The background builder (see Packages.build_in_background)."""
    os.nice(19)  # it yields the CPU to whatever the user runs meanwhile
    build_queue(Path(root))

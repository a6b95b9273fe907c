"""The compile cache's builder: traces prefill, the decode step and verification, compiles them with AOTInductor.

packages.py says what a package is and how a process finds it. This module makes them: `build`
exports one graph of a runner with every tensor as an input (torch.export, the chunk length and
span left symbolic), compiles it and publishes it whole; `main` is the background builder that
a process starts at exit (see Packages.build_in_background), working through the queue of
graphs that processes wanted, one builder at a time, at the lowest CPU priority.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import time
from pathlib import Path

import torch

from .packages import TILE, Graph, cache_tensors, entry_name, example_args, identity, model_inputs
from .runner import decode_step, prefill_chunk, verify_chunk
from .sampling import Penalties, SamplerState


class _Traced(torch.nn.Module):
    """prefill_chunk, decode_step or verify_chunk as a module whose every tensor is an input, for torch.export.

    The model and a cache template are held outside the module's attributes, so export lifts no
    parameter into a constant: the traced call swaps the inputs in for the model's tensors.
    """

    def __init__(self, runner, graph: Graph, names: list[str]):
        super().__init__()
        self._held = (runner, graph, names)

    def forward(self, weights, cache_tensors, args, spanners):
        runner, graph, names = self._held
        spanner, ring_spanner = spanners  # their sizes: the global span and the rings' (KVCache.ring_span)
        model = runner.model
        named = dict(zip(names, weights))
        rope = {s: (named.pop(f"rope.{int(s)}.cos"), named.pop(f"rope.{int(s)}.sin")) for s in (True, False)}
        cache = _cache_on(runner, graph.batch, cache_tensors)
        cache.traced_ring_span = ring_spanner.shape[0]
        saved, model.rope_tables = model.rope_tables, rope
        try:
            with torch.nn.utils.stateless._reparametrize_module(model, named):
                if graph.name in ("prefill", "verify"):
                    ids, n_new = args
                    chunk = prefill_chunk if graph.name == "prefill" else verify_chunk
                    return chunk(model, cache, ids, n_new, spanner.shape[0])
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


def build(runner, graph: Graph, root: Path) -> Path:
    """Export `graph` of this runner, compile it with AOTInductor and publish it in `root`."""
    from torch.export import Dim

    record = identity(runner, graph)
    name = entry_name(record)
    names, weights = model_inputs(runner.model)
    cache = runner.new_cache(graph.batch)
    spans = cache.spans()
    spanners = (torch.empty(spans[0], device=runner.device), torch.empty(cache.ring_span(spans[0]), device=runner.device))
    args = example_args(runner, graph)
    tensors = cache_tensors(cache)
    leaves = lambda tree: torch.utils._pytree.tree_map(lambda _: None, tree)  # noqa: E731
    dynamic = [leaves(weights), leaves(tensors), leaves(args), None]
    # A cache shorter than the first span has one span, and a ring shorter than it one ring span:
    # nothing to leave symbolic. The two are sizes of their own (the ring's is min(span, ring),
    # which the tracer cannot reason about), each taken by a graph that serves every span.
    rings = sorted({cache.ring_span(s) for s in spans})
    dynamic[3] = (
        {0: Dim("span", min=spans[0], max=spans[-1])} if len(spans) > 1 else None,
        {0: Dim("ring_span", min=rings[0], max=rings[-1])} if len(rings) > 1 else None,
    )
    shortest, longest = runner.chunk_lengths(graph.batch)
    if graph.name == "prefill" and longest > shortest:
        # Chunks are 16, 32, ... tokens long (runner.prefill_bucket): a symbolic number of 16-token
        # tiles, whose attention rows need no padding the tracer would have to reason about.
        if shortest != TILE or longest % TILE:
            raise ValueError(f"prefill chunks of {shortest} to {longest} tokens are not whole {TILE}-token tiles")
        dynamic[2] = ({1: TILE * Dim("tiles", min=1, max=longest // TILE)}, None)
    with torch.no_grad():
        program = torch.export.export(
            _Traced(runner, graph, names), (weights, tensors, args, spanners), dynamic_shapes=tuple(dynamic), strict=False
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

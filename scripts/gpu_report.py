#!/usr/bin/env python
"""The parts of the GPU report; scripts/gpu_report.sh runs each as its own process, under a cap.

    python scripts/gpu_report.py PART --out OUT_DIR [--device cuda|cpu] [--quick | --tiny] [--task TASK]

PART is one of: header, prepare, check, warm (with --task), warm-summary, compare, decode, kernels
(the kernel counts of `decode` alone), 1b, memory. Every figure is printed, appended as
one JSON line to OUT/figures.jsonl and as one markdown row to OUT/report.md the moment it is
measured, so a part killed by its cap leaves everything it measured before.

Weights are random, at the Gemma 3 preset shapes (no kernel depends on the values), saved once
per shape with transformers so that both engines read the same checkpoint. `--quick` shrinks
every shape to two layers (one sliding, one global) and a 32k vocab, so the same parts run on a
CPU in minutes; `--tiny` (tests) shrinks further.

Compiling dominates the budget: about a minute per graph on the H100 machine, for one prefill
graph per padded chunk length and batch size, and one decode graph per batch size and sampling
kind. So the `warm` tasks compile every graph the later parts use, all at once in separate
processes while `gemmalite check` runs (compiling is mostly single-threaded Python); inductor's
on-disk cache then hands the graphs to the measuring parts, which run alone. Each part says how
many of its graphs came from that cache.

Kernels per decode step, two ways:
- On CUDA, torch.profiler: kernels the GPU ran, cudaGraphLaunch calls and kernel launches from
  the CPU, per step. The per-step figure is the difference between two generations of different
  lengths divided by the extra steps, so prefill and per-call work cancel out. Kernels replayed
  inside a CUDA graph are recorded by CUPTI as ordinary kernel activity.
- On any device (the device-independent figures): for the compiled step, the kernels in the code
  inductor generated for the decode graph, read from the wrapper module it loaded: one fused
  kernel per generated C++ or Triton kernel call, plus each extern call (matmuls, attention,
  fallback ops). For eager, the aten ops one decode step dispatches that do work (views and
  allocations excluded), counted with a TorchDispatchMode; on a GPU each launches at least one
  kernel. Fusion choices differ somewhat between the C++ and Triton backends, so compare a
  device's compiled count with the same device's.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemmalite
from gemmalite.config import PRESETS, GemmaConfig
from gemmalite.engine import Engine
from gemmalite.packing import weight_bytes

SAMPLED = {"temperature": 1.0, "top_k": 64, "top_p": 0.95, "seed": 0}  # Gemma IT defaults


# ---------------------------------------------------------------------- settings per mode
@dataclass(frozen=True)
class Settings:
    device: torch.device
    mode: str  # "full" (the preset shapes), "quick" or "tiny"
    runs: int  # timed runs per figure (the median is reported)
    decode_budget_s: float  # seconds of decoding per figure, all runs together: slow engines get fewer tokens
    min_tokens: int
    max_tokens: int
    static_tokens: int  # transformers' static cache is sized for prompt + new tokens: one fixed count, or it recompiles
    short_prompt: int
    long_prompt: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def max_seq_len(self) -> int:
        # The same in every process, so that inductor's on-disk cache serves every part the same graphs.
        return self.long_prompt + 256

    def config(self, shape: str) -> GemmaConfig:
        full = PRESETS[shape]()
        if self.mode == "full":
            return full
        if self.mode == "quick":
            return replace(full, num_layers=2, sliding_layers=(True, False), vocab_size=32_768)
        hidden = 64 if shape == "270m" else 128
        return replace(
            full, vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=2, num_heads=4,
            num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=16, sliding_layers=(True, False),
        )

    def label(self, shape: str) -> str:
        name = {"270m": "270M", "1b": "1B"}[shape]
        if self.mode == "full":
            return f"Gemma 3 {name} shape"
        c = self.config(shape)
        return f"Gemma 3 {name} shape cut to {c.num_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}"

    def tokens_for(self, seconds_per_token: float) -> int:
        """New tokens per run: what fits the decode budget at the probed speed, within [min, max]."""
        fits = self.decode_budget_s / self.runs / max(seconds_per_token, 1e-6)
        return int(max(self.min_tokens, min(self.max_tokens, fits)))


def settings(device: str, quick: bool, tiny: bool) -> Settings:
    dev = torch.device(device)
    if tiny:
        return Settings(dev, "tiny", runs=1, decode_budget_s=0.5, min_tokens=4, max_tokens=16, static_tokens=8,
                        short_prompt=32, long_prompt=512)
    if quick:
        return Settings(dev, "quick", runs=2, decode_budget_s=1.5, min_tokens=8, max_tokens=64, static_tokens=32,
                        short_prompt=128, long_prompt=1024)
    return Settings(dev, "full", runs=3, decode_budget_s=3.0, min_tokens=16, max_tokens=512, static_tokens=256,
                    short_prompt=128, long_prompt=4096)


# ---------------------------------------------------------------------- writing figures
class Report:
    """Appends to OUT/report.md and OUT/figures.jsonl, one open-write-close per figure."""

    def __init__(self, out: Path, part: str):
        self.out, self.part = out, part
        self.md, self.jsonl = out / "report.md", out / "figures.jsonl"
        self.columns = 4

    def text(self, text: str) -> None:
        print(text, flush=True)
        with open(self.md, "a") as f:
            f.write(text + "\n")

    def section(self, title: str, columns=("engine", "figure", "value", "detail")) -> None:
        self.columns = len(columns)
        self.text(f"\n## {title}\n\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")

    def row(self, *cells, **fields) -> None:
        """One markdown row and one JSON line (fields, plus the part and the time)."""
        self.markdown_row(*cells)
        self.record(fields)

    def markdown_row(self, *cells) -> None:
        cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in cells]
        cells += [""] * (self.columns - len(cells))
        self.text("| " + " | ".join(cells) + " |")

    def record(self, fields: dict) -> None:
        """One JSON line: the part, the fields, the time of day."""
        line = json.dumps({"part": self.part, **fields, "time": time.strftime("%H:%M:%S")})
        with open(self.jsonl, "a") as f:
            f.write(line + "\n")

    def figure(self, engine: str, name: str, value: float, unit: str, detail: str = "", **fields) -> None:
        value = float(value)
        self.row(engine, name, shown(value, unit), detail, engine=engine, figure=name, value=value, unit=unit,
                 detail=detail, **fields)


def shown(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return str(value)
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.1f} s"
    if unit == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "count":
        return f"{value:.0f}" if value == int(value) else f"{value:.1f}"
    return f"{value:.3g} {unit}" if value < 100 else f"{value:,.0f} {unit}"


# ---------------------------------------------------------------------- checkpoints and engines
def checkpoint(s: Settings, shape: str) -> Path:
    """Random weights at the shape, saved once (by transformers) in the temp dir and reused by every part."""
    directory = Path(tempfile.gettempdir()) / "gemmalite-gpu-report" / f"{shape}-{s.mode}"
    if (directory / "config.json").exists():
        return directory
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    c = s.config(shape)
    hf = Gemma3TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, query_pre_attn_scalar=c.query_pre_attn_scalar, sliding_window=c.sliding_window,
        layer_types=["sliding_attention" if s else "full_attention" for s in c.sliding_layers],
        max_position_embeddings=c.max_position_embeddings,
    )
    torch.manual_seed(0)
    with torch.device(s.device):  # random init is quicker on a GPU
        model = Gemma3ForCausalLM(hf).to(s.dtype)
    partial = directory.with_name(f"{directory.name}.{os.getpid()}")
    model.save_pretrained(partial)
    try:
        partial.rename(directory)  # whole or not at all: parts may run at once
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def load(s: Settings, shape: str, compile: bool) -> Engine:
    """Without prompt reuse: a repeated prompt must be prefilled again, or time to first token means nothing."""
    return gemmalite.load(
        checkpoint(s, shape), device=s.device, dtype=s.dtype, compile=compile, max_seq_len=s.max_seq_len,
        reuse_prompts=False,
    )


def eager_twin(engine: Engine) -> Engine:
    """An eager engine on the same model (no second copy of the weights)."""
    return Engine(engine.model, None, device=engine.device, dtype=engine.dtype, compile=False,
                  max_seq_len=engine.max_seq_len, reuse_prompts=False)


def random_prompt(config: GemmaConfig, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [config.bos_token_id] + torch.randint(10, config.vocab_size, (length - 1,), generator=g).tolist()


def prompts(config: GemmaConfig, batch: int, length: int) -> list[list[int]]:
    return [random_prompt(config, length, seed=1 + row) for row in range(batch)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cache_counts() -> Counter:
    from torch._dynamo.utils import counters

    return Counter(counters["inductor"])


def from_cache_text(before: Counter) -> str:
    """How the graphs compiled since `before` were made: read from inductor's on-disk cache, or compiled."""
    now = cache_counts()
    hits, misses = now["fxgraph_cache_hit"] - before["fxgraph_cache_hit"], now["fxgraph_cache_miss"] - before["fxgraph_cache_miss"]
    if not hits and not misses:
        return "nothing compiled"
    return f"{hits} graph(s) from inductor's on-disk cache, {misses} compiled here"


# ---------------------------------------------------------------------- timing one call
@dataclass
class Run:
    ttft_s: float
    decode_s: float
    steps: int  # decode steps after the first token
    batch: int

    @property
    def tok_s(self) -> float:
        return self.batch * self.steps / self.decode_s if self.decode_s > 0 else float("nan")


def gemmalite_run(engine: Engine, batch_prompts, n: int, **sampling) -> Run:
    engine.generate_ids(batch_prompts, max_new_tokens=n, ignore_eos=True, **sampling)
    stats = engine.last_stats
    return Run(stats.prefill_s, stats.decode_s, max(stats.new_tokens) - 1, len(batch_prompts))


def transformers_run(model, prompt: list[int], n: int, static: bool) -> Run:
    """One generate() call; the times of its tokens come from a streamer, which gets each token on the host."""
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []  # put() gets the prompt, then each new token

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    device = model.device
    ids = torch.tensor([prompt], device=device)
    config = GenerationConfig(
        max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
        cache_implementation="static" if static else None,
    )
    if static and device.type != "cuda":
        from transformers import CompileConfig

        config.compile_config = CompileConfig()
        config.compile_config._compile_all_devices = True  # generate compiles by itself on CUDA only
    streamer = TimingStreamer()
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer)
    sync(device)
    t = streamer.times  # [prompt, token 1, ..., token n]
    return Run(t[1] - started, t[-1] - t[1], len(t) - 2, 1)


def load_transformers(path: Path, s: Settings):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=s.dtype).to(s.device).eval()


# ---------------------------------------------------------------------- measuring an engine
def first_call(r: Report, engine_name: str, call, what: str = "", **fields) -> float:
    """Time the first call (compiling, where there is anything to compile) and report it."""
    before = cache_counts()
    started = time.perf_counter()
    call()
    seconds = time.perf_counter() - started
    detail = (f"{what}; " if what else "") + from_cache_text(before)
    r.figure(engine_name, "first_call_s", seconds, "s", detail, **fields)
    return seconds


def decode_figures(r: Report, s: Settings, engine_name: str, call, *, batch: int = 1, fixed_tokens: int | None = None,
                   how: str = "", **fields) -> dict:
    """Time to first token and decode tok/s of `call(n)` (which returns a Run), each the median of s.runs runs.

    Returns {"ttft_s": ..., "decode_tok_s": ...}.
    """
    ((n, runs),) = timed_runs(s, [call], fixed_tokens)
    return report_runs(r, s, engine_name, n, runs, batch=batch, how=how, **fields)


def timed_runs(s: Settings, calls: list, fixed_tokens: int | None = None) -> list[tuple[int, list[Run]]]:
    """(new tokens, runs) for each call, the calls taking turns within each run so that all see the same machine.

    Without fixed_tokens, a short probe sets each call's number of new tokens, so that a slow
    engine spends no more time than a fast one.
    """
    if fixed_tokens is None:
        probes = [call(s.min_tokens) for call in calls]
        counts = [s.tokens_for(probe.decode_s / max(probe.steps, 1)) for probe in probes]
    else:
        counts = [fixed_tokens] * len(calls)
    runs = [[] for _ in calls]
    for _ in range(s.runs):
        for call, n, done in zip(calls, counts, runs):
            done.append(call(n))
    return list(zip(counts, runs))


def report_runs(r: Report, s: Settings, engine_name: str, n: int, runs: list[Run], *, batch: int = 1, how: str = "",
                **fields) -> dict:
    ttft = statistics.median(run.ttft_s for run in runs)
    tok_s = statistics.median(run.tok_s for run in runs)
    detail = f"median of {len(runs)} run(s), {n} new tokens" + (f" x {batch} rows" if batch > 1 else "") + how
    r.figure(engine_name, f"ttft_s@{s.short_prompt}", ttft, "s", detail, batch=batch, **fields)
    r.figure(engine_name, f"decode_tok_s@b{batch}", tok_s, "tok/s", detail, batch=batch, tokens=n, **fields)
    return {"ttft_s": ttft, "decode_tok_s": tok_s}


def ratio(r: Report, numerator: tuple[str, dict], denominator: tuple[str, dict]) -> None:
    (a, fa), (b, fb) = numerator, denominator
    if fb["decode_tok_s"] > 0:
        r.figure(f"{a} / {b}", "decode_tok_s ratio", fa["decode_tok_s"] / fb["decode_tok_s"], "x", "same process, same weights")


# ---------------------------------------------------------------------- parts
def part_header(r: Report, s: Settings, args) -> None:
    for path in (r.md, r.jsonl):
        path.unlink(missing_ok=True)
    import transformers

    if s.device.type == "cuda":
        device = f"{torch.cuda.get_device_name(s.device)} (CUDA {torch.version.cuda})"
    else:
        device = f"CPU: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    try:
        import triton

        triton_text = f"triton {triton.__version__}; "
    except ImportError:
        triton_text = ""
    commit = git_commit()
    r.text(f"# gemmalite GPU report ({s.mode} settings)\n")
    r.text(
        f"- device: {device}\n- software: torch {torch.__version__}; transformers {transformers.__version__}; "
        f"{triton_text}Python {platform.python_version()}\n- date: {time.strftime('%Y-%m-%d %H:%M %Z')}"
        + (f"\n- commit: {commit}" if commit else "")
        + f"\n- command: `bash scripts/gpu_report.sh {args.command_line}`"
        + "\n- weights: random, bfloat16, at the shapes named below; time to first token is a cold prefill "
        "(prompt reuse off)\n- every figure is also a line in figures.jsonl; a part cut off by its cap says so"
    )
    r.record({"device": device, "torch": torch.__version__, "transformers": transformers.__version__, "mode": s.mode,
              "commit": commit, "date": time.strftime("%Y-%m-%d")})


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "") if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def part_prepare(r: Report, s: Settings) -> None:
    r.section("0. Random checkpoints")
    for shape in ("270m", "1b"):
        started = time.perf_counter()
        path = checkpoint(s, shape)
        size = sum(f.stat().st_size for f in path.iterdir())
        r.figure(s.label(shape), "checkpoint_bytes", size, "bytes", f"{path}, ready in {time.perf_counter() - started:.1f} s")


CHECK_LINE = re.compile(r"^\s+(PASS|FAIL|SKIP|INFO)\s+(.+?): (.*)$")


def part_check(r: Report, s: Settings) -> int:
    command = [sys.executable, "-m", "gemmalite.cli", "check", "--device", s.device.type]
    r.section(f"1. `{' '.join(['python', *command[1:]])}`", ("status", "check", "detail"))
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc, \
            open(r.out / "check.txt", "w") as raw:
        for line in proc.stdout:
            raw.write(line)
            raw.flush()
            match = CHECK_LINE.match(line)
            if match:
                status, name, detail = match.groups()
                r.row(status, name, detail, status=status, check=name, detail=detail)
            elif line.startswith(("all checks passed", "error", "gemmalite")) or "FAILED" in line:
                r.row("summary", line.strip(), "", status="summary", detail=line.strip())
    return proc.returncode


# Each warm task compiles the graphs of some later part, in a process of its own.
WARM_TASKS = ("270m-greedy", "270m-sampled", "270m-long", "transformers-static", "1b-b1", "1b-b8")


def part_warm(r: Report, s: Settings, task: str) -> None:
    """Compile one part's graphs now, so that the part finds them in inductor's on-disk cache."""
    shape = "1b" if task.startswith("1b") else "270m"
    config = s.config(shape)
    short = prompts(config, 8 if task == "1b-b8" else 1, s.short_prompt)
    before = cache_counts()
    started = time.perf_counter()
    if task == "transformers-static":
        model = load_transformers(checkpoint(s, shape), s)
        transformers_run(model, short[0], s.static_tokens, static=True)
    else:
        engine = load(s, shape, compile=True)
        if task == "270m-long":
            engine.prefill(engine.runner.new_cache(1), [random_prompt(config, s.long_prompt, seed=7)])
        else:
            engine.generate_ids(short, max_new_tokens=2, ignore_eos=True, **(SAMPLED if task == "270m-sampled" else {}))
    seconds = time.perf_counter() - started
    detail = f"{from_cache_text(before)}; alongside the other warm-up tasks and the check"
    # JSON only: warm tasks run at once, so their markdown rows are written after them (warm-summary).
    r.record({"engine": task, "figure": "compile_s", "value": seconds, "unit": "s", "detail": detail})
    print(f"warm-up {task}: {seconds:.1f} s ({detail})", flush=True)


def part_warm_summary(r: Report, s: Settings) -> None:
    r.section("Warm-up: every later graph compiled at once (cold, in parallel with the check)")
    done = set()
    for line in r.jsonl.read_text().splitlines():
        record = json.loads(line)
        if record.get("part") == "warm":
            done.add(record["engine"])
            r.markdown_row(record["engine"], record["figure"], shown(record["value"], record["unit"]), record["detail"])
    for task in WARM_TASKS:
        if task not in done:
            r.row(task, "compile_s", "not finished", "cut off by the warm-up cap: its part compiles what is missing",
                  engine=task, figure="compile_s", detail="not finished")


def part_compare(r: Report, s: Settings) -> None:
    r.section(f"2. {s.label('270m')}, bf16, batch 1: gemmalite compiled against transformers (one process)")
    prompt = random_prompt(s.config("270m"), s.short_prompt, seed=1)
    # Cheapest first; each engine is freed before the next loads.
    hf_eager = transformers_figures(r, s, prompt, static=False)
    release()
    compiled = gemmalite_figures(r, s, prompt)
    ratio(r, ("gemmalite compiled", compiled), ("transformers eager", hf_eager))
    release()
    hf_static = transformers_figures(r, s, prompt, static=True)
    ratio(r, ("gemmalite compiled", compiled), ("transformers static+compile", hf_static))


def transformers_figures(r: Report, s: Settings, prompt: list[int], static: bool) -> dict:
    name = "transformers static+compile" if static else "transformers eager"
    started = time.perf_counter()
    model = load_transformers(checkpoint(s, "270m"), s)
    r.figure(name, "load_s", time.perf_counter() - started, "s")
    # Static: the same prompt length and token count in every call, as a new length resizes the cache and recompiles.
    n = s.static_tokens if static else s.min_tokens
    first_call(r, name, lambda: transformers_run(model, prompt, n, static),
               what="generate's own torch.compile of the decode step" if static else "")
    results = decode_figures(r, s, name, lambda n: transformers_run(model, prompt, n, static),
                             fixed_tokens=s.static_tokens if static else None)
    return results


def gemmalite_figures(r: Report, s: Settings, prompt: list[int]) -> dict:
    name = "gemmalite compiled"
    started = time.perf_counter()
    engine = load(s, "270m", compile=True)
    r.figure(name, "load_s", time.perf_counter() - started, "s")
    first_call(r, name, lambda: gemmalite_run(engine, [prompt], 8), what="prefill and greedy decode graphs")
    return decode_figures(r, s, name, lambda n: gemmalite_run(engine, [prompt], n))


def part_decode(r: Report, s: Settings) -> None:
    config = s.config("270m")
    r.section(f"3. {s.label('270m')}, bf16, batch 1: gemmalite decode, time to first token, kernels per step")
    engine = load(s, "270m", compile=True)
    eager = eager_twin(engine)
    short = [random_prompt(config, s.short_prompt, seed=1)]
    name = "gemmalite compiled"

    graphs = compile_greedy(r, engine, short)
    with NewGraphs() as sampled_graph:
        first_call(r, name, lambda: gemmalite_run(engine, short, 8, **SAMPLED), what="top-k/top-p decode graph")
    # Greedy and sampled take turns, run by run.
    (n_greedy, greedy_runs), (n_sampled, sampled_runs) = timed_runs(
        s, [lambda n: gemmalite_run(engine, short, n), lambda n: gemmalite_run(engine, short, n, **SAMPLED)]
    )
    greedy = report_runs(r, s, name, n_greedy, greedy_runs, how="; greedy", sampling="greedy")
    sampled = report_runs(r, s, name, n_sampled, sampled_runs, how="; sampled: temperature 1, top_k 64, top_p 0.95",
                          sampling="top-k/top-p")
    r.figure(name, "sampled / greedy decode_tok_s", sampled["decode_tok_s"] / greedy["decode_tok_s"], "x")

    kernel_figures(r, s, engine, eager, graphs.modules, sampled_graph.modules)

    long = [random_prompt(config, s.long_prompt, seed=7)]
    first_call(r, name, lambda: gemmalite_run(engine, long, 1), what=f"prefill graph for {s.long_prompt}-token prompts")
    runs = [gemmalite_run(engine, long, 1).ttft_s for _ in range(s.runs)]
    r.figure(name, f"ttft_s@{s.long_prompt}", statistics.median(runs), "s", f"median of {s.runs}, cold prefill")
    r.figure(name, "decode graphs", engine.graph_count(), "count", "greedy and top-k/top-p at batch 1")
    r.figure(name, "prefill graphs", engine.runner.graph_count("prefill"), "count", "one per padded chunk length")

    gemmalite_run(eager, short, 2)
    decode_figures(r, s, "gemmalite eager", lambda n: gemmalite_run(eager, short, n), how="; greedy", sampling="greedy")


def compile_greedy(r: Report, engine: Engine, short) -> NewGraphs:
    """The prefill graph first, on its own, so that the next call compiles the greedy decode graph alone."""
    name = "gemmalite compiled"
    first_call(r, name, lambda: engine.prefill(engine.runner.new_cache(1), short), what=f"prefill graph, {len(short[0])} tokens")
    with NewGraphs() as graphs:
        first_call(r, name, lambda: gemmalite_run(engine, short, 8), what="greedy decode graph")
    return graphs


def part_kernels(r: Report, s: Settings) -> None:
    """Only the kernel counts (part of `decode` too): two graphs to compile, prefill and greedy decode."""
    config = s.config("270m")
    r.section(f"Kernels per decode step: {s.label('270m')}, bf16, batch 1")
    engine = load(s, "270m", compile=True)
    graphs = compile_greedy(r, engine, [random_prompt(config, s.short_prompt, seed=1)])
    kernel_figures(r, s, engine, eager_twin(engine), graphs.modules, [])


def part_1b(r: Report, s: Settings) -> None:
    config = s.config("1b")
    r.section(f"4. {s.label('1b')}, bf16: batch 1 and 8")
    engine = load(s, "1b", compile=True)
    eager = eager_twin(engine)
    batches = {b: prompts(config, b, s.short_prompt) for b in (1, 8)}
    for batch, rows in batches.items():  # eager first: cheap, and there even if compiling runs out of time
        gemmalite_run(eager, rows, 2)
        decode_figures(r, s, "gemmalite eager", lambda n, rows=rows: gemmalite_run(eager, rows, n), batch=batch)
    name = "gemmalite compiled"
    for batch, rows in batches.items():
        reset_peak(s.device)
        first_call(r, name, lambda rows=rows: gemmalite_run(engine, rows, 8), what=f"batch {batch}: prefill and decode graphs",
                   batch=batch)
        decode_figures(r, s, name, lambda n, rows=rows: gemmalite_run(engine, rows, n), batch=batch)
        r.figure(name, f"kv_bytes@b{batch}", engine.runner.kv_bytes, "bytes", f"static, {s.max_seq_len} positions per row")
        r.figure(name, f"peak_bytes@b{batch}", peak_bytes(s.device), "bytes", peak_what(s.device))


def part_memory(r: Report, s: Settings) -> None:
    config = s.config("270m")
    r.section(f"5. Memory: {s.label('270m')}, bf16, batch 1, one compiled engine in a fresh process")
    reset_peak(s.device)
    engine = load(s, "270m", compile=True)
    name = "gemmalite compiled"
    weights = weight_bytes(engine.model)
    r.figure(name, "weight_bytes", weights, "bytes", "parameters and packed weights (the head is tied to the embedding)")
    n = s.min_tokens
    gemmalite_run(engine, [random_prompt(config, s.long_prompt, seed=7)], n)
    kv, peak = engine.runner.kv_bytes, peak_bytes(s.device)
    r.figure(name, "kv_bytes@b1", kv, "bytes",
             f"allocated once for {s.max_seq_len} positions: global layers full length, sliding layers a ring")
    r.figure(name, "peak_bytes", peak, "bytes", f"{peak_what(s.device)}, after a {s.long_prompt}-token prompt and {n} new tokens")
    if s.device.type == "cuda":
        r.figure(name, "peak_reserved_bytes", torch.cuda.max_memory_reserved(s.device), "bytes",
                 "torch.cuda.max_memory_reserved: the caching allocator's high-water mark")
        r.figure(name, "peak beyond weights and KV", peak - weights - kv, "bytes", "activations, logits, CUDA graph pools")


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: writing 5 resets the process's peak RSS (VmHWM).
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_what(device: torch.device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process (VmHWM)"


# ---------------------------------------------------------------------- kernels per decode step
class NewGraphs:
    """The wrapper modules inductor loads inside the block: one per compiled graph, cache hits included."""

    def __enter__(self):
        self.before = set(graph_modules())
        self.modules = []
        return self

    def __exit__(self, *exc):
        self.modules = [m for key, m in graph_modules().items() if key not in self.before]
        return False


def graph_modules() -> dict:
    from torch._inductor.codecache import PyCodeCache

    loaded = list(PyCodeCache.modules) + list(PyCodeCache.modules_no_attr.values())
    return {id(m): m for m in loaded if hasattr(m, "call")}


FUSED_CALL = re.compile(r"^\s*(?:cpp_fused_\w+|triton_\w+\.run|\w+_fused_\w+\.run)\(")
EXTERN_CALL = re.compile(r"\bextern_kernels\.(\w+)\(")
FALLBACK_CALL = re.compile(r"^\s*(?:[\w, ]+=\s*)?(?:torch\.ops\.|aten\.)(?:aten\.)?(\w+)\.\w+\(")
AOTI_CALL = re.compile(r"\baoti_torch_(?:cpu|cuda)_(\w+)\(")
CUSTOM_OP_CALL = re.compile(r"\baoti_torch_call_dispatcher\(\"\w+::(\w+)\"")  # custom ops, with cpp_wrapper
COPY_CALL = re.compile(r"^\s*\w+\.copy_\(|\baoti_torch_copy_\(")


def graph_kernels(module) -> Counter:
    """Kernel calls in one compiled graph's generated code, by kind: fused kernels, extern ops, copies.

    With cpp_wrapper (gemmalite's CPU default) the graph is C++ inside the module
    (`cpp_wrapper_src`); otherwise it is the Python module itself. Kernel definitions, kernel
    source strings and comments are skipped; each remaining call line is one launch.
    """
    source = getattr(module, "cpp_wrapper_src", None)
    if source:
        entry = re.search(r"void inductor_entry_impl\(.*?\n\} // inductor_entry_impl", source, re.DOTALL)
        body = entry.group(0) if entry else source
    else:
        body = re.sub(r"('''|\"\"\").*?\1", "", Path(module.__file__).read_text(), flags=re.DOTALL)
        body = body.split("\ndef benchmark_compiled_module", 1)[0]
    return count_kernel_calls(body)


def count_kernel_calls(body: str) -> Counter:
    counts = Counter()
    for line in body.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "//", 'extern "C"', "void ")):
            continue
        if FUSED_CALL.match(line):
            counts["fused"] += 1
        elif COPY_CALL.search(line):
            counts["copy"] += 1
        else:
            found = EXTERN_CALL.search(line) or AOTI_CALL.search(line) or CUSTOM_OP_CALL.search(line) or FALLBACK_CALL.match(line)
            if found and found.group(1) not in ("empty_strided", "empty", "view", "reinterpret_tensor", "as_strided"):
                counts[found.group(1).removesuffix("_out")] += 1
    return counts


def kernels_text(counts: Counter) -> str:
    extern = {k: v for k, v in counts.items() if k not in ("fused", "copy")}
    parts = [f"{counts['fused']} fused"] + [f"{v} {k}" for k, v in sorted(extern.items(), key=lambda kv: -kv[1])]
    if counts["copy"]:
        parts.append(f"{counts['copy']} copy")
    return ", ".join(parts)


# aten ops that launch no kernel: views, allocations without a fill, and reading a scalar.
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view", "_local_scalar_dense",
             "lift_fresh", "resize_", "set_", "alias", "_reshape_alias", "detach"}


def eager_ops(engine: Engine, batch_prompts, n: int) -> tuple[Counter, int]:
    """aten ops that do work, dispatched over one generation of n tokens (TorchDispatchMode sees them below autograd)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not func.is_view and name not in NO_KERNEL:
                ops[name] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        gemmalite_run(engine, batch_prompts, n)
    return ops, sum(ops.values())


def kernel_figures(r: Report, s: Settings, engine: Engine, eager: Engine, greedy_modules: list, sampled_modules: list) -> None:
    """Kernels per decode step: in the compiled graphs' code, aten ops of eager steps, and on CUDA the profiler's counts.

    A per-step figure is (count over a long generation - count over a short one) / extra steps.
    """
    config = engine.config
    short = [random_prompt(config, s.short_prompt, seed=1)]
    name = "gemmalite compiled"
    for label, modules in (("greedy", greedy_modules), ("top-k/top-p", sampled_modules)):
        if len(modules) == 1:
            counts = graph_kernels(modules[0])
            r.figure(name, f"kernels in the {label} decode graph", sum(counts.values()), "count",
                     f"inductor's generated code, {config.num_layers} layers: {kernels_text(counts)}", counts=dict(counts))
        elif modules or label == "greedy":
            r.row(name, f"kernels in the {label} decode graph", "-", f"expected one new graph module, found {len(modules)}")

    gemmalite_run(eager, short, 2)
    ops_short, total_short = eager_ops(eager, short, 1 + 8)
    ops_long, total_long = eager_ops(eager, short, 1 + 16)
    top = (ops_long - ops_short).most_common(6)
    r.figure("gemmalite eager", "aten ops per decode step", (total_long - total_short) / 8, "count",
             "TorchDispatchMode; views and allocations left out, the loop's own ops in; most: "
             + ", ".join(f"{k} {v / 8:g}" for k, v in top))

    if s.device.type != "cuda":
        return
    for label, e, extra in ((name, engine, 32), ("gemmalite eager", eager, 8)):
        a, b = cuda_profile(e, short, 1 + 8), cuda_profile(e, short, 1 + 8 + extra)
        each = {key: (b[key] - a[key]) / extra for key in ("kernels", "graph_launches", "cpu_launches", "gpu_us")}
        how = f"torch.profiler, {extra} extra steps"
        r.figure(label, "GPU kernels per decode step", each["kernels"], "count",
                 f"{how}: CUDA kernel events (inside CUDA graphs too), the loop's output copies included")
        r.figure(label, "CUDA graph launches per decode step", each["graph_launches"], "count", f"{how}: cudaGraphLaunch")
        r.figure(label, "kernel launches from the CPU per decode step", each["cpu_launches"], "count",
                 f"{how}: cudaLaunchKernel and the like")
        r.figure(label, "GPU busy per decode step", each["gpu_us"] / 1e6, "s", f"{how}: sum of kernel times")


def cuda_profile(engine: Engine, batch_prompts, n: int) -> Counter:
    """What torch.profiler records over one generation: GPU kernels (CUDA graphs' included), launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gemmalite_run(engine, batch_prompts, n)
        torch.cuda.synchronize()
    counts = Counter()
    for event in prof.events():
        name, kind = event.name, getattr(event, "activity_type", None)
        if event.device_type == DeviceType.CUDA:
            # Device events also include copies, memsets and user annotations mirrored on the GPU timeline.
            kernel = kind == "kernel" if isinstance(kind, str) else not (
                getattr(event, "is_user_annotation", False) or name.startswith(("Memcpy", "Memset"))
            )
            if kernel:
                counts["kernels"] += 1
                counts["gpu_us"] += event.time_range.elapsed_us()
        elif name.startswith(("cudaGraphLaunch", "cuGraphLaunch")):
            counts["graph_launches"] += 1
        elif name.startswith(("cudaLaunchKernel", "__cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel")):
            counts["cpu_launches"] += 1
    return counts


PARTS = {
    "header": lambda r, s, a: part_header(r, s, a),
    "prepare": lambda r, s, a: part_prepare(r, s),
    "check": lambda r, s, a: part_check(r, s),
    "warm": lambda r, s, a: part_warm(r, s, a.task),
    "warm-summary": lambda r, s, a: part_warm_summary(r, s),
    "compare": lambda r, s, a: part_compare(r, s),
    "decode": lambda r, s, a: part_decode(r, s),
    "kernels": lambda r, s, a: part_kernels(r, s),
    "1b": lambda r, s, a: part_1b(r, s),
    "memory": lambda r, s, a: part_memory(r, s),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=list(PARTS))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="two-layer shapes and few tokens (a CPU in minutes)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (tests)")
    p.add_argument("--task", choices=WARM_TASKS, help="with warm: which graphs to compile")
    p.add_argument("--command-line", default="", help="with header: the report's command line")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    s = settings(args.device, args.quick, args.tiny)
    torch.set_grad_enabled(False)
    result = PARTS[args.part](Report(args.out, args.part), s, args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

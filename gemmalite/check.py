"""`gemmalite check`: prove the compiled decode path on the machine at hand.

One call, `check()`, measures instead of assuming:

- the environment: torch and CUDA versions, the device, bf16 support, and whether inductor and
  a C++ compiler work (a small function is compiled from scratch, caches off, and run);
- on a tiny random Gemma 3 built in memory (or on `model=` when given), with two engines that
  share one model, one eager and one compiled:
  a. compiled greedy tokens equal eager ones for `steps` steps, past several ring wraps (and
     seeded sampling gives the same tokens too);
  b. the number of graphs compiled for `decode_step` stays bounded (one greedy and one sampling
     graph per batch size) over calls with different prompt lengths and sampling settings, and
     does not grow over further steps (those calls run under torch's `fail_on_recompile` stance);
  c. there are no graph breaks;
  d. on CUDA, decode steps are CUDA graph replays (counted with the profiler), and graph
     outputs kept across steps are not overwritten;
- decode speed, eager against compiled.

The tiny model has two layers (one sliding, one global) so that inductor compiles it quickly:
on 2 CPU cores, cold caches, its two graphs take about 25 s, against about 45 s with 7 layers.

Each result is a `CheckResult`: PASS, FAIL, SKIP (not applicable here, e.g. no CUDA) or INFO
(a measured figure that is not a pass/fail claim).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .config import GemmaConfig
from .engine import Engine
from .loading import parse_device, parse_dtype
from .errors import InvalidArgumentError
from .model import Gemma3
from .options import GenerationOptions

PASS, FAIL, SKIP, INFO = "PASS", "FAIL", "SKIP", "INFO"
ENVIRONMENT, CHECKS, SPEED = "Environment", "Checks", "Speed"
NO_CUDA = "skipped: no CUDA"

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

# (prompt length, sampling settings, new tokens); the first is check a, with `steps` tokens.
SAMPLED_CALLS = [
    (17, dict(temperature=0.7, seed=1), 32),
    (40, dict(temperature=1.2, top_k=20, top_p=0.9, seed=2), 32),
]
# Run once every graph exists, under fail_on_recompile: neither may compile anything.
REPEAT_GREEDY = (9, 64)  # (prompt length, new tokens)
REPEAT_SAMPLED = (33, dict(temperature=1.0, top_k=5, min_p=0.05, seed=3), 32)
SPEED_STEPS = 100
KEPT_BLOCK = 32  # on CUDA: steps whose graph outputs are held before they are read


@dataclass(frozen=True)
class CheckResult:
    section: str
    name: str
    status: str  # PASS, FAIL, SKIP or INFO
    detail: str

    @property
    def passed(self) -> bool:
        return self.status == PASS

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    @property
    def skipped(self) -> bool:
        return self.status == SKIP

    def line(self) -> str:
        return f"{self.status:<5} {self.name}: {self.detail}"


@dataclass
class CheckReport:
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no check failed (skips and figures do not count)."""
        return not self.failures

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.failed]

    def __getitem__(self, name: str) -> CheckResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(name)

    def summary(self) -> str:
        counts = Counter(r.status for r in self.results)
        verdict = "all checks passed" if self.ok else f"{counts[FAIL]} check(s) FAILED"
        return f"{verdict}: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped, in {self.seconds:.1f} s"

    def format(self) -> str:
        lines, section = [], None
        for result in self.results:
            if result.section != section:
                section = result.section
                lines.append(section)
            lines.append("  " + result.line())
        lines.append(self.summary())
        return "\n".join(lines)

    __str__ = format


def check(
    device: str | torch.device | None = None,
    model: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    steps: int = 200,
    *,
    on_result: Callable[[CheckResult], None] | None = None,
) -> CheckReport:
    """Run every check on `device` (default: cuda when available) and return the report.

    `model` (a checkpoint dir, .gguf or Hub id) replaces the tiny random model. `dtype` defaults
    to float32: the equality checks compare exact arithmetic. `on_result` sees each result as
    it is produced.
    """
    dev = parse_device(device)
    dt = torch.float32 if dtype is None else parse_dtype(dtype)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"steps must be an integer >= 1, got {steps!r}")
    started = time.perf_counter()
    report = CheckReport()

    def add(section: str, name: str, status: str, detail: str) -> None:
        result = CheckResult(section, name, status, detail)
        report.results.append(result)
        if on_result is not None:
            on_result(result)

    _environment(dev, add)
    max_seq_len = max(steps, SPEED_STEPS + 1) + 128
    if model is None:
        eager, compiled = _tiny_engines(dev, dt, max_seq_len)
        c = TINY_CONFIG
        what = (
            f"tiny random Gemma 3 ({c.num_layers} layers, hidden {c.hidden_size}, window {c.sliding_window}, "
            f"vocab {c.vocab_size})"
        )
    else:
        eager, compiled = _model_engines(model, dev, dt, max_seq_len)
        what = str(model)
    add(CHECKS, "model", INFO, f"{what}, {str(dt).removeprefix('torch.')} on {dev}; one eager and one compiled engine")
    _checks(eager, compiled, steps, add)
    _speed(eager, compiled, real=model is not None, add=add)
    report.seconds = time.perf_counter() - started
    return report


# ------------------------------------------------------------------ engines
def tiny_model(device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> Gemma3:
    """TINY_CONFIG with fixed random weights: normal(0, 0.02), norms normal(0, 0.5) (never all zero)."""
    generator = torch.Generator().manual_seed(seed)
    model = Gemma3(TINY_CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.5 if "norm" in name else 0.02
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model.to(device, dtype).eval().requires_grad_(False)


def _tiny_engines(device, dtype, max_seq_len) -> tuple[Engine, Engine]:
    model = tiny_model(device, dtype)
    eager, compiled = (
        Engine(model, None, device=device, dtype=dtype, compile=flag, max_seq_len=max_seq_len) for flag in (False, True)
    )
    return eager, compiled


def _model_engines(source, device, dtype, max_seq_len) -> tuple[Engine, Engine]:
    from .engine import load

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
    return eager, compiled


def _prompt(engine: Engine, length: int, seed: int) -> list[int]:
    """<bos> and random ids from the vocab: no tokenizer needed."""
    generator = torch.Generator().manual_seed(seed)
    vocab = engine.config.vocab_size
    return [engine.config.bos_token_id] + torch.randint(4, vocab, (length - 1,), generator=generator).tolist()


# ------------------------------------------------------------------ environment
def _environment(device: torch.device, add) -> None:
    add(ENVIRONMENT, "torch", INFO, f"{torch.__version__} (Python {platform.python_version()})")
    if torch.cuda.is_available():
        add(ENVIRONMENT, "CUDA", INFO, f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")
    elif torch.version.cuda:
        add(ENVIRONMENT, "CUDA", INFO, f"no CUDA (torch is built for CUDA {torch.version.cuda}, but no GPU is visible)")
    else:
        add(ENVIRONMENT, "CUDA", INFO, "no CUDA (a CPU-only torch build)")

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        add(
            ENVIRONMENT,
            "device",
            INFO,
            f"{device}: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}",
        )
    else:
        ram = _total_ram()
        add(
            ENVIRONMENT,
            "device",
            INFO,
            f"cpu: {_cpu_name()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"
            + (f", {ram / 2**30:.1f} GiB RAM" if ram else "")
            + _load_text(),
        )
    _check_bf16(device, add)
    _check_inductor(device, add)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"


def _load_text() -> str:
    """The 1-minute load average: other work on the cores makes the speed figures unreliable."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return ""
    busy = load >= (os.cpu_count() or 1) * 0.5
    return f", load average {load:.1f}" + (" (busy: speed figures will be low and noisy)" if busy else "")


def _total_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_bf16(device: torch.device, add) -> None:
    name = "bf16"
    try:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            add(ENVIRONMENT, name, FAIL, f"torch.cuda.is_bf16_supported() is False on {device}; use --dtype float32")
            return
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randn(64, 64, generator=generator).to(device) for _ in range(2))
        exact = a @ b
        got = (a.bfloat16() @ b.bfloat16()).float()
        error = ((got - exact).abs().max() / exact.abs().max()).item()
        how = "torch.cuda.is_bf16_supported() is True; " if device.type == "cuda" else ""
        if error < 2e-2:
            add(ENVIRONMENT, name, PASS, f"{how}a 64x64 bf16 matmul runs, max error {error:.1e} of the largest value")
        else:
            add(ENVIRONMENT, name, FAIL, f"{how}a 64x64 bf16 matmul is off by {error:.1e} of the largest value")
    except Exception as e:  # noqa: BLE001 - any failure here is the finding
        add(ENVIRONMENT, name, FAIL, f"a bf16 matmul failed: {_one_line(e)}")


def _fresh_probe():
    """A new function object with its own code object, so that dynamo has nothing cached for it."""
    namespace = {"torch": torch}
    exec(
        "def probe(x, y):\n    return torch.nn.functional.gelu(x @ y + 1.0).softmax(-1) * 3.0\n",
        namespace,
    )
    return namespace["probe"]


def _cpp_compiler() -> str:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
    except Exception:  # noqa: BLE001 - fall back to looking on PATH
        compiler = next((c for c in ("g++", "c++", "clang++", "cc") if shutil.which(c)), None)
    if not compiler:
        return "none found"
    path = shutil.which(compiler) or compiler
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        version = out.splitlines()[0].strip() if out.strip() else ""
    except (OSError, subprocess.SubprocessError):
        version = ""
    return f"{path} ({version})" if version else path


def _check_inductor(device: torch.device, add) -> None:
    name = "inductor + compiler"
    compiler = _cpp_compiler()
    backend = f"C++ compiler {compiler}"
    if device.type == "cuda":
        try:
            import triton

            backend = f"Triton {triton.__version__}; {backend}"
        except ImportError:
            backend = f"no Triton; {backend}"
    probe = _fresh_probe()
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.randn(8, 8, generator=generator).to(device) for _ in range(2))
    started = time.perf_counter()
    try:
        # Caches off: the compiler must really run, not a kernel built on another day.
        with torch.compiler.config.patch(force_disable_caches=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "dynamo_pgo force disabled by ... force_disable_caches"
            got = torch.compile(probe, fullgraph=True)(x, y)
        seconds = time.perf_counter() - started
    except Exception as e:  # noqa: BLE001
        add(ENVIRONMENT, name, FAIL, f"torch.compile of a small function failed ({backend}): {_one_line(e)}")
        return
    if torch.allclose(got, probe(x, y), rtol=1e-4, atol=1e-5):
        add(ENVIRONMENT, name, PASS, f"compiled (caches off) and ran a small function in {seconds:.1f} s; {backend}")
    else:
        add(ENVIRONMENT, name, FAIL, f"a compiled small function gives different results from eager; {backend}")


# ------------------------------------------------------------------ checks
def _counter(group: str, key: str | None = None) -> int:
    from torch._dynamo.utils import counters

    values = counters[group]
    return sum(values.values()) if key is None else values[key]


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _compare(expected: Sequence[int], got: Sequence[int]) -> tuple[bool, str]:
    at = _first_difference(expected, got)
    if at is None:
        return True, f"{len(got)}/{len(expected)} tokens"
    same = sum(x == y for x, y in zip(expected, got))
    return False, (
        f"{same}/{len(expected)} tokens equal; first difference at token {at}: "
        f"eager {expected[at] if at < len(expected) else 'nothing'}, compiled {got[at] if at < len(got) else 'nothing'}"
    )


def _divergence_note(eager: Engine, prompt: list[int], expected: list[int], got: list[int]) -> str:
    """How close eager's own choice was where the paths part: a near-tie is what rounding can flip."""
    at = _first_difference(expected, got)
    if at is None or at >= min(len(expected), len(got)):
        return ""
    try:
        logits = eager.logits(torch.tensor([prompt + expected[:at]]))[0, -1]
    except Exception:  # noqa: BLE001 - the note is a bonus; the failure stands without it
        return ""
    gap = abs((logits[expected[at]] - logits[got[at]]).item())
    spread = (logits.max() - logits.min()).item()
    note = f"; at token {at} the two choices' logits (eager, no cache) differ by {gap:.3g}, of a spread of {spread:.3g}"
    if eager.dtype != torch.float32:
        note += f"; in {str(eager.dtype).removeprefix('torch.')} fused kernels round differently, so a near-tie can flip: use float32 for an exact check"
    return note


def _checks(eager: Engine, compiled: Engine, steps: int, add) -> None:
    window = min(eager.config.sliding_window, eager.max_seq_len)  # a ring is never longer than the context
    greedy_prompt = _prompt(eager, 5, seed=0)
    graphs_before = compiled.graph_count()
    unique_before = _counter("stats", "unique_graphs")
    breaks_before = _counter("graph_break")
    compiled_calls = 0
    errors: list[str] = []

    def run(engine: Engine, prompt, n, **settings) -> list[int] | None:
        nonlocal compiled_calls
        compiled_calls += engine.compiled
        try:
            return engine.generate_ids([prompt], max_new_tokens=n, ignore_eos=True, **settings)[0]
        except Exception as e:  # noqa: BLE001 - reported as a failure, not a crash
            errors.append(f"{'compiled' if engine.compiled else 'eager'} generation raised {_one_line(e)}")
            return None

    # a. greedy, for `steps` steps
    expected = run(eager, greedy_prompt, steps)
    got = run(compiled, greedy_prompt, steps)
    if expected is None or got is None:
        add(CHECKS, "compiled == eager greedy", FAIL, errors[-1])
    else:
        held = compiled.last_stats.prompt_tokens[0] + len(got) - 1  # the last token is never fed
        wraps = max(held - 1, 0) // window
        same, detail = _compare(expected, got)
        detail += f", {wraps} ring wraps (window {window}, {held} positions), {len(set(expected))} distinct tokens"
        if not same:
            detail += _divergence_note(eager, greedy_prompt, expected, got)
        add(CHECKS, "compiled == eager greedy", PASS if same else FAIL, detail)

    # b. bounded graphs: greedy above, two sampling calls with other prompt lengths and settings
    sampled_ok, sampled_detail = True, []
    for seed, (length, settings, n) in enumerate(SAMPLED_CALLS, start=1):
        prompt = _prompt(eager, length, seed=seed)
        want, have = run(eager, prompt, n, **settings), run(compiled, prompt, n, **settings)
        if want is None or have is None:
            sampled_ok = False
            sampled_detail.append(errors[-1])
            continue
        same, detail = _compare(want, have)
        sampled_ok &= same
        sampled_detail.append(f"{_settings_text(settings)}: {detail}")
    add(CHECKS, "compiled == eager sampled (seeded)", PASS if sampled_ok else FAIL, "; ".join(sampled_detail))
    graphs_after = compiled.graph_count()

    # ... and once every graph exists, more steps and more settings must not compile anything.
    repeat_error = None
    with torch.compiler.set_stance("fail_on_recompile"):
        try:
            length, n = REPEAT_GREEDY
            compiled.generate_ids([_prompt(eager, length, seed=9)], max_new_tokens=n, ignore_eos=True)
            length, settings, n = REPEAT_SAMPLED
            compiled.generate_ids([_prompt(eager, length, seed=10)], max_new_tokens=n, ignore_eos=True, **settings)
            compiled_calls += 2
        except Exception as e:  # noqa: BLE001
            repeat_error = _one_line(e)
    graphs_final = compiled.graph_count()
    new_graphs = graphs_after - graphs_before
    unique = _counter("stats", "unique_graphs") - unique_before
    limit = torch._dynamo.config.recompile_limit
    lengths = "/".join(str(n) for n in (5, *(c[0] for c in SAMPLED_CALLS)))
    detail = (
        f"{new_graphs} new decode_step graph(s) over 3 calls (greedy + 2 sampling, prompts of {lengths} tokens), "
        f"{graphs_final - graphs_after} more over 2 further calls ({REPEAT_GREEDY[1] + REPEAT_SAMPLED[2]} steps, prompts of "
        f"{REPEAT_GREEDY[0]}/{REPEAT_SAMPLED[0]} tokens) under fail_on_recompile; "
        f"{graphs_final} held by this engine (recompile limit {limit}); dynamo compiled {unique} graph(s) in all"
    )
    problems = []
    if new_graphs > 2:
        problems.append(f"expected at most 2 graphs (greedy + sampling) for batch size 1, got {new_graphs}")
    if graphs_final != graphs_after or repeat_error:
        problems.append(f"graphs grew or recompiled on repeat calls: {repeat_error or graphs_final - graphs_after}")
    if graphs_final >= limit:
        problems.append(f"decode_step reached dynamo's recompile limit ({limit}): later shapes would run eagerly")
    if graphs_final == 0:
        problems.append("no compiled graph exists for decode_step: nothing ran compiled")
    add(CHECKS, "compiled graphs bounded", FAIL if problems else PASS, "; ".join(problems + [detail]))

    # c. graph breaks
    breaks = _counter("graph_break") - breaks_before
    add(
        CHECKS,
        "graph breaks",
        PASS if breaks == 0 and not errors else FAIL,
        f"{breaks} graph break(s) over {compiled_calls} compiled calls (torch._dynamo counters['graph_break'])"
        + (f"; {errors[0]}" if errors else ""),
    )

    # d. CUDA graphs
    if compiled.device.type != "cuda":
        add(CHECKS, "CUDA graph replays", SKIP, NO_CUDA)
        add(CHECKS, "kept graph outputs intact", SKIP, NO_CUDA)
        return
    _check_cuda_graph_replays(eager, compiled, greedy_prompt, add)
    _check_kept_outputs(expected, compiled, greedy_prompt, steps, add)


def _settings_text(settings: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


_GRAPH_LAUNCH = ("cudaGraphLaunch", "cuGraphLaunch")
# Runtime and driver API names as the profiler records them (prefixes: cudaLaunchKernelExC, cuLaunchKernelEx).
_KERNEL_LAUNCH = ("cudaLaunchKernel", "__cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel")


def _launches(engine: Engine, prompt: list[int], n: int) -> tuple[int, int]:
    """(CUDA graph launches, single kernel launches) the profiler records over one generation."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate_ids([prompt], max_new_tokens=n, ignore_eos=True)
        torch.cuda.synchronize()
    names = Counter(event.name for event in prof.events())
    graphs = sum(count for name, count in names.items() if name.startswith(_GRAPH_LAUNCH))
    kernels = sum(count for name, count in names.items() if name.startswith(_KERNEL_LAUNCH))
    return graphs, kernels


def _check_cuda_graph_replays(eager: Engine, compiled: Engine, prompt: list[int], add) -> None:
    name = "CUDA graph replays"
    n = 17  # 16 decode steps after the token that prefill chooses
    try:
        compiled.generate_ids([prompt], max_new_tokens=n, ignore_eos=True)  # graphs recorded already; warm anyway
        graph_launches, compiled_kernels = _launches(compiled, prompt, n)
        _, eager_kernels = _launches(eager, prompt, n)
    except Exception as e:  # noqa: BLE001
        add(CHECKS, name, FAIL, f"profiling the decode steps failed: {_one_line(e)}")
        return
    steps = n - 1
    detail = (
        f"{graph_launches} cudaGraphLaunch for {steps} decode steps (torch.profiler); single kernel launches, "
        f"prefill included: {compiled_kernels} compiled vs {eager_kernels} eager"
    )
    add(CHECKS, name, PASS if graph_launches >= steps else FAIL, detail)


def _check_kept_outputs(expected, compiled: Engine, prompt: list[int], steps: int, add) -> None:
    """Hold every step's tokens for KEPT_BLOCK steps (many replays) before reading them; compare to eager."""
    name = "kept graph outputs intact"
    if expected is None:
        add(CHECKS, name, FAIL, "no eager tokens to compare with")
        return
    try:
        got = []
        blocks = compiled.token_steps([prompt], GenerationOptions(max_new_tokens=steps, ignore_eos=True), sync_every=KEPT_BLOCK)
        for (piece,) in blocks:
            got.extend(piece)
    except Exception as e:  # noqa: BLE001
        add(CHECKS, name, FAIL, f"compiled generation raised {_one_line(e)}")
        return
    same, detail = _compare(expected, got)
    add(
        CHECKS,
        name,
        PASS if same else FAIL,
        f"{detail} equal eager when each step's output is read only after up to {KEPT_BLOCK - 1} later replays",
    )


# ------------------------------------------------------------------ speed
def _speed(eager: Engine, compiled: Engine, *, real: bool, add) -> None:
    prompt = _prompt(eager, 64 if real else 5, seed=11)
    figures = {}
    for label, engine in (("eager", eager), ("compiled", compiled)):
        try:
            engine.generate_ids([prompt], max_new_tokens=8, ignore_eos=True)  # warm-up
            engine.generate_ids([prompt], max_new_tokens=SPEED_STEPS + 1, ignore_eos=True)
        except Exception as e:  # noqa: BLE001
            add(SPEED, f"decode {label}", FAIL, f"generation raised {_one_line(e)}")
            continue
        stats = engine.last_stats
        figures[label] = stats.decode_tokens_per_s
        detail = f"{stats.decode_tokens_per_s:.1f} tok/s at batch 1 over {SPEED_STEPS} steps"
        if real:
            detail += f"; time to first token {stats.prefill_s * 1000:.0f} ms for a {len(prompt)}-token prompt"
        if label == "compiled" and figures.get("eager"):
            detail += f" ({figures['compiled'] / figures['eager']:.1f}x eager)"
        add(SPEED, f"decode {label}", INFO, detail)


def _one_line(error: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {' '.join(lines)}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

#!/usr/bin/env python
"""Benchmark gemmalite against transformers on the same weights, in one process.

    python scripts/bench.py                      # random weights at the real 270M shape
    python scripts/bench.py --shape 1b
    python scripts/bench.py --model path/to/dir_or.gguf --hf-static --json out.json

Engines run alternately, warm-up excluded, and every figure is the median of --runs runs:
load time, first-call (compile) time, time to first token and prefill tok/s per prompt length,
decode tok/s at each batch size and context length, peak memory, KV-cache bytes. The machine's
memory-read bandwidth gives the floor: weight bytes read per token over bandwidth.

Random weights are fine for speed: no kernel here depends on the values.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemmalite  # noqa: E402
from gemmalite.config import PRESETS  # noqa: E402
from gemmalite.packing import weight_bytes  # noqa: E402


# ---------------------------------------------------------------------- machine facts
def memory_bandwidth_gbs(device: torch.device) -> float:
    """Read bandwidth: the median time to sum a 256 MB tensor."""
    x = torch.ones(64 * 2**20, dtype=torch.float32, device=device)
    times = []
    for _ in range(7):
        sync(device)
        t = time.perf_counter()
        x.sum().item()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times[2:]) / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: writing 5 resets the process's peak RSS (VmHWM).
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------- engines
def compile_option(mode: str):
    """load()'s compile for a mode name. "cached" needs its packages built: run once, and let the
    background builder finish (its log: build.log in the compile cache) before measuring."""
    return "cached" if mode.endswith("cached") else mode.endswith("compiled")


class GemmaliteRunner:
    def __init__(self, name, path, device, dtype, mode, max_seq_len=None):
        """mode: eager, compiled, cached (the compile cache's packages), or int8 with any of them."""
        self.name, self.device = name, device
        t = time.perf_counter()
        self.engine = gemmalite.load(
            path,
            device=device,
            dtype=dtype,
            compile=compile_option(mode),
            quantize="int8" if mode.startswith("int8") else None,
            max_seq_len=max_seq_len or MAX_SEQ_LEN,
            reuse_prompts=False,  # a repeated prompt must be prefilled again: time to first token is a cold prefill
        )
        self.load_s = time.perf_counter() - t
        self.weight_bytes = weight_bytes(self.engine.model)

    def generate(self, prompts, new_tokens, sampling=None) -> tuple[float, float]:
        """(time to first token, seconds for the remaining tokens); greedy, or `sampling` (SAMPLED)."""
        sync(self.device)
        seeded = {**sampling, "seed": 0} if sampling else {}
        self.engine.generate_ids(prompts, max_new_tokens=new_tokens, ignore_eos=True, **seeded)
        stats = self.engine.last_stats
        return stats.prefill_s, stats.decode_s

    def kv_bytes(self) -> int:
        return self.engine.runner.kv_bytes


class TransformersRunner:
    def __init__(self, name, path, device, dtype, static):
        from transformers import AutoModelForCausalLM

        self.name, self.device, self.static = name, device, static
        t = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.load_s = time.perf_counter() - t
        if static:
            self.model.forward = torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=True)
        self.last_cache_bytes = 0

    def _run(self, prompts, new_tokens, sampling=None):
        from transformers import GenerationConfig

        ids = torch.tensor(prompts, device=self.device)
        settings = GenerationConfig(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=bool(sampling), eos_token_id=None, pad_token_id=0,
            return_dict_in_generate=True, **(sampling or {}),
        )
        if self.static:
            settings.cache_implementation = "static"
        with torch.no_grad():
            out = self.model.generate(ids, generation_config=settings, attention_mask=torch.ones_like(ids))
        sync(self.device)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is not None:
            self.last_cache_bytes = sum(t.numel() * t.element_size() for t in _cache_tensors(cache))
        return out

    def generate(self, prompts, new_tokens, sampling=None) -> tuple[float, float]:
        t = time.perf_counter()
        self._run(prompts, 1, sampling)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        self._run(prompts, new_tokens, sampling)
        total = time.perf_counter() - t
        return ttft, max(total - ttft, 1e-9)

    def kv_bytes(self) -> int:
        return self.last_cache_bytes


def _cache_tensors(cache):
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                yield t


# ---------------------------------------------------------------------- the benchmark
MAX_SEQ_LEN = 4096 + 160
SAMPLED = {"temperature": 1.0, "top_k": 64, "top_p": 0.95}  # Gemma IT's defaults (generation_config.json)


@dataclass
class Result:
    engine: str
    figures: dict = field(default_factory=dict)


def prompt(length: int, seed: int, vocab: int = 256_000) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(10, vocab, (length - 1,), generator=g).tolist()


def median_of(runs: int, fn):
    values = [fn() for _ in range(runs)]
    return tuple(statistics.median(v[i] for v in values) for i in range(len(values[0])))


def benchmark(runners, args, device, bandwidth) -> list[Result]:
    results = {r.name: Result(r.name) for r in runners}
    for r in runners:
        results[r.name].figures["load_s"] = r.load_s
    # First call: compile time (where there is any) plus a first generation. Then warm every
    # batch size, so that no measured run includes compiling a graph.
    for r in runners:
        t = time.perf_counter()
        r.generate([prompt(16, 0)], 8)
        results[r.name].figures["first_call_s"] = time.perf_counter() - t
        for batch in args.batches:
            r.generate([prompt(16, s) for s in range(batch)], 8)
            if args.sampling:
                r.generate([prompt(16, s) for s in range(batch)], 8, SAMPLED)

    def each(fn, key_fn):
        for i in range(args.runs):
            for r in runners:  # alternate engines within each run
                values = fn(r)
                for key, value in key_fn(values).items():
                    results[r.name].figures.setdefault(key, []).append(value)

    for length in args.prompt_lens:
        each(
            lambda r: r.generate([prompt(length, length)], 1),
            lambda v, n=length: {f"ttft_s@{n}": v[0], f"prefill_tok_s@{n}": n / v[0]},
        )
    for batch in args.batches:
        for context in args.contexts:
            for r in runners:
                reset_peak_memory(device)
            # With --sampling, each engine decodes greedy then sampled in the same run, so both see the same machine.
            each(
                lambda r: (
                    *r.generate([prompt(context, s) for s in range(batch)], args.new_tokens), r.kv_bytes(), peak_memory_bytes(device),
                    *(r.generate([prompt(context, s) for s in range(batch)], args.new_tokens, SAMPLED) if args.sampling else ()),
                ),
                lambda v, b=batch, c=context: {
                    f"decode_tok_s@b{b},ctx{c}": (args.new_tokens - 1) / v[1],
                    f"kv_bytes@b{b},ctx{c}": v[2],
                    f"peak_bytes@b{b},ctx{c}": v[3],
                    **({f"decode_tok_s@b{b},ctx{c},sampled": (args.new_tokens - 1) / v[5]} if len(v) > 4 else {}),
                },
            )
    out = []
    for r in runners:
        figures = {k: statistics.median(v) if isinstance(v, list) else v for k, v in results[r.name].figures.items()}
        per_token_floor = getattr(r, "weight_bytes", runners[0].weight_bytes) / (bandwidth * 1e9)
        key = f"decode_tok_s@b1,ctx{args.contexts[0]}"
        if key in figures:
            figures["floor_fraction@b1"] = per_token_floor * figures[key]
        out.append(Result(r.name, figures))
    return out


def markdown(results: list[Result]) -> str:
    keys = list(results[0].figures)
    lines = ["| figure | " + " | ".join(r.engine for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    for key in keys:
        cells = [_fmt(key, r.figures.get(key)) for r in results]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(key, value):
    if value is None:
        return "-"
    if "bytes" in key:
        return f"{value / 2**20:.0f} MiB"
    if "fraction" in key:
        return f"{value:.0%}"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def random_checkpoint(shape: str, dtype: torch.dtype, directory: Path) -> Path:
    """Save random weights at a preset's shape, as a transformers checkpoint both engines read."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = PRESETS[shape]()
    hf = Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
        max_position_embeddings=cfg.max_position_embeddings,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Gemma3ForCausalLM(hf).to(dtype)
    model.save_pretrained(directory)
    return directory


# Five kinds of text (prose, code, science, history, French), about 630 positions in all: enough
# that a top-1 agreement of 95% is measured to about 1%, not one token in 20.
QUALITY_TEXTS = [
    "The lighthouse keeper had lived on the island for thirty years. Every evening he climbed the spiral stairs"
    " with a can of oil and a rag, polished the great lens until it shone, and lit the lamp before the sun touched"
    " the water. Ships rarely passed any more; the charts had changed, and the harbour on the mainland had closed."
    " Still he kept the light, because nobody had told him to stop, and because on clear nights he could see the"
    " beam sweep across the rocks where his father's boat had broken apart in the winter storm of his childhood.",
    "def merge_sort(items):\n    if len(items) <= 1:\n        return items\n    middle = len(items) // 2\n"
    "    left = merge_sort(items[:middle])\n    right = merge_sort(items[middle:])\n    merged = []\n"
    "    i = j = 0\n    while i < len(left) and j < len(right):\n        if left[i] <= right[j]:\n"
    "            merged.append(left[i])\n            i += 1\n        else:\n            merged.append(right[j])\n"
    "            j += 1\n    merged.extend(left[i:])\n    merged.extend(right[j:])\n    return merged\n\n\n"
    "if __name__ == \"__main__\":\n    print(merge_sort([5, 2, 9, 1, 5, 6]))\n",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into"
    " glucose and oxygen. It takes place mainly in the leaves, inside small structures called chloroplasts, which"
    " contain the green pigment chlorophyll. In the light-dependent reactions, energy absorbed by chlorophyll splits"
    " water molecules and releases oxygen as a by-product. The energy is stored in ATP and NADPH, which then power"
    " the Calvin cycle, where carbon dioxide from the air is fixed into sugars that the plant uses to grow.",
    "In 1969, the Apollo 11 mission landed the first humans on the Moon. Neil Armstrong and Buzz Aldrin"
    " spent about two and a half hours walking on the surface, collecting rock samples and setting up experiments,"
    " while Michael Collins orbited above in the command module. Millions of people around the world watched the"
    " grainy television pictures as Armstrong stepped off the ladder. The astronauts returned safely to Earth on"
    " July 24, splashing down in the Pacific Ocean, where they were recovered by the aircraft carrier Hornet.",
    "Une fois par semaine, le marché du village attire des producteurs venus de toute la région pour vendre"
    " leurs fromages, leurs légumes et leur pain. Dès six heures du matin, les camions s'installent sur la place de"
    " l'église, et les premiers clients arrivent avec leurs paniers avant que le soleil ne chauffe les pavés. On y"
    " parle de la pluie, des récoltes et des nouvelles du canton, et les enfants reçoivent souvent une pomme ou un"
    " morceau de fromage à goûter pendant que leurs parents font la queue devant les étals les plus réputés.",
]


def quality(path, new_tokens: int, reference_path=None) -> dict:
    """KL of next-token distributions, top-1 and greedy agreement against a reference.

    Without reference_path: int8 against bf16 on the same weights. With it: --model against
    another checkpoint of the same model (say, a quantized GGUF against the original weights).
    """
    if reference_path is None:
        reference = gemmalite.load(path, dtype="bfloat16", device="cpu", max_seq_len=1024)
        quantized = gemmalite.load(path, quantize="int8", max_seq_len=1024)
    else:
        reference = gemmalite.load(reference_path, dtype="float32", device="cpu", max_seq_len=1024)
        quantized = gemmalite.load(path, dtype="float32", device="cpu", max_seq_len=1024)
    kls, top1, greedy_same, greedy_total, positions = [], [], 0, 0, 0
    for text in QUALITY_TEXTS:
        ids = reference.tokenizer.encode(text)
        positions += len(ids)
        p = torch.log_softmax(reference.logits(torch.tensor([ids])), -1)
        q = torch.log_softmax(quantized.logits(torch.tensor([ids])), -1)
        kls.append((p.exp() * (p - q)).sum(-1).mean().item())
        top1.append((p.argmax(-1) == q.argmax(-1)).float().mean().item())
        a = reference.generate_ids([ids], max_new_tokens=new_tokens, ignore_eos=True)[0]
        b = quantized.generate_ids([ids], max_new_tokens=new_tokens, ignore_eos=True)[0]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        greedy_same += same
        greedy_total += len(a)
    return {
        "kl_nats": statistics.mean(kls),
        "top1_agreement": statistics.mean(top1),
        "greedy_tokens_equal_before_first_divergence": f"{greedy_same}/{greedy_total}",
        "positions_compared": positions,
    }


def reuse(path, device, dtype, mode: str, runs: int, history: int = 1500, reply: int = 32, turn: int = 30) -> dict:
    """Time to first token of a conversation's next turn: with prompt reuse against without.

    Each run is a new `history`-token conversation. The reusing engine answers it (`reply`
    tokens), then gets history + reply + a `turn`-token new turn: only the tokens after what its
    cache already holds are prefilled. The other engine prefills the whole next-turn prompt. The
    first run warms up (compiled prefill graphs, caches) and is not counted.
    """
    engines = {
        kept: gemmalite.load(path, device=device, dtype=dtype, compile=compile_option(mode), max_seq_len=MAX_SEQ_LEN,
                             reuse_prompts=kept)
        for kept in (True, False)
    }
    ttft = {True: [], False: []}
    cached = []
    for run in range(runs + 1):
        conversation = prompt(history, 1000 + run)
        answer = engines[True].generate_ids([conversation], max_new_tokens=reply, ignore_eos=True)[0]
        next_turn = conversation + answer + prompt(turn + 1, 2000 + run)[1:]
        for kept, engine in engines.items():
            engine.generate_ids([next_turn], max_new_tokens=1, ignore_eos=True)
            if run:
                ttft[kept].append(engine.last_stats.prefill_s)
                if kept:
                    cached.append(engine.last_stats.cached_tokens[0])
    with_reuse, without = statistics.median(ttft[True]), statistics.median(ttft[False])
    kept_tokens = statistics.median(cached)
    total = history + reply + turn
    print(
        f"gemmalite {mode}: next turn of a {history}-token conversation after a {reply}-token reply, with a {turn}-token "
        f"turn ({total} tokens); time to first token, median of {runs}:\n"
        f"  with prompt reuse  {with_reuse * 1000:8.1f} ms  ({kept_tokens:.0f} tokens reused, {total - kept_tokens:.0f} prefilled)\n"
        f"  without            {without * 1000:8.1f} ms  ({total} prefilled)\n"
        f"  reuse is {without / with_reuse:.1f}x faster"
    )
    return {"ttft_s_with_reuse": with_reuse, "ttft_s_without_reuse": without, "reused_tokens": kept_tokens,
            "prompt_tokens": total}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint dir or .gguf (default: random weights at --shape)")
    p.add_argument("--shape", default="270m", choices=["270m", "1b"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-lens", type=lambda s: [int(x) for x in s.split(",")], default=[128, 1024, 4096])
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[128, 4096])
    p.add_argument("--hf-static", action="store_true", help="also run transformers with a static cache and torch.compile")
    p.add_argument("--no-hf", action="store_true", help="gemmalite only")
    p.add_argument("--gemmalite-modes", default=None, help="comma list of eager,compiled,cached,int8,int8-compiled,int8-cached (default: the device's default)")
    p.add_argument("--quality", action="store_true",
                   help="measure int8 against bf16 (KL, agreement) and exit; with --gemmalite-modes, then benchmark speed")
    p.add_argument("--reference", help="with --quality: compare --model (float32) against this checkpoint instead")
    p.add_argument("--sampling", action="store_true",
                   help="also decode with sampling (temperature 1, top_k 64, top_p 0.95), next to greedy")
    p.add_argument("--reuse", action="store_true",
                   help="time to first token of a long conversation's next turn, with prompt reuse and without, and exit")
    p.add_argument("--max-seq-len", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="gemmalite cache lengths, one engine each (default 4256), e.g. 2048,32768")
    p.add_argument("--speculative", action="store_true",
                   help="plain, prompt lookup, int8 draft model and prediction decoding on input-grounded and "
                        "open-ended tasks (scripts/bench_speculative.py, on --model or the bundled GGUF), and exit")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="write a bar chart of decode tok/s here (needs matplotlib)")
    args = p.parse_args(argv)
    if args.speculative:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_speculative import main as speculative

        given = ["--new-tokens", str(args.new_tokens)] + (["--model", args.model] if args.model else [])
        given += ["--json", args.json] if args.json else []
        return speculative(given)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            path = random_checkpoint(args.shape, dtype, Path(tmp) / args.shape)
            label = f"random weights, Gemma 3 {args.shape} shape"
        elif args.model.endswith(".gguf"):
            from gemmalite.gguf import cached_checkpoint

            path, label = cached_checkpoint(args.model), args.model
        else:
            path, label = Path(args.model), args.model
        if args.quality:
            figures = quality(path, args.new_tokens, args.reference)
            what = f"float32 against {args.reference}" if args.reference else "int8 (weight-only) against bf16"
            print(f"model: {label}; {what}; {len(QUALITY_TEXTS)} texts, {args.new_tokens} greedy tokens each")
            for k, v in figures.items():
                print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
            if not args.gemmalite_modes:  # with modes, the speed benchmark follows in the same run
                return
        modes = args.gemmalite_modes.split(",") if args.gemmalite_modes else ["compiled" if device.type == "cuda" else "eager"]
        if args.reuse:
            print(f"model: {label}; device: {device}; dtype: {args.dtype}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
            figures = {mode: reuse(path, device, dtype, mode, args.runs) for mode in modes}
            if args.json:
                Path(args.json).write_text(json.dumps({"header": label, "reuse": figures}, indent=2))
            return
        lengths = args.max_seq_len or [None]
        runners = [
            GemmaliteRunner(f"gemmalite {m}" + (f" max_seq_len {n}" if n else ""), path, device, dtype, m, n)
            for m in modes for n in lengths
        ]
        if not args.no_hf:
            runners.append(TransformersRunner("transformers eager", path, device, dtype, static=False))
            if args.hf_static:
                runners.append(TransformersRunner("transformers static+compile", path, device, dtype, static=True))
        bandwidth = memory_bandwidth_gbs(device)
        results = benchmark(runners, args, device, bandwidth)

    header = (
        f"model: {label}; device: {device} ({_device_name(device)}); dtype: {args.dtype}; torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}; measured read bandwidth {bandwidth:.1f} GB/s; "
        f"median of {args.runs} runs, {args.new_tokens} new tokens; {time.strftime('%Y-%m-%d')}"
    )
    print(header + "\n")
    print(markdown(results))
    if len(results) > 1:
        key = f"decode_tok_s@b1,ctx{args.contexts[0]}"
        base = next((r for r in results if r.engine == "transformers eager"), None)
        if base and key in base.figures:
            for r in results:
                print(f"\n{r.engine}: {r.figures[key] / base.figures[key]:.2f}x transformers eager decode at batch 1", end="")
            print()
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": [r.__dict__ for r in results]}, indent=2))
    if args.png:
        chart(results, args.png)


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in results[0].figures if k.startswith("decode_tok_s")]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        ax.bar([j + i * width for j in range(len(keys))], [r.figures.get(k, 0) for k in keys], width, label=r.engine)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [k.split("@")[1] for k in keys])
    ax.set_ylabel("decode tok/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()

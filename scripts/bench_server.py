"""Benchmark `gemmalite serve`: aggregate tok/s and time to first token under concurrent clients,
and the time to first token of a conversation's fourth turn with and without prompt reuse.

    python scripts/bench_server.py                        # starts a server on the default model (270M GGUF)
    python scripts/bench_server.py --model DIR --parallel 8 --server-args "--dtype float32"
    python scripts/bench_server.py --url http://127.0.0.1:8000   # a server that is already running

Each client streams a plain completion of --tokens tokens (greedy, eos ignored) from a prompt of
its own; aggregate tok/s is every client's tokens over the wall time from the first request to
the last token. The conversation sends the whole message list each turn, as chat clients do; its
fourth turn is timed once as sent (reusing the slot that served turn three) and once with
`cache_prompt: false` (a full prefill). When it starts the server, it also starts a 1-slot
server and times one client on each in turn, round after round (so a change in the machine's
load hits both): a lone request on the N-slot server should decode about as fast, since the
step is sized to the busy rows. Prints a markdown table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time

import httpx

TOPICS = ["the sea", "mountains", "a city at night", "rivers", "the desert", "forests", "winter", "a market"]
SENTENCE = "Write about {topic}. Describe the colours, the sounds and the people you would meet there, in detail. "


def start_server(args, parallel: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "gemmalite.cli", "serve", "--port", "0", "--parallel", str(parallel), "--device", "cpu"]
    if args.model:
        cmd += ["--model", args.model]
    cmd += shlex.split(args.server_args)
    print("server:", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        print(line, end="", file=sys.stderr, flush=True)
        found = re.search(r"(http://[\w.\[\]:]+)/v1", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep draining
            return proc, found.group(1)
    raise SystemExit(f"the server exited with status {proc.wait()} before it listened")


def stream(client: httpx.Client, path: str, body: dict) -> dict:
    """Send a streaming request; its text, the time to the first text, the end time and the usage."""
    started = time.perf_counter()
    first = None
    usage = None
    pieces = []
    with client.stream("POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                usage = event["usage"]
            choice = event["choices"][0] if event["choices"] else {}
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if text:
                first = first or time.perf_counter()
                pieces.append(text)
    end = time.perf_counter()
    return {
        "text": "".join(pieces), "started": started, "ttft": (first or end) - started, "end": end,
        "tokens": usage["completion_tokens"], "usage": usage,
    }  # fmt: skip


def concurrent(client: httpx.Client, clients: int, tokens: int, round_: int) -> dict:
    results: list[dict] = [None] * clients

    def one(i):
        prompt = SENTENCE.format(topic=TOPICS[i % len(TOPICS)]) + f"(take {round_}.{i})"
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
        results[i] = stream(client, "/v1/completions", body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - min(r["started"] for r in results)
    total = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    return {
        "clients": clients, "tokens": total, "wall_s": wall, "tok_s": total / wall,
        "ttft_mean_s": statistics.mean(ttfts), "ttft_max_s": max(ttfts),
    }  # fmt: skip


def conversation(client: httpx.Client, reply_tokens: int, take: int) -> dict:
    """Four turns, each re-sending the whole conversation; the fourth timed with and without reuse."""
    messages = [{"role": "system", "content": "You are a travel writer. Answer in a few sentences."}]
    for turn in range(4):
        topic = TOPICS[(take * 4 + turn) % len(TOPICS)]
        messages.append({"role": "user", "content": SENTENCE.format(topic=topic) * 2 + f"(conversation {take})"})
        body = {"messages": list(messages), "max_tokens": reply_tokens, "temperature": 0}
        reused = stream(client, "/v1/chat/completions", body)
        messages.append({"role": "assistant", "content": reused["text"]})
    fresh = stream(client, "/v1/chat/completions", {**body, "cache_prompt": False})  # the same fourth turn
    return {
        "prompt_tokens": reused["usage"]["prompt_tokens"],
        "cached_tokens": reused["usage"]["prompt_tokens_details"]["cached_tokens"],
        "ttft_reuse_s": reused["ttft"],
        "ttft_fresh_s": fresh["ttft"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--model", help="checkpoint for the server it starts (default: the bundled 270M GGUF)")
    parser.add_argument("--parallel", type=int, default=8, help="the server's slots (default 8)")
    parser.add_argument("--server-args", default="", help="more flags for `gemmalite serve`, e.g. \"--dtype float32\"")
    parser.add_argument("--clients", default="1,4,8", help="concurrent clients to measure (default 1,4,8)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per client (default 48)")
    parser.add_argument("--reply-tokens", type=int, default=24, help="tokens per conversation reply (default 24)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best of them is kept (default 2)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--no-conversation", dest="conversation", action="store_false", help="skip the conversation")
    parser.add_argument("--no-lone-baseline", dest="lone_baseline", action="store_false",
                        help="do not start a 1-slot server to compare a lone request with")  # fmt: skip
    args = parser.parse_args()

    procs = []
    url = args.url
    lone_url = None
    if url is None:
        procs.append(start_server(args, args.parallel))
        url = procs[-1][1]
        if args.lone_baseline and args.parallel > 1:
            procs.append(start_server(args, 1))
            lone_url = procs[-1][1]
    lone = alone_on_many = None
    try:
        with httpx.Client(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=64)) as client:
            stream(client, "/v1/completions", {"prompt": "Warm up", "max_tokens": 4, "temperature": 0})
            if lone_url is not None:
                with httpx.Client(base_url=lone_url, timeout=3600) as single:
                    stream(single, "/v1/completions", {"prompt": "Warm up", "max_tokens": 4, "temperature": 0})
                    pairs = [(concurrent(single, 1, args.tokens, r), concurrent(client, 1, args.tokens, r)) for r in range(args.repeats)]
                lone = max((p[0] for p in pairs), key=lambda r: r["tok_s"])
                alone_on_many = max((p[1] for p in pairs), key=lambda r: r["tok_s"])
                for one, many in pairs:
                    print(f"a lone request: {many['tok_s']:.2f} tok/s on {args.parallel} slots, {one['tok_s']:.2f} on 1 slot",
                          file=sys.stderr, flush=True)  # fmt: skip
            rows = []
            for n in [int(c) for c in args.clients.split(",")]:
                if n == 1 and alone_on_many is not None:  # measured already, alternating with the 1-slot server
                    runs = [alone_on_many]
                else:
                    runs = [concurrent(client, n, args.tokens, r) for r in range(args.repeats)]
                rows.append(max(runs, key=lambda r: r["tok_s"]))
                print(f"{n} clients: {rows[-1]['tok_s']:.2f} tok/s", file=sys.stderr, flush=True)
            turns = [conversation(client, args.reply_tokens, take) for take in range(args.repeats if args.conversation else 0)]
            health = client.get("/health").json()
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait()

    base = rows[0]["tok_s"]
    print(f"\nserver: {url}, {health['slots']} slots, {args.tokens} tokens per client, best of {args.repeats}\n")
    print("| clients | aggregate tok/s | vs 1 client | mean TTFT s | max TTFT s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['tok_s']:.2f} | {r['tok_s'] / base:.2f}x | {r['ttft_mean_s']:.2f} | {r['ttft_max_s']:.2f} |")
    if lone is not None:
        print(f"\na lone request (best of {args.repeats}, alternating): {alone_on_many['tok_s']:.2f} tok/s on {health['slots']} slots, "
              f"{lone['tok_s']:.2f} tok/s on 1 slot: {alone_on_many['tok_s'] / lone['tok_s']:.2f}x")  # fmt: skip
    if turns:
        reuse = statistics.median(t["ttft_reuse_s"] for t in turns)
        fresh = statistics.median(t["ttft_fresh_s"] for t in turns)
        t = turns[-1]
        print(f"\nfourth turn ({t['prompt_tokens']} prompt tokens, {t['cached_tokens']} cached): time to first token "
              f"{reuse:.2f} s with reuse, {fresh:.2f} s without: {fresh / reuse:.1f}x sooner (median of {len(turns)})")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            figures = {"clients": rows, "lone_on_one_slot": lone, "conversation": turns, "url": url, "cpu_count": os.cpu_count()}
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Where int8's error against bf16 comes from, on the benchmark's quality texts.

    python scripts/int8_error_sources.py [--model PATH]    # default: the bundled 270M GGUF

Prints KL per token and top-1 agreement against bf16 for: int8 as shipped; int8 without the
head's rescoring; float32 matmuls on int8-rounded projection weights (the weights' own rounding,
with exact activations and a float head); and float32 with no int8 at all (bf16's own noise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemmalite  # noqa: E402
from bench import QUALITY_TEXTS  # noqa: E402
from gemmalite import quantize  # noqa: E402


def against(reference, engine) -> str:
    kls, top1 = [], []
    for text in QUALITY_TEXTS:
        ids = torch.tensor([reference.tokenizer.encode(text)])
        p, q = torch.log_softmax(reference.logits(ids), -1), torch.log_softmax(engine.logits(ids), -1)
        kls.append((p.exp() * (p - q)).sum(-1).mean().item())
        top1.append((p.argmax(-1) == q.argmax(-1)).float().mean().item())
    return f"KL {statistics.mean(kls):.4f} nats/token, top-1 {statistics.mean(top1):.1%}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint dir or .gguf (default: the bundled 270M)")
    path = p.parse_args().model
    if path is None:
        from gemmalite.gguf import default_gguf_path

        path = default_gguf_path()

    def load(**kw):
        return gemmalite.load(path, device="cpu", max_seq_len=1024, **kw)

    reference = load(dtype="bfloat16")
    print("against bf16 of the same weights:")
    print("  int8 as shipped:                       ", against(reference, load(quantize="int8")), flush=True)
    rescored, quantize.RESCORED = quantize.RESCORED, 0
    print("  int8, head's top logits not rescored:  ", against(reference, load(quantize="int8")), flush=True)
    quantize.RESCORED = rescored
    rounded = load(dtype="float32")
    for module in rounded.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = quantize.Int8Linear(module.weight).dequantized()
    print("  float32 on int8-rounded projections:   ", against(reference, rounded), flush=True)
    print("  float32, no int8:                      ", against(reference, load(dtype="float32")), flush=True)


if __name__ == "__main__":
    main()

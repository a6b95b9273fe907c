"""Time the vision tower at a real shape (random weights): what one image costs before prefill.

    python scripts/bench_vision.py --shape 4b --dtype bfloat16 --images 1 --repeats 2

The tower and projector of Gemma 3 4B, 12B and 27B are the same (SigLIP So400m at 896px, 256
soft tokens); only the projector's output width differs. Prints parameters, memory and seconds
per call (the first call separately: it includes one-time allocation).
"""

from __future__ import annotations

import argparse
import time

import torch

from gemmalite.vision import ImageEncoder, VisionConfig

TEXT_HIDDEN = {"4b": 2560, "12b": 3840, "27b": 5376}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(TEXT_HIDDEN), default="4b")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=1, help="images per call (one batch)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    config = VisionConfig(
        hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, image_size=896, patch_size=14,
        layer_norm_eps=1e-6, text_hidden_size=TEXT_HIDDEN[args.shape], tokens_per_image=256,
        image_token_id=262144, start_of_image_id=255999, end_of_image_id=256000,
    )  # fmt: skip
    torch.manual_seed(0)
    encoder = ImageEncoder(config).to(args.device, dtype).eval().requires_grad_(False)
    params = sum(p.numel() for p in encoder.parameters())
    print(f"{args.shape} tower + projector: {params / 1e6:.1f}M parameters, "
          f"{params * encoder.projector.mm_input_projection_weight.element_size() / 1e9:.2f} GB in {args.dtype}")  # fmt: skip
    pixels = torch.rand(args.images, 3, 896, 896, device=args.device) * 2 - 1
    for i in range(args.repeats + 1):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            out = encoder(pixels)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        label = "first call" if i == 0 else f"call {i}"
        print(f"{label}: {seconds:.2f} s for {args.images} image(s), {seconds / args.images:.2f} s per image -> {list(out.shape)}")


if __name__ == "__main__":
    main()

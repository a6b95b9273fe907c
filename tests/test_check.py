"""`gemmalite check` and `gemmalite.check()`: the compiled path, proved on this machine.

The report is built once (compiling the tiny model's two graphs takes most of the time); the CLI
runs reuse those graphs, since they build a model of the same shapes.
"""

from __future__ import annotations

import re

import pytest
import torch

import gemmalite
from gemmalite import cli

CUDA_CHECKS = ("CUDA graph replays", "kept graph outputs intact")


@pytest.fixture(scope="module")
def report():
    return gemmalite.check(device="cpu")


def run(capsys, *args):
    status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_every_check_passes_on_cpu(report):
    assert report.ok, report.format()
    statuses = {r.name: r.status for r in report.results}
    for name in ("bf16", "inductor + compiler", "compiled == eager greedy", "compiled == eager sampled (seeded)",
                 "compiled graphs bounded", "graph breaks"):
        assert statuses[name] == "PASS", report.format()
    assert set(statuses.values()) <= {"PASS", "SKIP", "INFO"}


def test_greedy_comparison_covers_many_ring_wraps(report):
    detail = report["compiled == eager greedy"].detail
    assert detail.startswith("200/200 tokens")
    assert int(re.search(r"(\d+) ring wraps", detail).group(1)) == 12  # 204 positions in a ring of 16


def test_cuda_checks_are_skipped_without_cuda(report):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for name in CUDA_CHECKS:
        result = report[name]
        assert result.skipped and not result.failed and not result.passed
        assert "no CUDA" in result.detail
    assert report["CUDA"].detail.startswith("no CUDA")


def test_report_names_torch_version_graph_count_and_breaks(report):
    assert torch.__version__ in report["torch"].detail
    graphs = report["compiled graphs bounded"].detail
    new = int(re.search(r"(\d+) new decode_step graph", graphs).group(1))
    assert 1 <= new <= 3  # this module compiled the tiny model's shapes first: greedy, plain and top-k sampling
    assert "0 more over 2 further calls (96 steps" in graphs
    assert report["graph breaks"].detail.startswith("0 graph break(s)")
    text = report.format()
    assert "PASS  compiled == eager greedy: 200/200 tokens, 12 ring wraps" in text
    assert "PASS  compiled prefill == eager" in text  # the seventh check: compiled prefill
    assert text.splitlines()[-1].startswith("all checks passed: 8 passed, 0 failed, 2 skipped")


def test_the_verification_graphs_are_listed(report):
    detail = report["compiled speculative verification == eager plain decoding"].detail
    assert "24 greedy tokens with prompt lookup equal plain eager decoding's" in detail
    accepted = int(re.search(r"(\d+) of \d+ drafts accepted", detail).group(1))
    assert accepted > 0
    graphs = int(re.search(r"(\d+) graph\(s\): speculative verification \(batch 1, 9 tokens", detail).group(1))
    assert 1 <= graphs <= 2  # one per span reached


def test_speed_is_measured(report):
    for name in ("decode eager", "decode compiled"):
        speed = float(re.match(r"([\d.]+) tok/s", report[name].detail).group(1))
        assert speed > 0
    assert "x eager" in report["decode compiled"].detail


def test_cli_check_exits_0_and_prints_the_report(capsys):
    status, out, err = run(capsys, "check", "--device", "cpu")
    assert status == 0, out + err
    lines = out.splitlines()
    assert lines[0] == "Environment"
    assert f"  INFO  torch: {torch.__version__}" in out
    assert "  PASS  compiled == eager greedy: 200/200 tokens, 12 ring wraps" in out
    assert "  PASS  graph breaks: 0 graph break(s)" in out
    if not torch.cuda.is_available():
        assert "  SKIP  CUDA graph replays: skipped: no CUDA" in lines
    assert lines[-1].startswith("all checks passed")
    assert "Traceback" not in err


def test_cli_check_reports_a_failure_with_exit_1(capsys, monkeypatch):
    real = gemmalite.Engine.generate_ids

    def tampered(self, prompts, **kwargs):  # the compiled path gets token 50 wrong
        out = real(self, prompts, **kwargs)
        if self.compiled and len(out[0]) > 50:
            out[0][50] = (out[0][50] + 1) % self.config.vocab_size
        return out

    monkeypatch.setattr(gemmalite.Engine, "generate_ids", tampered)
    status, out, _ = run(capsys, "check", "--device", "cpu")  # default steps: the shapes compiled already
    assert status == 1, out
    failed = [line for line in out.splitlines() if line.startswith("  FAIL")]
    assert len(failed) == 1, out
    assert failed[0].startswith("  FAIL  compiled == eager greedy: 199/200 tokens equal; first difference at token 50")
    assert "1 check(s) FAILED" in out.splitlines()[-1]


@pytest.mark.parametrize(
    "args, word",
    [(["--steps", "0"], "--steps"), (["--device", "tpu"], "tpu"), (["--dtype", "fp16"], "float16")],
)
def test_cli_check_bad_arguments_are_usage_errors(capsys, args, word):
    status, out, err = run(capsys, "check", *args)
    assert status == 2 and out == ""
    assert err.startswith("gemmalite: error: ") and word in err and len(err.splitlines()) == 1

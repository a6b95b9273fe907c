"""scripts/gpu_report.sh: a part cut off by its cap keeps what it measured, and kernel calls are counted right.

The GPU report runs once, on a lent GPU with a fixed budget, so what matters most is that every
figure is written when it is measured. The slice run here is the 1B part at tiny shapes on CPU
under a cap that leaves time for its eager figures (measured first) but usually not for its
compiled ones, whichever way it ends.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "scripts" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_report"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_capped_part_leaves_its_figures_in_markdown_and_json(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        ["bash", "scripts/gpu_report.sh", str(out), "--device", "cpu", "--tiny", "--parts", "1b", "--cap", "1b=20"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert report.startswith("# gemmalite GPU report (tiny settings)")
    assert "torch " in report and "transformers " in report
    assert "## 4. Gemma 3 1B shape cut to 2 layers" in report
    assert "_part 1b: finished in" in report or "_part 1b: **cut off by its cap of" in report

    records = [json.loads(line) for line in (out / "figures.jsonl").read_text().splitlines()]
    figures = [r for r in records if r["part"] == "1b" and "engine" in r]
    assert {(r["engine"], r["figure"]) for r in figures} >= {
        ("gemmalite eager", "decode_tok_s@b1"), ("gemmalite eager", "decode_tok_s@b8"), ("gemmalite eager", "ttft_s@32"),
    }
    assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in figures)
    for r in figures:  # every JSON figure has its markdown row
        assert f"| {r['engine']} | {r['figure']} |" in report
    (end,) = [r for r in records if r.get("figure") == "part_s"]
    assert end["cap_s"] >= 20  # its own cap, and what the header left unused
    assert end["cut_off"] == (end["rc"] in (124, 137)) and end["rc"] in (0, 124, 137)


def test_kernel_calls_are_counted_in_python_and_cpp_wrappers():
    count = load_script().count_kernel_calls
    python_wrapper = """
        # Topologically Sorted Source Nodes: [mm], Original ATen: [aten.mm]
        cpp_fused_add_mean_0(arg0_1, buf0)
        extern_kernels.mm(reinterpret_tensor(buf0, (1, 64), (0, 1), 0), arg1_1, out=buf1)
        buf2 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(buf1, arg2_1, arg3_1, scale=0.25)
        assert_size_stride(buf3, (1, 4), (4, 1), 'torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default')
        buf4 = empty_strided_cpu((1, 64), (64, 1), torch.float32)
        triton_poi_fused_mul_1.run(buf1, buf4, 64, stream=stream0)
        arg4_1.copy_(buf4)
    """
    assert count(python_wrapper) == {"fused": 2, "mm": 1, "_scaled_dot_product_flash_attention_for_cpu": 1, "copy": 1}
    cpp_wrapper = """
    AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(3, int_array_0, int_array_0, dtype, device, 0, &buf0_handle));
    cpp_fused_add_embedding_0((const int64_t*)(arg0_1.data_ptr()), (float*)(buf0.data_ptr()));
    AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_mm_out(buf2, wrap_with_raii_handle_if_needed(buf1), arg9_1));
    AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu__scaled_dot_product_flash_attention_for_cpu(buf13, arg12_1, arg14_1));
            aoti_torch_call_dispatcher("gemmalite::packed_linear", "", dispatch_vars.data())
    assert_size_stride(buf3, {1L, 128L, 1536L}, {196608L, 1536L, 1L}, "torch.ops.gemmalite.packed_linear.default");
    """
    assert count(cpp_wrapper) == {"fused": 1, "mm": 1, "_scaled_dot_product_flash_attention_for_cpu": 1, "packed_linear": 1}


def test_slow_engines_get_fewer_tokens_within_bounds():
    script = load_script()
    s = script.settings("cpu", quick=False, tiny=False)
    assert s.tokens_for(1 / 700) > s.tokens_for(1 / 40) > s.min_tokens  # fast compiled vs eager on a GPU
    assert s.tokens_for(1.0) == s.min_tokens and s.tokens_for(1e-9) == s.max_tokens


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

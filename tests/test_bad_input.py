"""Bad input gets a clear exception of gemmalite's own, and loses nothing."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemmalite
from gemmalite import weights
from gemmalite.errors import ContextLengthError, InvalidArgumentError, ModelLoadError


@pytest.fixture
def checkpoint(tiny, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, free to break."""
    return Path(shutil.copytree(tiny[0], tmp_path / "ckpt"))


def edit_config(path: Path, **changes):
    raw = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    (path / "config.json").write_text(json.dumps(raw))


def edit_tensors(path: Path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def shard(path: Path, weight_map_edit):
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, path / "a.safetensors")
    save_file({k: tensors[k] for k in names[half:]}, path / "b.safetensors")
    weight_map = {k: "a.safetensors" for k in names[:half]} | {k: "b.safetensors" for k in names[half:]}
    weight_map_edit(weight_map)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def truncate(path: Path, keep: int):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:keep])


def set_shard(name):
    def edit(weight_map):
        weight_map[next(iter(weight_map))] = name
    return edit


SOURCE_CASES = {
    "missing_path": (lambda p: p / "nope", "not found"),
    "empty_dir": (lambda p: (p.joinpath("empty").mkdir(), p / "empty")[1], "config.json"),
    "llama_config": (lambda p: (edit_config(p, model_type="llama"), p)[1], "not a Gemma 3"),
    "gemma2_config": (lambda p: (edit_config(p, model_type="gemma2"), p)[1], "not a Gemma 3"),
    "config_missing_fields": (lambda p: (edit_config(p, hidden_size=None, num_hidden_layers=None), p)[1], "hidden_size"),
    "config_not_json": (lambda p: ((p / "config.json").write_text("{oops"), p)[1], "config.json"),
    "truncated_safetensors": (lambda p: (truncate(p, 5000), p)[1], "truncated or corrupt"),
    "garbage_safetensors": (lambda p: ((p / "model.safetensors").write_bytes(b"\x00" * 64), p)[1], "truncated or corrupt"),
    "tensor_missing": (
        lambda p: (edit_tensors(p, lambda t: t.pop("model.layers.3.mlp.up_proj.weight")), p)[1],
        "missing tensors: layers.3.mlp.up_proj.weight",
    ),
    "tensor_wrong_shape": (
        lambda p: (edit_tensors(p, lambda t: t.update({"model.layers.0.mlp.gate_proj.weight": torch.zeros(100, 64)})), p)[1],
        r"model.layers.0.mlp.gate_proj.weight.*\[100, 64\].*\[128, 64\]",
    ),
    "config_disagrees_with_weights": (lambda p: (edit_config(p, intermediate_size=96), p)[1], r"has shape \[\d+, \d+\], but the config implies"),
    "extra_unknown_tensor": (
        lambda p: (edit_tensors(p, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(3)})), p)[1],
        "unexpected tensor 'model.layers.0.mystery.weight'",
    ),
    "shard_missing": (lambda p: (shard(p, set_shard("c.safetensors")), p)[1], "c.safetensors, which is missing"),
    "shard_outside_dir": (lambda p: (shard(p, set_shard("../../etc/passwd")), p)[1], "outside the checkpoint"),
    "shard_absolute_path": (lambda p: (shard(p, set_shard("/etc/passwd")), p)[1], "outside the checkpoint"),
    "pickled_weights_only": (
        lambda p: ((p / "model.safetensors").rename(p / "pytorch_model.bin"), p)[1],
        "never unpickles",
    ),
    "a_file_not_a_dir": (lambda p: p / "config.json", "is a file"),
}


@pytest.mark.parametrize("case", sorted(SOURCE_CASES))
def test_bad_sources_raise_model_load_error(checkpoint, case):
    make, message = SOURCE_CASES[case]
    source = make(checkpoint)
    with pytest.raises(ModelLoadError, match=message):
        gemmalite.load(source, dtype="float32")


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download, the boundary with the network."""

    def __init__(self, result=None, error=None):
        self.result, self.error, self.calls = result, error, []

    def __call__(self, repo_id, **kwargs):
        self.calls.append((repo_id, kwargs))
        if self.error:
            raise self.error
        return str(self.result)


def hub_error(kind):
    import huggingface_hub.errors as e
    from unittest.mock import MagicMock

    response = MagicMock(status_code=404, headers={})
    return {
        "gated": lambda: e.GatedRepoError("gated", response=response),
        "missing": lambda: e.RepositoryNotFoundError("missing", response=response),
        "offline": lambda: e.LocalEntryNotFoundError("offline"),
    }[kind]()


@pytest.mark.parametrize(
    "kind, message",
    [("gated", "accept its license.*HF_TOKEN"), ("missing", "not found"), ("offline", "cannot be reached")],
)
def test_hub_errors_say_what_to_do(monkeypatch, kind, message):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(error=hub_error(kind)))
    with pytest.raises(ModelLoadError, match=message):
        gemmalite.load("google/gemma-3-1b-it")


def test_hub_id_downloads_only_what_is_needed_and_loads(monkeypatch, tiny):
    import huggingface_hub

    fake = FakeHub(result=tiny[0])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    engine = gemmalite.load("google/gemma-3-1b-it", dtype="float32")
    assert fake.calls[0][0] == "google/gemma-3-1b-it"
    patterns = fake.calls[0][1]["allow_patterns"]
    assert "*.safetensors" in patterns and "tokenizer.model" in patterns
    assert not any(p.endswith((".bin", ".pt", ".gguf")) for p in patterns)
    assert engine.generate_ids([[2, 5]], max_new_tokens=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype="float16"), "float16 is refused"),
        (dict(dtype=torch.float16), "float16 is refused"),
        (dict(dtype="int3"), "unknown dtype"),
        (dict(device="tpu"), "unknown device|not supported"),
        (dict(device="banana"), "unknown device"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(max_seq_len=10**9), "max_seq_len"),
    ],
)
def test_bad_load_arguments(tiny, kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        gemmalite.load(tiny[0], **kwargs)


def test_cuda_without_a_gpu_is_a_clear_error(tiny):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(InvalidArgumentError, match="no CUDA GPU"):
        gemmalite.load(tiny[0], device="cuda")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: e.generate("hi", temperature=-1), "temperature"),
        (lambda e: e.generate("hi", top_p=0), "top_p"),
        (lambda e: e.generate("hi", top_p=1.5), "top_p"),
        (lambda e: e.generate("hi", top_k=-1), "top_k"),
        (lambda e: e.generate("hi", min_p=1.5), "min_p"),
        (lambda e: e.generate("hi", min_p=-0.5), "min_p"),
        (lambda e: e.generate("hi", max_new_tokens=-1), "max_new_tokens"),
        (lambda e: e.generate("hi", stop=""), "stop"),
        (lambda e: e.generate(["hi", [2, 3]]), "all strings"),
        (lambda e: e.generate([]), "non-empty"),
        (lambda e: e.generate("hi", system="x"), "chat=True"),
        (lambda e: e.generate_ids([[2, 3], "hi"]), "all strings"),
        (lambda e: e.generate_ids([[]]), "empty"),
        (lambda e: e.generate_ids([[2, 400]]), r"\[0, 400\)"),
        (lambda e: e.generate_ids([[2, -1]]), r"\[0, 400\)"),
        (lambda e: e.generate_ids([[2] * 1024]), "max_seq_len"),
        (lambda e: e.logits(torch.tensor([[2, 999]])), r"\[0, 400\)"),
        (lambda e: e.logits([[2, 3]]), "LongTensor"),
        (lambda e: e.stream(["a", "b"]).__next__(), "one prompt"),
    ],
)
def test_bad_generation_arguments(tiny_engine, call, message):
    with pytest.raises(InvalidArgumentError, match=message):
        call(tiny_engine)
    # Nothing is lost: the engine still works after the error.
    assert len(tiny_engine.generate_ids([[2, 5]], max_new_tokens=2, ignore_eos=True)[0]) == 2


def test_prompt_too_long_for_the_context_is_a_context_length_error(tiny_engine):
    with pytest.raises(ContextLengthError):
        tiny_engine.prefill(tiny_engine.kv_cache(1), [[2] * 1024])


def test_no_tokenizer_means_text_apis_fail_clearly_and_id_apis_work(tiny, tmp_path):
    directory = Path(shutil.copytree(tiny[0], tmp_path / "notok"))
    (directory / "tokenizer.model").unlink()
    engine = gemmalite.load(directory, dtype="float32")
    assert engine.tokenizer is None
    with pytest.raises(InvalidArgumentError, match="no tokenizer.model"):
        engine.generate("hello")
    assert len(engine.generate_ids([[2, 7, 8]], max_new_tokens=4, ignore_eos=True)[0]) == 4


def test_hub_id_pattern_does_not_swallow_local_paths():
    assert weights.HUB_ID.match("google/gemma-3-1b-it")
    with pytest.raises(ModelLoadError, match="not found"):
        gemmalite.load("./google/gemma-3-1b-it")

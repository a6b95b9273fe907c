"""Image input against transformers' Gemma3ForConditionalGeneration, on a tiny random checkpoint in fp32.

The tiny tower takes 56x56 images in 14px patches (a 4x4 grid) and pools them to 4 soft tokens,
so an image block (<start_of_image>, 4 image tokens, <end_of_image>) is longer than half of the
tiny model's 8-token prefill chunks: images straddle chunk boundaries unless the runner moves them.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import gemmalite
from gemmalite.errors import GemmaliteError, InvalidArgumentError, MissingExtraError

from conftest import MARGIN, TINY, train_tokenizer

PIL = pytest.importorskip("PIL.Image")

IMAGE_TOKEN, START_OF_IMAGE, END_OF_IMAGE = 401, 6, 7  # the soft token lies past the SentencePiece vocab, as in Gemma 3
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)
TOKENS_PER_IMAGE = 4


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(checkpoint dir, transformers model, Gemma3Processor) of a tiny random multimodal Gemma 3."""
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    directory = tmp_path_factory.mktemp("vlm")
    torch.manual_seed(0)
    config = Gemma3Config(
        text_config={**TINY, "vocab_size": 416},
        vision_config={**VISION, "vision_use_head": False},
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=START_OF_IMAGE,
        eoi_token_index=END_OF_IMAGE,
        image_token_index=IMAGE_TOKEN,
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "vision" not in name:  # Gemma's norms start at zero, hiding a missing (1 + weight)
                p.normal_(0.0, 0.5)
            elif "mm_input_projection" in name:  # zero at init, which would make every image vanish
                p.normal_(0.0, 0.3)
            elif "vision" in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    train_tokenizer(directory, ("<start_of_image>", "<end_of_image>"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    settings = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "extra_special_tokens": extra, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    assert tokenizer.image_token_id == IMAGE_TOKEN and tokenizer.boi_token_id == START_OF_IMAGE
    size = {"height": VISION["image_size"], "width": VISION["image_size"]}
    processor = Gemma3Processor(Gemma3ImageProcessorPil(size=size), tokenizer, image_seq_length=TOKENS_PER_IMAGE)
    return directory, model, processor


@pytest.fixture(scope="module")
def engine(vlm):
    return gemmalite.load(vlm[0], dtype="float32", compile=False, max_seq_len=256, rewind_margin=MARGIN)


def picture(seed: int, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return PIL.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def reference(vlm, text: str, images: list):
    """transformers' inputs for a prompt with images: ids, pixel values, token types."""
    _, _, processor = vlm
    return processor(text=text, images=images or None, return_tensors="pt")


def reference_logits(vlm, inputs) -> torch.Tensor:
    with torch.no_grad():
        return vlm[1](**inputs).logits[0].float()


def reference_greedy(vlm, inputs, n: int) -> list[int]:
    with torch.no_grad():
        out = vlm[1].generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def gemmalite_logits(engine, ids: list[int], images: list, expected: torch.Tensor | None = None) -> torch.Tensor:
    """The last-token logits of every prefix of a prompt that does not end inside an image (whose
    tokens see the image's later ones), each prefilled as the runner chunks it; with `expected`
    (the reference's logits at every position), the reference's rows at those positions too."""
    from gemmalite.vision import prepare

    seen = prepare(engine.image_encoder, [ids], [images])
    cache = engine.runner.new_cache(1)
    ends = {span.end - 1 for span, _ in seen.rows[0]}
    # Each image's last token, the token after it, one text token before the images, and the last
    # (every prefix costs a prefill).
    rows, at = [], sorted({p for p in range(len(ids)) if p - 1 in ends or p in ends} | {2, len(ids) - 1})
    with torch.no_grad():
        for p in at:
            cache.reset()
            rows.append(engine.runner.prefill(cache, [ids[: p + 1]], [[(s, f) for s, f in seen.rows[0] if s.end <= p + 1]])[0])
    return torch.stack(rows) if expected is None else (torch.stack(rows), expected[at])


def close(pair, rtol=1e-4):
    a, b = pair
    scale = b.abs().max()
    assert (a - b).abs().max() <= rtol * scale, float((a - b).abs().max() / scale)


# ---------------------------------------------------------------- preprocessing and the tower
@pytest.mark.parametrize("size,mode", [((40, 30), "RGB"), ((56, 56), "RGBA"), ((90, 17), "L"), ((300, 200), "RGB")])
def test_pixel_values_equal_the_reference_processor(vlm, size, mode):
    from gemmalite.vision.images import pixel_values

    image = picture(1, size, mode)
    expected = vlm[2].image_processor(image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(pixel_values(image, VISION["image_size"]), expected)


def test_image_features_match_transformers(vlm, engine):
    from gemmalite.vision.images import pixel_values

    pixels = torch.stack([pixel_values(picture(i), VISION["image_size"]) for i in range(3)])
    with torch.no_grad():
        expected = vlm[1].model.get_image_features(pixels).pooler_output
        got = engine.image_encoder(pixels)
    assert got.shape == (3, TOKENS_PER_IMAGE, TINY["hidden_size"])
    close((got, expected))


# ---------------------------------------------------------------- prompts
@pytest.mark.parametrize(
    "text,count",
    [
        ("Look: <start_of_image> and say", 1),
        ("<start_of_image>\n\nfirst\n<start_of_image>second", 2),
        ("two in a row <start_of_image><start_of_image>.", 2),
        ("The fox\n\n\n<start_of_image>\n", 1),
    ],
)
def test_prompt_ids_equal_the_reference_processor(vlm, engine, text, count):
    images = [picture(i) for i in range(count)]
    expected = reference(vlm, text, images)["input_ids"][0].tolist()
    assert engine.encode(text, images=count) == expected


def test_chat_prompt_puts_images_at_the_start_of_the_turn(vlm, engine):
    expected_text = "<start_of_turn>user\nBe brief.\n\n<start_of_image>What is it?<end_of_turn>\n<start_of_turn>model\n"
    expected = reference(vlm, expected_text, [picture(0)])["input_ids"][0].tolist()
    assert engine.encode("What is it?", chat=True, system="Be brief.", images=1) == expected


# ---------------------------------------------------------------- the model with images
ONE = "A picture: <start_of_image> shows the quick brown fox"
TWO = "First <start_of_image> then <start_of_image> and the lazy dog"


def test_logits_with_an_image_match_transformers(vlm, engine):
    images = [picture(3)]
    inputs = reference(vlm, ONE, images)
    ids = inputs["input_ids"][0].tolist()
    close(gemmalite_logits(engine, ids, images, reference_logits(vlm, inputs)))


def test_two_images_of_other_sizes_and_modes_match_transformers(vlm, engine):
    images = [picture(4, (80, 20), "RGBA"), picture(5, (17, 33), "L")]
    inputs = reference(vlm, TWO, images)
    close(gemmalite_logits(engine, inputs["input_ids"][0].tolist(), images, reference_logits(vlm, inputs)))
    assert engine.generate_ids([inputs["input_ids"][0].tolist()], images=[images], max_new_tokens=8) == [
        reference_greedy(vlm, inputs, 8)
    ]


def test_greedy_tokens_with_an_image_equal_transformers(vlm, engine):
    images = [picture(6)]
    inputs = reference(vlm, ONE, images)
    done = engine.complete(ONE, images=images, max_new_tokens=16, ignore_eos=True)
    assert done.token_ids == reference_greedy(vlm, inputs, 16)
    assert done.usage.prompt_tokens == inputs["input_ids"].shape[1]


def test_the_bidirectional_image_mask_changes_the_logits(vlm, engine, monkeypatch):
    """With image tokens causal the logits move away from the reference: the mask is really there."""
    from gemmalite import model as model_module

    images = [picture(7)]
    inputs = reference(vlm, ONE, images)
    ids = inputs["input_ids"][0].tolist()
    expected = reference_logits(vlm, inputs)
    causal = model_module.attention_mask
    monkeypatch.setattr(model_module, "attention_mask", lambda *args: causal(*args[:5]))
    wrong, right = gemmalite_logits(engine, ids, images, expected)
    assert (wrong - right).abs().max() > 1e-2 * right.abs().max()


def test_the_mask_opens_each_image_to_itself_only():
    from gemmalite.mask import attention_mask

    positions = torch.arange(8)[None]
    valid = torch.ones(1, 8, dtype=torch.bool)
    spans = [(2, 4), (5, 7)]  # two images, [start, end)
    start, end = torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)
    for a, b in spans:
        start[0, a:b], end[0, a:b] = a, b
    for window in (None, 3):
        mask = attention_mask(positions, valid, positions, valid, window, (start, end))[0, 0]
        for q in range(8):
            for k in range(8):
                same_image = any(a <= q < b and a <= k < b for a, b in spans)
                expected = (k <= q or same_image) and (window is None or q - k < window)
                assert bool(mask[q, k]) == expected, (window, q, k)


def test_an_image_never_straddles_a_prefill_chunk(engine):
    from gemmalite.runner import chunk_cuts
    from gemmalite.vision import ImageSpan

    spans = [ImageSpan(5, 4), ImageSpan(10, 4)]
    cuts = [c[0] for c in chunk_cuts([20], 8, [spans])]
    assert cuts == [(0, 5), (5, 10), (10, 18), (18, 20)]
    for start, end in cuts:
        assert all(end <= s.start or end >= s.end for s in spans)


def test_a_batch_with_and_without_images_gives_each_prompt_its_own_tokens(vlm, engine):
    """Rows of a ragged batch see only their own images: each gets what it gets alone."""
    prompts = [ONE, "Just text, no image at all here", TWO]
    images = [[picture(8)], [], [picture(9, (30, 60)), picture(10, (60, 30))]]
    together = engine.complete(prompts, images=images, max_new_tokens=10, ignore_eos=True)
    for prompt, given, done in zip(prompts, images, together):
        expected = reference_greedy(vlm, reference(vlm, prompt, given), 10)
        assert done.token_ids == expected


def test_a_chat_prompt_with_an_image_matches_transformers(vlm, engine):
    images = [picture(11)]
    text = "<start_of_turn>user\n<start_of_image>Describe it.<end_of_turn>\n<start_of_turn>model\n"
    expected = reference_greedy(vlm, reference(vlm, text, images), 10)
    assert engine.complete("Describe it.", chat=True, images=images, max_new_tokens=10, ignore_eos=True).token_ids == expected


# ---------------------------------------------------------------- loading
def renamed_copy(vlm, tmp_path, rename) -> str:
    directory = tmp_path / "renamed"
    shutil.copytree(vlm[0], directory)
    state = load_file(directory / "model.safetensors")
    save_file({rename(name): t for name, t in state.items()}, directory / "model.safetensors")
    return directory


def hub_name(name: str) -> str:
    return name.replace("vision_tower.", "vision_tower.vision_model.", 1) if name.startswith("vision_tower.") else name


def transformers5_name(name: str) -> str:
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model.") :]
    return "model." + name


@pytest.mark.parametrize("rename", [hub_name, transformers5_name])
def test_both_namings_of_a_multimodal_checkpoint_load(vlm, engine, tmp_path, rename):
    names = load_file(vlm[0] / "model.safetensors").keys()
    assert any(rename(n).startswith(("vision_tower.vision_model.", "model.vision_tower.")) for n in names)
    other = gemmalite.load(renamed_copy(vlm, tmp_path, rename), dtype="float32", compile=False, max_seq_len=256, rewind_margin=MARGIN)
    images = [picture(12)]
    assert other.vision
    assert other.complete(ONE, images=images, max_new_tokens=6).token_ids == engine.complete(ONE, images=images, max_new_tokens=6).token_ids


def test_vision_false_skips_the_tower_and_refuses_images(vlm, engine):
    text_only = gemmalite.load(vlm[0], dtype="float32", compile=False, max_seq_len=256, rewind_margin=MARGIN, vision=False)
    assert engine.vision and not text_only.vision and text_only.image_encoder is None
    assert text_only.generate("The quick brown fox", max_new_tokens=5) == engine.generate("The quick brown fox", max_new_tokens=5)
    with pytest.raises(InvalidArgumentError, match="vision=False"):
        text_only.generate(ONE, images=[picture(0)])


def test_a_text_only_model_refuses_images(tiny_engine):
    assert not tiny_engine.vision
    with pytest.raises(InvalidArgumentError, match="text-only"):
        tiny_engine.complete("<start_of_image>", images=[picture(0)])


# ---------------------------------------------------------------- bad input
def test_bad_images_get_clear_errors_and_the_engine_goes_on(engine, tmp_path):
    def refused(match, **kwargs):
        with pytest.raises(GemmaliteError, match=match):
            engine.complete(kwargs.pop("prompt", ONE), max_new_tokens=2, **kwargs)

    refused("1 image block.*but 2 image", images=[picture(0), picture(1)])
    refused("0 image block.*but 1 image", prompt="no marker here", images=[picture(0)])
    refused("2 image block.*but 1 image", prompt=TWO, images=[picture(0)])
    refused("not an image", images=[b"certainly not a PNG"])
    png = io.BytesIO()
    picture(0).save(png, format="PNG")
    refused("truncated or corrupt", images=[png.getvalue()[:60]])
    refused("no such file", images=[tmp_path / "missing.png"])
    (tmp_path / "notes.txt").write_text("hello")
    refused("not an image", images=[tmp_path / "notes.txt"])
    refused("uint8", images=[np.zeros((8, 8, 3), dtype=np.float32)])
    refused("give a PIL image", images=[42])
    refused("2 lists", prompt=[ONE, ONE], images=[picture(0)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PIL, "MAX_IMAGE_PIXELS", 100)
        refused("decompression bomb", images=[png.getvalue()])
    # Every kind of input names the same image.
    (tmp_path / "ok.png").write_bytes(png.getvalue())
    kinds = [picture(0), png.getvalue(), str(tmp_path / "ok.png"), np.asarray(picture(0))]
    outs = {tuple(engine.complete(ONE, images=[k], max_new_tokens=1, logprobs=0).logprobs) for k in kinds}
    assert len(outs) == 1


def test_missing_pillow_names_the_extra(engine, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pillow(name, *args, **kwargs):
        if name.startswith("PIL"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pillow)
    with pytest.raises(MissingExtraError, match=r"gemmalite\[vision\]"):
        engine.complete(ONE, images=[b"\x89PNG"], max_new_tokens=2)


# ---------------------------------------------------------------- caches
def test_prompt_reuse_recognises_the_same_image_by_content(vlm, engine):
    reused = gemmalite.load(vlm[0], dtype="float32", compile=False, max_seq_len=256, rewind_margin=64)
    first = reused.complete(ONE, images=[picture(13)], max_new_tokens=4)
    again = reused.complete(ONE + " again", images=[picture(13)], max_new_tokens=4)
    assert again.usage.cached_tokens > first.usage.prompt_tokens - 8
    other = reused.complete(ONE + " again", images=[picture(14)], max_new_tokens=4)
    start = engine.encode(ONE, images=1).index(IMAGE_TOKEN)
    assert other.usage.cached_tokens <= start
    fresh = engine.complete(ONE + " again", images=[picture(14)], max_new_tokens=4)
    assert other.token_ids == fresh.token_ids


def reference_greedy_ids(vlm, ids: list[int], images: list, n: int) -> list[int]:
    """transformers' greedy continuation of token ids whose image blocks hold `images`."""
    pixels = vlm[2].image_processor(images, return_tensors="pt")["pixel_values"]
    input_ids = torch.tensor([ids])
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                  token_type_ids=(input_ids == IMAGE_TOKEN).long())
    return reference_greedy(vlm, inputs, n)


def test_a_session_turn_after_an_image_matches_transformers(vlm, engine):
    image = picture(15)
    chat = engine.session()
    chat.send("Describe it.", images=[image], max_new_tokens=5, ignore_eos=True)
    second = chat.send("And then?", max_new_tokens=5, ignore_eos=True)
    reply = chat.tokens[-5:]
    assert reply == reference_greedy_ids(vlm, chat.tokens[:-5], [image], 5)
    chat.undo()  # beyond the tiny rewind margin: the cache starts over and the image is fed again
    assert chat.send("And then?", max_new_tokens=5, ignore_eos=True) == second


# ---------------------------------------------------------------- the command line
CLI_BASE = ["--dtype", "float32", "--device", "cpu", "--no-compile", "--temperature", "0", "-q", "-n", "6", "--ignore-eos"]


def test_the_cli_takes_images(vlm, engine, capsys, tmp_path):
    from gemmalite import cli

    picture(16).save(tmp_path / "a.png")
    expected = engine.generate(ONE, images=[tmp_path / "a.png"], max_new_tokens=6, ignore_eos=True)
    assert cli.main(["-m", str(vlm[0]), *CLI_BASE, "--image", str(tmp_path / "a.png"), ONE]) == 0
    assert capsys.readouterr().out == expected
    assert cli.main(["-m", str(vlm[0]), *CLI_BASE, "--image", str(tmp_path / "missing.png"), ONE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]


def test_chat_attaches_an_image_with_a_command(vlm, engine, capsys, monkeypatch, tmp_path):
    from gemmalite import cli

    picture(17).save(tmp_path / "b.png")
    lines = iter([f"/image {tmp_path / 'missing.png'}", f"/image {tmp_path / 'b.png'}", "What is it?"])

    def typed(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", typed)
    assert cli.main(["chat", "-m", str(vlm[0]), *CLI_BASE]) == 0
    out, err = capsys.readouterr()
    assert out == engine.session().send("What is it?", images=[tmp_path / "b.png"], max_new_tokens=6, ignore_eos=True) + "\n"
    assert "no such file" in err and "image 1 attached" in err


# ---------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def client(vlm):
    """The openai client, on the server's app in-process (2 slots), for the tiny multimodal model
    (with room to step back over a reply, so that a request sent again reuses its slot)."""
    openai = pytest.importorskip("openai")
    from starlette.testclient import TestClient

    from gemmalite.batching import Scheduler
    from gemmalite.serve.app import create_app

    engine = gemmalite.load(vlm[0], dtype="float32", compile=False, max_seq_len=256, rewind_margin=64)
    scheduler = Scheduler(engine, parallel=2)
    scheduler.start()
    with TestClient(create_app(engine, scheduler, model="tiny")) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0), http
    scheduler.close()


def data_url(image, format="PNG") -> str:
    import base64

    encoded = io.BytesIO()
    image.save(encoded, format=format)
    return f"data:image/{format.lower()};base64," + base64.b64encode(encoded.getvalue()).decode()


def test_the_server_answers_an_image_message(vlm, engine, client):
    openai_client, http = client
    image = picture(18)
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": "What is it?"}]
    messages = [{"role": "user", "content": content}]
    reply = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    expected = engine.complete("What is it?", chat=True, images=[image], max_new_tokens=6)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    again = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == expected.text
    assert again.usage.prompt_tokens_details.cached_tokens > expected.usage.prompt_tokens // 2  # the image came from the cache
    jpeg = [{"type": "image_url", "image_url": {"url": data_url(image, "JPEG")}}, {"type": "text", "text": "And this?"}]
    assert openai_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": jpeg}], max_tokens=2).choices


@pytest.mark.parametrize(
    "url,word",
    [("https://example.com/cat.png", "--allow-image-urls"), ("data:image/png;base64,@@@", "not valid base64"),
     ("data:image/png;base64,aGVsbG8=", "not an image"), ("file:///etc/passwd", "--image-dir"), ("ftp://host/a.png", "data: URL")],
)  # fmt: skip
def test_the_server_refuses_bad_images_with_400(client, url, word):
    _, http = client
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}]
    answer = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "max_tokens": 2})
    assert answer.status_code == 400 and word in answer.json()["error"]["message"]


def test_the_server_reads_http_and_file_images_where_the_operator_allows(client, tmp_path):
    """With --allow-image-urls and --image-dir, an image sent by URL or path gets the answer the same
    image gets inline; a file outside the directory is refused."""
    import functools
    import http.server
    import threading

    from starlette.testclient import TestClient

    from gemmalite.serve.app import create_app
    from gemmalite.serve.media import ImageSources

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    _, inline = client
    api = inline.app.state.api
    picture(21).save(tmp_path / "cat.png")
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    app = create_app(api.engine, api.scheduler, model="tiny", image_sources=ImageSources(allow_urls=True, directory=tmp_path))

    def reply(http, url):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}
        return http.post("/v1/chat/completions", json=body)

    try:
        with TestClient(app) as opened:
            expected = reply(inline, data_url(picture(21))).json()["choices"][0]["message"]["content"]
            fetched = reply(opened, f"http://127.0.0.1:{site.server_address[1]}/cat.png")
            read = reply(opened, f"file://{tmp_path}/cat.png")
            assert fetched.json()["choices"][0]["message"]["content"] == expected
            assert read.json()["choices"][0]["message"]["content"] == expected
            outside = reply(opened, f"file://{tmp_path}/../cat.png")
            assert outside.status_code == 400 and "outside" in outside.json()["error"]["message"]
    finally:
        site.shutdown()


@pytest.mark.slow
def test_compiled_prefill_with_images_equals_eager(compiled_engine, tiny_engine):
    """A compiled prefill chunk holding an image gives eager's logits (on the suite's one compiled
    engine, with image features made up: the runner does not care where they come from)."""
    from gemmalite.vision import ImageSpan

    torch.manual_seed(0)
    ids = tiny_engine.encode("The quick brown fox jumps over the lazy dog, again and again")
    images = [[(ImageSpan(6, 4), torch.randn(4, TINY["hidden_size"])), (ImageSpan(13, 4), torch.randn(4, TINY["hidden_size"]))]]
    logits = {}
    for name, engine in (("eager", tiny_engine), ("compiled", compiled_engine)):
        cache = engine.runner.new_cache(1)
        logits[name] = engine.runner.prefill(cache, [ids], images)[0]
    close((logits["compiled"], logits["eager"]))
    text_only = tiny_engine.runner.prefill(tiny_engine.runner.new_cache(1), [ids])[0]
    assert (text_only - logits["eager"]).abs().max() > 1e-3  # the images were really fed

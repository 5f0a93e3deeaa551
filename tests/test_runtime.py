"""The torch-free runtime: sampling, streaming, stop strings, batching, errors, import boundary."""

import dataclasses
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from runtime.errors import ContextLengthError, ModelFolderError
from runtime.generator import GenerationConfig, Generator
from runtime.sampler import (
    apply_logit_bias,
    apply_penalties,
    filter_logits,
    sample,
    token_logprobs,
)
from runtime.session import Session


def test_runtime_app_and_cli_never_import_torch():
    code = (
        "import sys, runtime.session, runtime.generator, runtime.tokenizer, app, runtime.cli; "
        "runtime.cli.build_parser(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_presence_and_frequency_penalties_count_the_replys_tokens_only(tiny_folders, monkeypatch):
    """OpenAI's penalties: a token's logit falls by the frequency penalty for every time the reply
    has produced it and by the presence penalty once; the prompt's tokens are not counted."""
    from runtime import generator
    from runtime.session import Session

    logits = np.zeros(8, np.float32)
    out = apply_penalties(logits, [3, 3, 5], presence=0.5, frequency=0.25)
    assert out.tolist() == [0, 0, 0, -1.0, 0, -0.75, 0, 0] and not logits.any()
    assert apply_penalties(logits, [3], 0.0, 0.0) is logits
    assert apply_penalties(logits, [3], -1.0, 0.0)[3] == 1.0  # a negative one favours it

    seen, real = [], generator.apply_penalties

    def spy(row, generated, presence, frequency):
        seen.append(list(generated))
        return real(row, generated, presence, frequency)

    monkeypatch.setattr(generator, "apply_penalties", spy)
    session = Session(tiny_folders["ort"], provider="cpu")
    prompt = [5, 6, 7, 8]
    plain = Generator(session).generate_ids([prompt], GenerationConfig(12, stop_token_ids=()))[0]
    seen.clear()
    config = GenerationConfig(12, stop_token_ids=(), frequency_penalty=2.0, presence_penalty=1.0)
    penalised = Generator(session).generate_ids([prompt], config)[0]
    assert seen == [penalised[:i] for i in range(len(penalised))]  # the reply so far, no prompt
    assert len(set(penalised)) > len(set(plain))  # fewer repeats than the greedy reply


def test_logprobs_are_the_raw_distributions_and_list_the_likeliest_first():
    logits = np.array([1.0, 3.0, 2.0, 3.0, -50.0], np.float32)
    want = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    lp, top = token_logprobs(logits, 2, 3)
    assert lp == pytest.approx(want[2], abs=1e-12)
    assert [i for i, _ in top] == [1, 3, 2]  # the two 3.0s tied: the lower id first
    assert [p for _, p in top] == pytest.approx(want[[1, 3, 2]], abs=1e-12)
    assert token_logprobs(logits, 4, 0) == (pytest.approx(want[4]), ())
    assert len(token_logprobs(logits, 0, 5)[1]) == 5
    assert apply_logit_bias(logits, ((0, 5.0), (4, -100.0))).tolist() == [6, 3, 2, 3, -150]


def test_logit_bias_and_logprobs_settings_are_checked(tiny_folders):
    from runtime.errors import OptionError
    from runtime.session import Session

    assert GenerationConfig(logit_bias={7: 1.5, 2: -100}).logit_bias == ((2, -100.0), (7, 1.5))
    for bias, match in (({1: 101}, r"logit_bias of token 1 .* \[-100, 100\]"),
                        ({-1: 1}, "logit_bias token id"), ([(3, 1), (3, 2)], "twice"),
                        ("x", "must map token ids")):  # fmt: skip
        with pytest.raises(OptionError, match=match):
            GenerationConfig(logit_bias=bias)
    with pytest.raises(OptionError, match=r"logprobs .* \[0, 20\]"):
        GenerationConfig(logprobs=21)
    session = Session(tiny_folders["ort"], provider="cpu")
    vocab = session.info.vocab_size
    with pytest.raises(OptionError, match=f"token {vocab}, past .* vocabulary"):
        Generator(session).generate_ids([[5, 6]], GenerationConfig(4, logit_bias={vocab: 1}))
    with pytest.raises(OptionError, match="Engine's events carry them"):
        Generator(session).generate_ids([[5, 6]], GenerationConfig(4, logprobs=2))
    greedy = GenerationConfig(max_new_tokens=4, stop_token_ids=())
    first = Generator(session).generate_ids([[5, 6, 7]], greedy)[0][0]
    banned = dataclasses.replace(greedy, logit_bias=((first, -100.0),))
    assert first not in Generator(session).generate_ids([[5, 6, 7]], banned)[0]


def test_top_k_and_top_p_keep_only_allowed_tokens():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert np.isfinite(filter_logits(logits, top_k=2)).tolist() == [True, True, False, False, False]
    # nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the third token is still needed
    assert np.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [
        True,
        True,
        True,
        False,
        False,
    ]
    rng = np.random.default_rng(0)
    picks = {sample(logits, rng, temperature=1.0, top_k=2) for _ in range(200)}
    assert picks == {0, 1}


@pytest.mark.parametrize("target", ["portable", "onnx23", "ort"])
def test_greedy_equals_reference_and_batch_equals_one_by_one(tiny_folders, tiny_source, target):
    from export.model.generate import generate

    _, model = tiny_source
    gen = Generator(Session(tiny_folders[target], provider="cpu"))
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42]]
    cfg = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    batched = gen.generate_ids(prompts, cfg)
    alone = [gen.generate_ids([p], cfg)[0] for p in prompts]
    assert batched == alone
    assert batched == generate(model, prompts, 12)


def test_seeded_sampling_is_reproducible(tiny_folders):
    gen = Generator(Session(tiny_folders["ort"], provider="cpu"))
    cfg = lambda seed: GenerationConfig(
        max_new_tokens=20, temperature=1.0, top_p=0.9, seed=seed, stop_token_ids=()
    )
    a, b, c = (gen.generate_ids([[1, 2, 3]], cfg(s))[0] for s in (7, 7, 8))
    assert a == b and a != c


def test_stop_strings_cut_exactly(tiny_folders):
    gen = Generator(Session(tiny_folders["portable"], provider="cpu"))
    full = gen.generate("hello", GenerationConfig(max_new_tokens=24, stop_token_ids=()))
    stop = full[5:8]
    cut = gen.generate(
        "hello", GenerationConfig(max_new_tokens=24, stop_token_ids=(), stop_strings=(stop,))
    )
    assert cut == full[: full.find(stop)]


def test_over_long_prompt_and_bad_folders_raise_typed_errors(tiny_folders, tmp_path):
    gen = Generator(Session(tiny_folders["ort"], provider="cpu"))
    with pytest.raises(ContextLengthError, match="exceeds the context of 256"):
        gen.generate_ids([[1] * 250], GenerationConfig(max_new_tokens=10))
    kept = gen.generate_ids(
        [[1] * 250], GenerationConfig(max_new_tokens=10, truncate=True, stop_token_ids=())
    )
    assert len(kept[0]) == 10
    with pytest.raises(ModelFolderError, match="does not exist"):
        Session(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelFolderError, match="lacks tokenizer.json, llamaonnx.json"):
        Session(tmp_path / "half")
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)


def test_streaming_is_utf8_safe_for_emoji_and_cjk(default_tokenizer):
    from runtime.tokenizer import StreamDecoder

    text = "Emoji 😀🚀 and CJK 日本語の文章, café."
    ids = default_tokenizer.encode(text)
    dec = StreamDecoder(default_tokenizer)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some characters did span several tokens


def test_report_json_is_written(tiny_folders):
    assert json.loads((tiny_folders["ort"] / "report.json").read_text())["passed"]


def test_static_decode_buffers_give_the_same_tokens(tiny_folders):
    """The fixed-shape decode path CUDA graphs need (full-length mask, buffers bound once) computes
    what the growing-mask path computes; checked here on the CPU."""
    from runtime.generator import GenerationConfig, Generator
    from runtime.session import Session

    plain = Session(tiny_folders["ort"], provider="cpu")
    static = Session(tiny_folders["ort"], provider="cpu", static_decode=True)
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    # later generations reuse the kept buffers of their (batch, length bucket): what a captured
    # CUDA graph replays. The third is the first's shape again, after another shape in between.
    for prompts in ([[5, 6, 7, 8, 9, 10], [11, 12]], [[13, 14, 15]], [[16], [17, 18, 19, 20]]):
        want = Generator(plain).generate_ids(prompts, config)
        assert Generator(static).generate_ids(prompts, config) == want
    assert sorted(static._kept) == [(1, 256), (2, 256)]  # the tiny model's whole context


def test_decode_on_inputs_bound_once_gives_what_forward_gives(tiny_folders, monkeypatch):
    """The generator's decode steps on inputs bound once (Session.decode_steps: a full-length
    mask and the token ids written in place) against each step's inputs handed to `forward`:
    the same tokens for rows of different lengths, a row that stops early, and sampling with a
    repetition penalty."""
    session = Session(tiny_folders["ort"], provider="cpu")
    cache = session.new_cache(2, 8)
    assert session.decode_steps(cache, np.ones((2, 3), np.int64)) is not None
    portable = Session(tiny_folders["portable"], provider="cpu")
    assert portable.decode_steps(portable.new_cache(2, 8), np.ones((2, 3), np.int64)) is None

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    greedy = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    first = Generator(session).generate_ids(prompts, greedy)
    stop = first[1][2]  # ends the second row at its third token, the others run on
    configs = [
        greedy,
        GenerationConfig(max_new_tokens=12, stop_token_ids=(stop,)),
        GenerationConfig(
            max_new_tokens=12,
            temperature=0.9,
            top_k=8,
            seed=3,
            repetition_penalty=1.3,
            stop_token_ids=(),
        ),
    ]
    bound = [Generator(session).generate_ids(prompts, c) for c in configs]
    assert len(bound[1][1]) == first[1].index(stop) + 1 < len(bound[1][0])
    monkeypatch.setattr(session, "decode_steps", lambda cache, mask: None)
    assert [Generator(session).generate_ids(prompts, c) for c in configs] == bound


def test_static_decode_reuses_one_cache_per_shape(tiny_folders):
    from runtime.session import Session, bucket

    session = Session(tiny_folders["ort"], provider="cpu", static_decode=True)
    a = session.new_cache(1, 100)
    a.length = 50
    b = session.new_cache(1, 200)
    assert b is a and b.length == 0 and b.max_length == 256
    assert session.new_cache(2, 100) is not a
    assert session.new_cache(1, 12).max_length == 256  # never past the model's context (256)
    assert [bucket(n, 8192) for n in (1, 256, 257, 5000, 9000)] == [256, 256, 512, 8192, 8192]


def test_a_float32_attention_folder_is_kept_off_cuda(tiny_folders, tmp_path, monkeypatch, caplog):
    """onnxruntime's CUDA GroupQueryAttention has no float32: such a graph's attention would run
    on the CPU and its decode steps depart from the CPU run (measured on an H200). `cuda` is
    refused with what to do instead, `auto` picks the CPU, and a CUDA folder (fp16) is taken."""
    import onnx
    import onnxruntime as ort

    from export.quant import QuantSettings, quantize_folder
    from runtime.errors import ProviderError
    from runtime.folder import read_model_folder
    from runtime.session import cuda_refusal, resolve_provider

    fp32 = read_model_folder(tiny_folders["ort"])
    assert "--for-provider cuda" in cuda_refusal(fp32)
    assert cuda_refusal(read_model_folder(tiny_folders["portable"])) is None  # plain ops
    native_int4 = tmp_path / "int4-native"  # llamaonnx's CPU kernels: not for CUDA either
    quantize_folder(tiny_folders["portable"], native_int4, QuantSettings("int4", kernel="native"))
    assert "llamaonnx's CPU kernels" in cuda_refusal(read_model_folder(native_int4))
    cuda = tmp_path / "int4-cuda"
    quantize_folder(tiny_folders["ort"], cuda, QuantSettings("int4", provider="cuda"))
    # no logits_to_keep: its Neg would run on the device and feed Slice's host-side start
    # through a copy, and a graph with copies cannot be a CUDA graph
    graph = onnx.load(cuda / "model.onnx", load_external_data=False).graph
    assert "logits_to_keep" not in {i.name for i in graph.input}
    assert not [n for n in graph.node if n.name.startswith("/model/keep/")]
    session = Session(cuda, provider="cpu")
    assert not session.keeps_logits
    ids = Generator(session).generate_ids([[1, 2, 3]], GenerationConfig(max_new_tokens=4))
    assert len(ids[0]) == 4
    cuda = read_model_folder(cuda)
    assert cuda.kv_dtype == "float16" and cuda_refusal(cuda) is None
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with pytest.raises(ProviderError, match="GroupQueryAttention in float32"):
        resolve_provider("cuda", fp32)
    with caplog.at_level(logging.WARNING):
        assert resolve_provider("auto", fp32) == "cpu"
    assert "provider auto → cpu, not CUDA" in caplog.text
    assert resolve_provider("auto", cuda) == resolve_provider("cuda", cuda) == "cuda"


def test_static_decode_and_cuda_graphs_are_refused_where_they_cannot_work(tiny_folders):
    from runtime.errors import ProviderError
    from runtime.session import Session

    with pytest.raises(ProviderError, match="shared KV buffer"):
        Session(tiny_folders["portable"], provider="cpu", static_decode=True)
    with pytest.raises(ProviderError, match="CUDA graphs need provider 'cuda'"):
        Session(tiny_folders["ort"], provider="cpu", cuda_graph=True)

"""Bad input, as a demanding user or a security reviewer gives it: sources and output folders,
signals, model folders, chat templates, prompts, sampling, threads, bench and the CLI. Every case
must end in a typed error that names what was wrong and what is allowed (or a correct result),
with nothing of the user's lost and nothing half-written left behind. The app's cases are in
tests/test_app.py, beside the server they need."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import (
    ChatTemplateError,
    ContextLengthError,
    IntegrityError,
    InvalidTextError,
    ModelFolderError,
    NumericalError,
    OptionError,
    OutputFolderError,
)

ROOT = Path(__file__).resolve().parent.parent


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _cli(*args, stdin: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
    )


# -- sources and output folders: --force never deletes what is not ours ---------------------------
@pytest.fixture
def tiny_src(tiny_source, tmp_path):
    """A private copy of the tiny Hugging Face source, which a test may put folders around."""
    src, _ = tiny_source
    return _copy(src, tmp_path / "p" / "src")


@pytest.mark.parametrize(
    "out, why",
    [
        ("p/src", "is the source itself"),
        ("p", "contains the source"),
        ("p/src/onnx", "lies inside the source folder"),
    ],
)
def test_force_never_replaces_the_source_its_parent_or_a_folder_inside_it(tiny_src, out, why):
    from export.pipeline import export_model

    root = tiny_src.parent.parent
    before = _tree(root)
    with pytest.raises(OutputFolderError, match=why):
        export_model(tiny_src, root / out, force=True, verify=False)
    assert _tree(root) == before


def test_force_never_replaces_a_folder_of_someones_files(tiny_src, tmp_path):
    from export.pipeline import export_model

    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    with pytest.raises(OutputFolderError, match="not a llamaonnx model folder.*never deletes"):
        export_model(tiny_src, thesis, force=True, verify=False)
    assert (thesis / "chapter1.tex").read_text() == "years of work"


def test_force_never_replaces_a_model_folder_holding_other_files(tiny_folders, tmp_path):
    from export.quant import QuantSettings, quantize_folder

    out = _copy(tiny_folders["ort"], tmp_path / "model")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match=r"not part of a llamaonnx model folder \(notes"):
        quantize_folder(tiny_folders["ort"], out, QuantSettings("int8"), force=True, verify=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_force_never_follows_a_symbolic_link(tiny_folders, tmp_path):
    from export.quant import QuantSettings, quantize_folder

    target = _copy(tiny_folders["ort"], tmp_path / "real")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OutputFolderError, match="symbolic link"):
        quantize_folder(
            tiny_folders["ort"], tmp_path / "link", QuantSettings("int8"), force=True, verify=False
        )
    assert (target / "llamaonnx.json").is_file()


def test_quantize_onto_its_own_input_is_refused(tiny_folders, tmp_path):
    from export.quant import QuantSettings, quantize_folder

    fp32 = _copy(tiny_folders["ort"], tmp_path / "fp32")
    before = _tree(fp32)
    with pytest.raises(OutputFolderError, match="is the source itself"):
        quantize_folder(fp32, fp32, QuantSettings("int4"), force=True, verify=False)
    assert _tree(fp32) == before


def test_force_replaces_a_model_folder_and_keeps_the_old_one_until_the_new_is_whole(
    tiny_folders, tmp_path, monkeypatch
):
    from export.quant import QuantSettings, quantize_folder

    out = tmp_path / "int8"
    quantize_folder(tiny_folders["ort"], out, QuantSettings("int8"), verify=False)
    before = _tree(out)

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("export.onnx.save.onnx.save_model", broken)
    with pytest.raises(OSError, match="No space left"):
        quantize_folder(tiny_folders["ort"], out, QuantSettings("int8"), force=True, verify=False)
    assert _tree(out) == before  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # and no temporary is left
    monkeypatch.undo()
    quantize_folder(tiny_folders["ort"], out, QuantSettings("int4"), force=True, verify=False)
    assert json.loads((out / "llamaonnx.json").read_text())["precision"] == "int4"


def test_hf_folder_replaces_only_what_it_wrote(tiny_source, tmp_path):
    from export.sources import load_source
    from export.sources.hf_folder import write_source

    source = load_source(tiny_source[0])
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    with pytest.raises(OutputFolderError, match="not a Hugging Face folder written by"):
        write_source(source, other, force=True)
    assert (other / "data.csv").is_file()
    write_source(source, tmp_path / "hf")
    with pytest.raises(OutputFolderError, match="already exists"):
        write_source(source, tmp_path / "hf")
    write_source(source, tmp_path / "hf", force=True)
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_a_sharded_index_cannot_name_files_outside_the_folder(tiny_src, shard):
    from export.errors import SourceError
    from export.sources import load_source

    (tiny_src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": shard}})
    )
    with pytest.raises(SourceError, match="not a file inside"):
        load_source(tiny_src)


def test_unwritable_output_is_not_reported_as_a_full_disk(tiny_folders, tmp_path):
    from export.quant import QuantSettings, quantize_folder

    if os.geteuid() == 0:  # root writes anywhere: a file where the parent folder should be
        (tmp_path / "file").write_text("x")
        out, match = tmp_path / "file" / "out", "cannot create the folder"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        out, match = tmp_path / "ro" / "out", "cannot write in"
    with pytest.raises(OutputFolderError, match=match):
        quantize_folder(tiny_folders["ort"], out, QuantSettings("int8"), verify=False)


# -- every exit path removes its temporary files --
_KILLABLE = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from runtime.files import atomic_folder, signals_raise
    from runtime.folder import MODEL_FOLDER
    # as in a terminal: a shell's background job inherits SIGINT ignored, and Python then keeps
    # it ignored instead of raising KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = Path(sys.argv[1])
    with signals_raise(), atomic_folder(out, MODEL_FOLDER) as tmp:
        (tmp / "model.onnx.data").write_bytes(b"x" * 1_000_000)
        print("writing", flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_a_write_leaves_no_temporary_folder(tmp_path, sig):
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, str(tmp_path / "out")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing"
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_the_cli_turns_sigterm_into_a_clean_exit(tiny_folders, tmp_path):
    """A real `llamaonnx quantize` killed by SIGTERM while it works: exit 143, nothing left."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runtime.cli",
            "quantize",
            str(tiny_folders["ort"]),
            str(tmp_path / "out"),
            "--precision",
            "int8",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "nothing half-written" in err
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_what_killed_runs_left_is_cleaned_by_the_next_run(tiny_folders, tmp_path):
    from export.quant import QuantSettings, quantize_folder
    from runtime.files import PARTIAL_MARKER

    pid = _dead_pid()
    stale = tmp_path / f".out.tmp-{pid}-0a1b2c3d"
    stale.mkdir()
    (stale / PARTIAL_MARKER).write_text("{}")
    (stale / "model.onnx.data").write_bytes(b"x" * 1000)
    foreign = tmp_path / f".mine.tmp-{pid}-0a1b2c3d"  # same shape of name, not ours
    foreign.mkdir()
    moved = _copy(tiny_folders["ort"], tmp_path / f".kept.old-{pid}-0a1b2c3d")
    alive = tmp_path / f".other.tmp-{os.getpid()}-0a1b2c3d"  # a run still going on
    alive.mkdir()
    (alive / PARTIAL_MARKER).write_text("{}")

    quantize_folder(tiny_folders["ort"], tmp_path / "out", QuantSettings("int8"), verify=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not stale.exists() and foreign.exists() and alive.exists() and not moved.exists()
    assert "kept" in names  # the folder a killed swap had moved aside is back in its place
    assert (tmp_path / "kept" / "llamaonnx.json").is_file()


# -- model folders: checksums, truncation, inconsistent files --
def test_folders_record_the_sha256_of_every_file(tiny_folders):
    from runtime.files import sha256_file

    folder = tiny_folders["ort"]
    files = json.loads((folder / "llamaonnx.json").read_text())["files"]
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != "llamaonnx.json")
    assert sorted(files) == on_disk
    for name, record in files.items():
        assert record["sha256"] == sha256_file(folder / name)


def test_flipped_weights_are_an_integrity_error_naming_the_file(tiny_folders, tmp_path):
    from runtime.session import Session

    folder = _copy(tiny_folders["ort"], tmp_path / "m")
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-4096:-2048] = bytes(b ^ 0xFF for b in data[-4096:-2048])  # inside the weights
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.onnx differs from the file written"):
        Session(folder, provider="cpu")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError, match="lacks tokenizer.json"):
        Session(folder, provider="cpu")


def test_a_missing_listed_file_is_named(tiny_folders, tmp_path):
    from runtime.session import Session

    folder = _copy(tiny_folders["ort"], tmp_path / "m")
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(IntegrityError, match="chat_template.jinja is listed .* but missing"):
        Session(folder, provider="cpu")


def test_a_truncated_graph_is_a_typed_error_even_unchecked(tiny_folders, tmp_path):
    from runtime.session import Session

    folder = _copy(tiny_folders["ort"], tmp_path / "m")
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match="truncated, corrupt"):
        Session(folder, provider="cpu", check_files=False)


def test_quantize_with_a_missing_weights_file_is_a_typed_error(tiny_folders, tmp_path):
    import onnx

    from export.errors import QuantizationError
    from export.quant import QuantSettings, quantize_folder
    from runtime.folder import seal

    folder = _copy(tiny_folders["ort"], tmp_path / "m")
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(
        model,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    seal(folder)
    (folder / "model.onnx.data").unlink()
    with pytest.raises(IntegrityError, match="model.onnx.data is listed"):
        quantize_folder(folder, tmp_path / "q", QuantSettings("int4"), verify=False)
    info = json.loads((folder / "llamaonnx.json").read_text())
    del info["files"]  # a folder written before checksums: onnx's own error, typed
    (folder / "llamaonnx.json").write_text(json.dumps(info))
    with pytest.raises(QuantizationError, match="cannot be read"):
        quantize_folder(folder, tmp_path / "q", QuantSettings("int4"), verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda i: i["architecture"].update(n_layers="two"), "n_layers must be an integer"),
        (lambda i: i["architecture"].update(n_layers=3), "says 3 layers, but the graph has"),
        (lambda i: i["special_tokens"].update(eos_token_ids=[-1]), "token ids must be integers"),
        (lambda i: i.update(format_version=99), "format_version 99"),
        (lambda i: i.pop("io"), "malformed"),
    ],
)
def test_an_inconsistent_llamaonnx_json_is_a_typed_error(tiny_folders, tmp_path, edit, match):
    from runtime.session import Session

    folder = _copy(tiny_folders["ort"], tmp_path / "m")
    info = json.loads((folder / "llamaonnx.json").read_text())
    edit(info)
    (folder / "llamaonnx.json").write_text(json.dumps(info))
    with pytest.raises(ModelFolderError, match=match):
        Session(folder, provider="cpu")


def test_verify_checks_the_source_first_and_keeps_the_report(tiny_src, tmp_path):
    from export.errors import SourceChangedError
    from export.pipeline import export_model
    from export.verify.parity import verify_folder

    out = tmp_path / "out"
    export_model(tiny_src, out, target="ort", verify=False)
    report = (out / "report.json").read_bytes()
    (tiny_src / "config.json").write_text((tiny_src / "config.json").read_text() + " ")
    with pytest.raises(SourceChangedError, match="has changed since"):
        verify_folder(out)
    r = _cli("verify", str(out))
    assert r.returncode == 2 and b"SourceChangedError" in r.stderr, r.stderr
    assert (out / "report.json").read_bytes() == report


def test_implausible_weights_are_refused_after_export(tiny_source, tmp_path):
    """Weights that compute nonsense (here an LM head scaled ×1000, as a flipped tensor does)
    export and match the reference, which has the same weights: only the perplexity shows it."""
    from safetensors.numpy import load_file, save_file

    from export.errors import CorruptWeightsError
    from export.pipeline import export_model
    from export.verify.parity import plausible_perplexity

    src = _copy(tiny_source[0], tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    state["lm_head.weight"] = state["lm_head.weight"] * 1000
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(CorruptWeightsError, match="worse than guessing uniformly"):
        export_model(src, tmp_path / "out", target="ort")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    plausible_perplexity(17.9, 49152, "SmolLM2")  # a real model passes
    with pytest.raises(CorruptWeightsError):
        plausible_perplexity(9.2e7, 49152, "a GGUF with one tensor inverted")
    with pytest.raises(CorruptWeightsError):
        plausible_perplexity(math.nan, 49152, "NaN weights")


def test_nan_logits_are_a_numerical_error_not_silence():
    from runtime.sampler import sample

    rng = np.random.default_rng(0)
    bad = np.array([0.5, np.nan, 1.0], np.float32)
    with pytest.raises(NumericalError, match="NaN or infinite"):
        sample(bad, rng)
    with pytest.raises(NumericalError):
        sample(bad, rng, temperature=0.7)
    assert sample(np.array([0.5, 2.0, 1.0], np.float32), rng) == 1


# -- chat templates: bounded work, typed errors naming the template --
def _template_folder(tiny_folders, tmp_path, template: str) -> Path:
    from runtime.folder import seal

    folder = _copy(tiny_folders["ort"], tmp_path / "m")
    (folder / "chat_template.jinja").write_text(template)
    seal(folder)
    return folder


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "template, match",
    [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            r"ran for more than 2 s",
        ),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            "builds a value of",
        ),
        ("{{ 'x' * 1000000000 }}", "builds a value of"),
        ("{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}", "builds a value of"),
        ("{{ 10 ** 100000 }}", "too large a number"),
        ("{% for m in messages %}", "does not compile"),
        ("{{ messages.append(messages) }}", "failed to render: SecurityError"),
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{{ undefined_function() }}", "failed to render: UndefinedError"),
    ],
)
def test_a_template_is_bounded_and_its_errors_name_it(tiny_folders, tmp_path, template, match):
    from runtime.tokenizer import Tokenizer

    folder = _template_folder(tiny_folders, tmp_path, template)
    tok = Tokenizer.from_folder(folder)
    t = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=match) as e:
        tok.encode_chat(HI)
    assert str(folder / "chat_template.jinja") in str(e.value)
    assert time.perf_counter() - t < 20


def test_a_good_template_still_renders_like_jinja(tiny_folders):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(tiny_folders["ort"])
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    expected = plain.from_string(tok.chat_template).render(
        messages=HI * 3, add_generation_prompt=True
    )
    assert tok.render_chat(HI * 3) == expected


# -- prompts: invalid text at the edge --
def test_lone_surrogates_are_an_invalid_text_error(tiny_folders):
    from runtime.generator import Generator
    from runtime.session import Session

    gen = Generator(Session(tiny_folders["ort"], provider="cpu"))
    with pytest.raises(InvalidTextError, match="not valid Unicode"):
        gen.generate("bad \udcff text")
    with pytest.raises(InvalidTextError, match="content of a 'user' message"):
        gen.generate([{"role": "user", "content": "bad \ud800"}])
    with pytest.raises(InvalidTextError, match="must be a string"):
        gen.generate([{"role": "user", "content": 42}])
    with pytest.raises(OptionError, match="role"):
        gen.generate([{"content": "no role"}])


def test_cli_replaces_invalid_utf8_in_argv_and_says_so(tiny_folders):
    r = _cli(
        "generate", str(tiny_folders["ort"]), b"caf\xe9 \xff?".decode("utf-8", "surrogateescape"),
        "--max-new-tokens", "3",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert b"replaced by U+FFFD" in r.stderr and b"Traceback" not in r.stderr


def test_chat_survives_a_line_of_invalid_utf8(tiny_folders):
    r = _cli(
        "chat", str(tiny_folders["ort"]), "--max-new-tokens", "2",
        stdin=b"hello\n\xff\xfe broken\nstill here\n",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr
    assert r.stdout.count(b"> ") >= 4  # three lines answered, then the prompt before Ctrl-D


def test_a_stream_never_ends_inside_a_character(tiny_folders):
    from runtime.tokenizer import StreamDecoder, Tokenizer

    tok = Tokenizer.from_folder(tiny_folders["ort"])
    ids = tok.encode("é")  # two byte tokens in the byte-level vocabulary
    assert len(ids) == 2
    dec = StreamDecoder(tok)
    assert dec.push(ids[0]) == ""
    assert dec.flush() == ""  # cut after the first byte: nothing, not U+FFFD
    dec = StreamDecoder(tok)
    assert dec.push(ids[0]) + dec.push(ids[1]) + dec.flush() == "é"


# -- sampling and numeric options --
@pytest.mark.parametrize(
    "setting, match",
    [
        ({"temperature": math.nan}, r"temperature must be a finite number in \[0, 100.0\]"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"repetition_penalty": math.nan}, r"repetition_penalty .* \(0, inf\]"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be a finite number in \[-2, 2\]"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"top_p": math.nan}, r"top_p .* \(0, 1\]"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -3}, r"top_k .* \[0, inf\]"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be an integer in \[1, inf\]"),
        ({"max_new_tokens": math.inf}, "max_new_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop_strings": ("ok", 3)}, "stop_strings must be strings"),
        ({"stop_token_ids": (-2,)}, "stop token id"),
    ],
)
def test_generation_settings_reject_nan_inf_and_out_of_range(setting, match):
    from runtime.generator import GenerationConfig

    with pytest.raises(OptionError, match=match):
        GenerationConfig(**setting)


@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("--temperature", "nan", "finite number in [0, 100]"),
        ("--repetition-penalty", "inf", "finite number in (0, inf]"),
        ("--top-p", "1.5", "(0, 1]"),
        ("--max-new-tokens", "0", "integer in [1, inf]"),
        ("--threads", "-1", "integer in [1, inf]"),
        ("--seed", "x", "integer"),
    ],
)
def test_cli_options_name_their_range(tiny_folders, flag, value, match, capsys):
    from runtime.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", str(tiny_folders["ort"]), "hi", flag, value])
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_cli_says_what_is_wrong_without_a_traceback(tmp_path, capsys):
    from runtime.cli import main

    assert main(["generate", str(tmp_path / "nowhere"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "ModelFolderError" in err and "does not exist" in err and "Traceback" not in err


def test_truncate_is_a_cli_flag_as_the_context_error_says(tiny_folders, capsys):
    from runtime.cli import main

    long = "word " * 300  # the tiny model holds 256 tokens
    assert main(["generate", str(tiny_folders["ort"]), long, "--max-new-tokens", "2"]) == 2
    assert "--truncate" in capsys.readouterr().err
    args = ["generate", str(tiny_folders["ort"]), long, "--max-new-tokens", "2", "--truncate"]
    assert main(args) == 0


# -- threads --
def test_threads_are_bounded_by_the_machine(caplog):
    from runtime import options

    cores = os.cpu_count()
    for bad in (-1, 0, 4 * cores + 1, 1000 * cores, math.nan, "two", True):
        with pytest.raises(OptionError, match=rf"threads must be an integer in \[1, {4 * cores}\]"):
            options.threads(bad)
    assert options.threads(None) is None and options.threads(1) == 1
    with caplog.at_level("WARNING"):
        assert options.threads(cores + 1) == cores + 1
    assert f"on a machine with {cores} cores" in caplog.text


def test_a_session_refuses_too_many_threads(tiny_folders):
    from runtime.session import Session

    with pytest.raises(OptionError, match="threads"):
        Session(tiny_folders["ort"], provider="cpu", threads=10_000)


# -- bench --
def test_bench_refuses_a_prompt_longer_than_the_context_at_once(tiny_folders):
    from runtime.bench import bench

    t = time.perf_counter()
    with pytest.raises(ContextLengthError, match="exceed the models' context of 256 tokens"):
        bench([tiny_folders["ort"]], prompt_tokens=1_000_000, new_tokens=8, runs=1)
    assert time.perf_counter() - t < 10


@pytest.mark.parametrize(
    "args, match",
    [
        (["--runs", "0"], "integer in [1, 1000]"),
        (["--new-tokens", "0"], "integer in [2, inf]"),
        (["--prompt-tokens", "-5"], "integer in [1, inf]"),
        (["--threads", "nan"], "integer"),
    ],
)
def test_bench_options_name_their_range(tiny_folders, args, match, capsys):
    from runtime.cli import main

    with pytest.raises(SystemExit):
        main(["bench", str(tiny_folders["ort"]), *args])
    assert match in capsys.readouterr().err


def test_bench_exits_non_zero_when_a_requested_peer_fails(tiny_folders, tmp_path):
    r = _cli("bench", str(tiny_folders["ort"]), "--genai-dir", str(tmp_path / "missing"))
    assert r.returncode == 2 and b"OptionError" in r.stderr and b"is not a folder" in r.stderr
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"not a gguf file")
    r = _cli(
        "bench", str(tiny_folders["ort"]), "--peer", "llama.cpp", "--gguf", str(fake),
        "--prompt-tokens", "8", "--new-tokens", "4", "--runs", "1", "--warmup", "0",
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert b"PeerError" in r.stderr and b"could not run" in r.stderr
    assert b"llamaonnx ort" in r.stdout  # the engines that ran are still in the table


def test_serve_refuses_two_folders_of_one_name(tmp_path):
    """Models are named after their folders, so two folders of one name would be one model;
    the plain server and the Ray application share the check."""
    from app.openai_server import model_names

    assert model_names([tmp_path / "a" / "m", tmp_path / "n"]) == ["m", "n"]
    with pytest.raises(OptionError, match="two folders are named 'm'"):
        model_names([tmp_path / "a" / "m", tmp_path / "b" / "m"])


@pytest.mark.parametrize("extra", [[], ["--ray"]])
def test_serve_refuses_a_folder_the_engine_cannot_run_before_starting(tiny_folders, extra):
    """A portable folder (past and present not one buffer) is refused with the reason, by the
    plain server and before Ray or any replica starts."""
    r = _cli("serve", str(tiny_folders["portable"]), "--port", "1", *extra, timeout=120)
    assert r.returncode == 2, r.stderr
    assert b"ModelFolderError" in r.stderr and b"export with --target ort" in r.stderr


def test_bench_llama_lib_names_what_is_wrong(tiny_folders, tmp_path, capsys):
    """--llama-lib LABEL=DIR: a malformed value, a folder without libllama, and the option without
    the llama.cpp peer are each refused before any engine starts."""
    from runtime.bench import bench
    from runtime.cli import main

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    rc = main(["bench", str(tiny_folders["ort"]), "--peer", "llama.cpp", "--llama-lib", "avx2"])
    assert rc == 2 and "write LABEL=DIR" in capsys.readouterr().err
    with pytest.raises(OptionError, match="no libllama in that folder"):
        bench([tiny_folders["ort"]], peers=["llama.cpp"], gguf=gguf,
              llama_libs={"avx2": tmp_path}, runs=1)  # fmt: skip
    with pytest.raises(OptionError, match="add --peer llama.cpp"):
        bench([tiny_folders["ort"]], llama_libs={"avx2": tmp_path}, runs=1)


# -- a folder copied anywhere opens in llamaonnx and onnxruntime-genai --
_GENAI_GREEDY = textwrap.dedent(
    """
    import json, sys
    import onnxruntime_genai as og
    model = og.Model(sys.argv[1])
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(json.loads(sys.argv[2])) + 4, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(json.loads(sys.argv[2]))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    print(json.dumps(out))
    """
)


def test_a_native_folder_is_relocatable_for_llamaonnx_and_genai(tiny_folders, tmp_path):
    """The kernel library travels inside the folder, named relatively: genai accepts it from any
    working directory (here `/`), and the llamaonnx runtime opens the copy as it is."""
    from export.quant import QuantSettings, quantize_folder
    from runtime import native
    from runtime.generator import GenerationConfig, Generator
    from runtime.session import Session

    made = tmp_path / "made" / "int4"
    quantize_folder(tiny_folders["ort"], made, QuantSettings("int4", kernel="native"), verify=False)
    config = json.loads((made / "genai_config.json").read_text())
    library = config["model"]["decoder"]["session_options"]["custom_ops_library"]
    assert library == native.FOLDER_LIBRARY and (made / library).is_file()
    assert library in json.loads((made / "llamaonnx.json").read_text())["files"]
    assert str(tmp_path) not in (made / "genai_config.json").read_text()

    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(made, moved)
    shutil.rmtree(made)
    prompt = Session(moved, provider="cpu").tokenizer.encode("hello")
    ours = Generator(Session(moved, provider="cpu")).generate_ids(
        [prompt], GenerationConfig(max_new_tokens=4, stop_token_ids=())
    )[0]
    r = subprocess.run(
        [sys.executable, "-c", _GENAI_GREEDY, str(moved), json.dumps(prompt)],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ours

"""`llamaonnx bench` on tiny models: it runs, writes JSON, PNG and markdown, and adds the PyTorch
peer. No speed is asserted anywhere (speed targets live in docs/benchmarks.md)."""

import json
import statistics

import pytest

from runtime.cli import main


def test_bench_cli_writes_table_json_chart_and_report(tiny_folders, tmp_path, capsys):
    out = tmp_path / "b"
    rc = main(
        [
            "bench",
            str(tiny_folders["ort"]),
            str(tiny_folders["portable"]),
            "--peer",
            "torch",
            "--runs",
            "2",
            "--prompt-tokens",
            "24",
            "--new-tokens",
            "6",
            "--threads",
            "1",
            "--sweep",
            "--sweep-runs",
            "2",
            "--json",
            str(out / "bench.json"),
            "--png",
            str(out / "bench.png"),
            "--markdown",
            str(out / "bench.md"),
        ]
    )
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    names = [r["name"] for r in data["results"]]
    assert names == ["llamaonnx ort", "llamaonnx portable", "PyTorch reference (fp32)"]
    for r in data["results"]:
        assert "error" not in r, r
        assert r["decode_tok_s"]["n"] == 2 and r["decode_tok_s"]["median"] > 0
        assert r["prefill_tok_s"]["median"] > 0 and r["peak_rss_mb"] > 0
        assert [p["context"] for p in r["sweep"]] == [128]  # the tiny model holds 256 tokens
        (point,) = r["sweep"]
        assert len(point["runs"]) == 2 and point["decode_tok_s"] == statistics.median(point["runs"])
        assert point["prefill_tok_s"] == pytest.approx(128 / point["ttft_s"])
    assert data["settings"]["prompt_tokens"] == 24
    # one section and one chart per CPU: this machine's, named after it
    from runtime.bench.report import cpu_key, slug

    key = cpu_key(data["machine"])
    png = f"bench-{slug(key)}.png"
    assert (out / png).read_bytes()[:4] == b"\x89PNG"
    report = (out / "bench.md").read_text()
    assert f"## {key}" in report and "llamaonnx bench" in report
    assert "Prefill of the whole prompt at those lengths" in report
    assert f"![benchmark chart]({png})" in report
    table = capsys.readouterr().out
    assert "decode tok/s" in table and "PyTorch reference" in table


def test_prompt_has_exactly_the_asked_number_of_tokens(tiny_folders):
    from runtime.bench import prompt_ids
    from runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(tiny_folders["ort"])
    for n in (16, 100, 200):
        ids = prompt_ids(tiny_folders["ort"], n)
        assert len(ids) == n
    assert tok.decode(prompt_ids(tiny_folders["ort"], 100)).startswith("<user>")


def test_bench_runs_a_native_folder_on_each_kernel_path_asked(tiny_folders, tmp_path):
    """Every x86 path on one machine: one row per path, each worker forced to it (the worker
    reports the path it took), and the CPU's vector extensions in the record."""
    from export.quant import QuantSettings, quantize_folder
    from runtime import native
    from runtime.bench import bench

    folder = tmp_path / "int4"
    quantize_folder(
        tiny_folders["ort"], folder, QuantSettings("int4", kernel="native"), verify=False
    )
    paths = native.supported_paths()
    data = bench([folder], prompt_tokens=16, new_tokens=4, runs=1, warmup=0, threads=1,
                 kernel_paths=paths, profile=True)  # fmt: skip
    rows = data["results"]
    assert [r.get("kernel_path") for r in rows] == list(paths)
    assert all(r["decode_tok_s"]["median"] > 0 for r in rows)
    for r in rows:  # --profile: where each path's decode step goes, per op type
        step = r["profile"]["decode"]
        assert step["steps"] == 3 and 0 < step["kernels_us"] <= step["wall_us"]
        assert step["ops"]["MatMulQ4"]["calls"] > 0 and step["ops"]["MatMulQ4"]["us"] > 0
        assert r["profile"]["prefill"]["ops"]["GroupQueryAttention"]["calls"] == 2  # 2 layers
    from runtime.bench.report import report_markdown

    report = report_markdown(data, "llamaonnx bench …")
    assert "Where a decode step goes" in report and "| MatMulQ4 |" in report
    assert data["machine"]["kernel_path"] == paths[-1]
    assert (
        "avx2" in data["machine"]["flags"]
        or "asimd" in data["machine"]["flags"]
        or paths == ("portable",)
    )


def test_the_report_keeps_one_section_per_cpu():
    """A run replaces its own machine's section of docs/benchmarks.md and keeps the others."""
    from runtime.bench.report import cpu_key, merge_sections

    zen2 = {"cpu": "AMD EPYC", "cores": 2, "flags": ["avx2", "fma"]}
    zen4 = {**zen2, "flags": ["avx2", "avx512f", "avx512_vnni"]}
    assert cpu_key(zen2) == "AMD EPYC, AVX2, 2 cores" != cpu_key(zen4)
    text = merge_sections("", f"## {cpu_key(zen4)}\n\nold zen4\n")
    text = merge_sections(text, f"## {cpu_key(zen2)}\n\nzen2\n")
    text = merge_sections(text, f"## {cpu_key(zen4)}\n\nnew zen4\n")
    assert text.startswith("# Benchmarks")
    assert "zen2" in text and "new zen4" in text and "old zen4" not in text
    assert text.count("## AMD EPYC") == 2
    # a Zen 5 behind the same name and extensions as the Zen 4: its own section
    zen5 = {**zen4, "family": "family 26, model 2"}
    assert cpu_key(zen5) == "AMD EPYC (family 26, model 2), AVX-512 VNNI, 2 cores"
    text = merge_sections(text, f"## {cpu_key(zen5)}\n\nzen5\n")
    assert "new zen4" in text and "zen5" in text and text.count("## AMD EPYC") == 3


def test_ab_compares_two_kernel_libraries_in_one_process(tiny_folders, tmp_path, capsys):
    """`python -m runtime.bench.ab`: two builds of the kernel library (here the installed one and
    a copy of it) on one folder, interleaved; each gets its own session, the report has every
    length and library, a ratio of 1 for the first library, and the same greedy tokens from
    the same bytes. Bad --lib arguments are refused with what was wrong."""
    import shutil

    from export.quant import QuantSettings, quantize_folder
    from runtime import native
    from runtime.bench import ab

    folder = tmp_path / "int4"
    quantize_folder(
        tiny_folders["ort"], folder, QuantSettings("int4", kernel="native"), verify=False
    )
    copy = tmp_path / "copy.so"
    shutil.copy(native.library_path(), copy)
    out = tmp_path / "ab.json"
    rc = ab.main([str(folder), "--lib", f"installed={native.library_path()}", "--lib",
                  f"copy={copy}", "--prompt-tokens", "9,20", "--new-tokens", "5", "--rounds",
                  "3", "--threads", "1", "--json", str(out)])  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    assert [row["prompt_tokens"] for row in report["lengths"]] == [9, 20]
    for row in report["lengths"]:
        assert list(row["engines"]) == ["installed", "copy"]
        first, second = row["engines"]["installed"], row["engines"]["copy"]
        assert first["decode_ratio"] == 1.0 and first["prefill_ratio"] == 1.0
        assert second["same_tokens"] and second["decode_tokens_per_second"] > 0
    table = capsys.readouterr().out
    assert "| 20 | copy |" in table and "decode ratio" in table
    # --rows: the prompt decoded as a batch of that many, the same tokens in every row
    rc = ab.main([str(folder), "--lib", f"installed={native.library_path()}", "--lib",
                  f"copy={copy}", "--prompt-tokens", "9", "--new-tokens", "5", "--rounds", "2",
                  "--threads", "1", "--rows", "3", "--json", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert rc == 0 and report["rows"] == 3 and "3 row(s)" in capsys.readouterr().out
    assert report["lengths"][0]["engines"]["copy"]["same_tokens"]
    with pytest.raises(SystemExit):
        ab.main([str(folder), "--lib", f"a={copy}", "--lib", f"b={copy}", "--rows", "0"])
    assert "--rows: at least 1" in capsys.readouterr().err
    for bad, says in [
        ([f"one={copy}"], "at least two"),
        ([f"a={copy}", f"a={copy}"], "given twice"),
        ([f"a={copy}", "b=/nonexistent.so"], "no such file"),
        ([f"a={copy}", str(copy)], "NAME=PATH"),
    ]:
        with pytest.raises(SystemExit):
            ab.main([str(folder), *sum((["--lib", b] for b in bad), [])])
        assert says in capsys.readouterr().err


def test_ab_compares_two_folders_on_the_installed_library(tiny_folders, tmp_path, capsys):
    """Several folders and no --lib: the folders compared the same way (a quantization choice's
    cost), each named by its last path part; a one-digit and a two-digit folder of one model
    differ in their logits' rounding, so only the report's shape is fixed. Folders with --lib,
    a missing folder or two of one name are refused."""
    from export.quant import QuantSettings, quantize_folder
    from runtime.bench import ab

    one, two = tmp_path / "int4", tmp_path / "int4-precise"
    for folder, precise in [(one, ()), (two, ("*",))]:
        settings = QuantSettings("int4", kernel="native", precise=precise)
        quantize_folder(tiny_folders["ort"], folder, settings, verify=False)
    out = tmp_path / "ab.json"
    rc = ab.main([str(one), str(two), "--prompt-tokens", "9", "--new-tokens", "5", "--rounds",
                  "3", "--threads", "1", "--json", str(out)])  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    want = {"folder": str(two.resolve()), "library": "installed"}
    assert report["engines"]["int4-precise"] == want
    row = report["lengths"][0]["engines"]
    assert list(row) == ["int4", "int4-precise"] and row["int4"]["decode_ratio"] == 1.0
    assert row["int4-precise"]["prefill_tokens_per_second"] > 0
    table = capsys.readouterr().out
    assert "| 9 | int4-precise |" in table and "| folder |" in table
    twin = tmp_path / "again" / "int4"
    twin.mkdir(parents=True)
    for args, says in [
        ([str(one), str(two), "--lib", f"a={tmp_path}"], "without --lib"),
        ([str(one), str(tmp_path / "none")], "no such folder"),
        ([str(one), str(twin)], "distinct names"),
    ]:
        with pytest.raises(SystemExit):
            ab.main(args)
        assert says in capsys.readouterr().err


def test_the_report_says_when_the_kernel_library_is_not_built():
    """A GPU machine's run without runtime/native built: no "take the not built path"."""
    from pathlib import Path

    from runtime.bench.report import report_markdown

    data = json.loads((Path(__file__).parents[1] / "docs/benchmarks-q4_k_m.json").read_text())
    built = report_markdown(data, "llamaonnx bench …")
    assert f"take the {data['machine']['kernel_path']} path by default" in built
    data["machine"]["kernel_path"] = "not built"
    text = report_markdown(data, "llamaonnx bench …")
    assert "kernel library is not built here" in text and "not built path" not in text


def test_synthetic_gguf_has_the_asked_shape_and_the_default_models_tokenizer(tmp_path):
    """export.verify.synthetic_gguf: a `llama` GGUF of the asked widths that our loader reads as
    a model (config, tied embeddings, every tensor's shape), with the shipped file's tokenizer
    and every other metadata field of it, value and type, but the shape's; the same seed gives
    the same bytes."""
    import gguf

    from export.sources import default_gguf_path
    from export.sources.gguf import load_gguf
    from export.verify.synthetic_gguf import SHAPE_KEYS, write

    out = write(tmp_path / "s.gguf", hidden=64, ffn=96, layers=2, heads=4, kv_heads=2, seed=3)
    config, state, tokenizer, template = load_gguf(out)
    _, _, shipped_tokenizer, shipped_template = load_gguf(default_gguf_path())
    assert (config.dim, config.intermediate_size, config.n_layers) == (64, 96, 2)
    assert (config.n_heads, config.n_kv_heads, config.tie_embeddings) == (4, 2, True)
    assert state["layers.1.attention.wk.weight"].shape == (2 * 16, 64)
    assert state["layers.0.feed_forward.w2.weight"].shape == (64, 96)
    assert state["tok_embeddings.weight"].shape == (config.vocab_size, 64) == (49152, 64)
    assert 0.015 < float(state["layers.0.attention.wq.weight"].std()) < 0.025
    assert tokenizer == shipped_tokenizer and template == shipped_template
    a, b = gguf.GGUFReader(str(default_gguf_path())).fields, gguf.GGUFReader(str(out)).fields
    kept = [k for k in a if not k.startswith("GGUF.") and k not in SHAPE_KEYS]
    assert set(kept) - set(b) == {"general.file_type"}  # (the F16 file is no longer Q4_1)
    assert all(a[k].types == b[k].types and a[k].contents() == b[k].contents()
               for k in kept if k in b)  # fmt: skip
    again = write(tmp_path / "t.gguf", hidden=64, ffn=96, layers=2, heads=4, kv_heads=2, seed=3)
    assert again.read_bytes() == out.read_bytes()
    assert not list(tmp_path.glob("*.part"))


def test_synthetic_gguf_refuses_bad_shapes_and_keeps_existing_files(tmp_path, capsys):
    from export.verify.synthetic_gguf import main as synth
    from export.verify.synthetic_gguf import write

    with pytest.raises(ValueError, match=r"hidden \(60\) must be a multiple of heads \(8\)"):
        write(tmp_path / "x.gguf", hidden=60, ffn=96, layers=1, heads=8, kv_heads=2)
    with pytest.raises(ValueError, match=r"layers must be ≥ 1"):
        write(tmp_path / "x.gguf", hidden=64, ffn=96, layers=0, heads=4, kv_heads=2)
    assert not list(tmp_path.iterdir())
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"the user's")
    with pytest.raises(SystemExit) as e:
        synth([str(mine), "--hidden", "64", "--ffn", "96", "--layers", "1", "--heads", "4"])
    assert e.value.code == 2 and "exists (--force replaces a file)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synth([str(tmp_path / "y.gguf"), "--as", "Q3_X"])
    assert "--as Q3_X: one of Q4_0" in capsys.readouterr().err
    assert mine.read_bytes() == b"the user's" and sorted(tmp_path.iterdir()) == [mine]

"""The bench results as a text or markdown table, docs/benchmarks.md, and a chart."""

from __future__ import annotations

from pathlib import Path

from runtime.bench.profile import markdown as profile_markdown


def table(data: dict, markdown: bool = False) -> str:
    head = [
        "engine",
        "size MB",
        "TTFT ms",
        "prefill tok/s",
        "decode tok/s",
        "decode spread",
        "peak RSS MB",
    ]
    rows = []
    for r in data["results"]:
        if "error" in r:
            rows.append([r["name"], f"{r['size_mb']:.0f}", "—", "—", "—", r["error"][:40], "—"])
            continue
        d = r["decode_tok_s"]
        rows.append(
            [
                r["name"],
                f"{r['size_mb']:.0f}",
                f"{r['ttft_ms']['median']:.0f}",
                f"{r['prefill_tok_s']['median']:.0f}",
                f"{d['median']:.1f}",
                f"{d['min']:.0f}–{d['max']:.0f}",
                f"{r['peak_rss_mb']:.0f}",
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row) for row in [head, *rows])


def cpu_key(machine: dict) -> str:
    """What a figure depends on: the CPU model and its best vector extension for our kernels
    (a VM's "AMD EPYC" is a Zen 3 with AVX2 on one host, a Zen 4 with AVX-512 on another and a
    Zen 5 with AVX-512 on a third: x86's family and model tell the last two apart; records from
    before they were kept have none)."""
    flags = set(machine.get("flags") or ())
    best = next(
        (name for flag, name in (("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                                 ("avx2", "AVX2"), ("asimddp", "NEON dotprod"), ("asimd", "NEON"))
         if flag in flags),
        "no vector extension found",
    )  # fmt: skip
    gpu = f", {machine['gpu']}" if machine.get("gpu") else ""
    family = f" ({machine['family']})" if machine.get("family") else ""
    return f"{machine['cpu']}{family}, {best}, {machine['cores']} cores{gpu}"


def slug(key: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")


SECTIONS_HEADER = (
    "# Benchmarks\n\nOne section per CPU (model and vector extensions) this benchmark has run "
    "on; `make bench` replaces its own machine's section and keeps the others. Speed depends on "
    "the CPU: never read one section as another machine's figure.\n"
)


def merge_sections(old: str, section: str, header: str = SECTIONS_HEADER) -> str:
    """The report with `section` (starting "## KEY") in place of the one with the same KEY, or
    added; the other machines' sections are kept as they are, under `header`."""
    key = section.splitlines()[0]
    parts = (
        [p for p in ("\n" + old).split("\n## ")[1:] if p.strip()] if "\n## " in "\n" + old else []
    )
    kept = ["## " + p.rstrip("\n") + "\n" for p in parts if "## " + p.splitlines()[0] != key]
    return header + "\n" + "\n".join([section.rstrip("\n") + "\n", *kept])


def machine_chart(png: Path, machine: dict) -> Path:
    """Where a per-machine report's chart goes: `png` named after the machine's section, so
    each machine's section keeps its own chart."""
    return png.with_name(f"{png.stem}-{slug(cpu_key(machine))}.png")


def merged_report(path: Path, section: str, header: str = SECTIONS_HEADER) -> str:
    """The report at `path` (none yet: empty) with this machine's `section` merged in."""
    return merge_sections(path.read_text() if path.is_file() else "", section, header)


def report_markdown(data: dict, command: str, png: str | None = None) -> str:
    """This machine's section of docs/benchmarks.md: the machine, versions, exact command,
    table, sweep and chart (merge_sections puts it beside the other machines')."""
    s, m = data["settings"], data["machine"]
    lines = [
        f"## {cpu_key(m)}",
        "",
        f"Measured {data['date']} on {m['cpu']} ({m['cores']} cores, {m['system']})"
        + (f", GPU {m['gpu']}, provider {s['provider']}" if "gpu" in m else "")
        + "; "
        f"{s['threads']} threads, batch {s['batch']}, {s['prompt_tokens']}-token chat prompt, "
        f"{s['new_tokens']} new tokens ({s['sampling']}), {s['warmup']} warm-up run then "
        f"{s['runs']} runs per engine, interleaved; medians, decode spread min–max.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()),
        "",
        f"CPU vector extensions: {', '.join(m.get('flags') or ['unknown'])}; "
        + (
            "llamaonnx's kernel library is not built here."
            if m.get("kernel_path") == "not built"
            else f"llamaonnx's kernels take the {m.get('kernel_path', 'unknown')} path by default "
            "(rows marked [path] were forced to another with LLAMAONNX_KERNEL_PATH)."
        ),
        "",
        "```bash",
        command,
        "```",
        "",
        table(data, markdown=True),
    ]
    builds = [r for r in data["results"] if r.get("system_info")]
    if builds:
        lines += ["", "llama.cpp's builds, as each reports itself (`llama_print_system_info`):", ""]
        lines += [f"- {r['name']}: `{r['system_info']}`" for r in builds]
    lines += profile_markdown(data["results"])
    sweeps = [r for r in data["results"] if r.get("sweep")]
    if sweeps:
        contexts = [p["context"] for p in sweeps[0]["sweep"]]

        def sweep_table(title: str, cell) -> list[str]:
            out = ["", title, "", "| engine | " + " | ".join(map(str, contexts)) + " |",
                   "|---|" + "---:|" * len(contexts)]  # fmt: skip
            for r in sweeps:
                out.append(f"| {r['name']} | " + " | ".join(map(cell, r["sweep"])) + " |")
            return out

        lines += sweep_table(
            "Decode tokens/s as the context grows (median of "
            f"{data['settings'].get('sweep_runs', 1)} interleaved runs of "
            f"{data['settings'].get('sweep_new_tokens', 32)} new tokens):",
            lambda p: f"{p['decode_tok_s']:.1f}",
        )
        if all("prefill_tok_s" in p for r in sweeps for p in r["sweep"]):
            lines += sweep_table(
                "Prefill of the whole prompt at those lengths, tokens/s (time to first token, s):",
                lambda p: f"{p['prefill_tok_s']:.0f} ({p['ttft_s']:.1f})",
            )
    if png:
        lines += ["", f"![benchmark chart]({png})"]
    return "\n".join(lines) + "\n"


def chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in data["results"] if "error" not in r]
    sweeps = [r for r in ok if r.get("sweep")]
    fig, axes = plt.subplots(1, 2 if sweeps else 1, figsize=(13 if sweeps else 7, 4.5), dpi=110)
    ax = axes[0] if sweeps else axes
    names = [r["name"] for r in ok]
    y = range(len(ok))
    dec = [r["decode_tok_s"]["median"] for r in ok]
    pre = [r["prefill_tok_s"]["median"] / 10 for r in ok]
    ax.barh([i + 0.2 for i in y], dec, height=0.4, label="decode tok/s", color="#4c78a8")
    ax.barh([i - 0.2 for i in y], pre, height=0.4, label="prefill tok/s ÷ 10", color="#f58518")
    for i in range(len(ok)):
        ax.text(dec[i], i + 0.2, f" {dec[i]:.0f}", va="center", fontsize=8)
        ax.text(pre[i], i - 0.2, f" {pre[i] * 10:.0f}", va="center", fontsize=8)
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower right")
    s = data["settings"]
    ax.set_title(
        f"{s['prompt_tokens']}-token prompt, {s['new_tokens']} new, {s['threads']} threads, "
        f"median of {s['runs']}",
        fontsize=9,
    )
    if sweeps:
        for r in sweeps:
            axes[1].plot(
                [p["context"] for p in r["sweep"]],
                [p["decode_tok_s"] for p in r["sweep"]],
                marker="o",
                label=r["name"],
            )
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("context length (tokens)")
        axes[1].set_ylabel("decode tok/s")
        axes[1].set_title("decode speed as the cache grows", fontsize=9)
        axes[1].legend(fontsize=7)
    fig.suptitle(data["machine"]["cpu"], fontsize=9)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)

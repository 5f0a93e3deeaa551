"""Writes the model folder, the one contract between export and runtime (shared/DESIGN.md).

Atomic: everything is built in a hidden temporary sibling and renamed into place at the end, so a
failed or interrupted export leaves no half-written folder (and an existing one untouched until
the new one is complete).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from export.errors import ExportError

EXTERNAL_DATA_THRESHOLD = 64 * 1024 * 1024  # models above this keep weights in model.onnx.data


@contextlib.contextmanager
def atomic_folder(out_dir: Path, force: bool):
    """Yields a temporary folder; on success it replaces `out_dir`, on failure it is deleted."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not force:
        raise ExportError(f"output folder {out_dir} already exists; pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _make_readable(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private folder; the model folder is as readable as any other output."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for p in folder.iterdir():
        p.chmod(0o666 & ~mask)


def check_disk(out_dir: Path, need_bytes: int) -> None:
    parent = Path(out_dir).absolute().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise ExportError(
            f"too little disk space in {parent}: {free / 1e9:.2f} GB free, the model needs about "
            f"{need_bytes / 1e9:.2f} GB"
        )


def save_onnx(model: onnx.ModelProto, folder: Path) -> None:
    path = folder / "model.onnx"
    large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def genai_config(info: dict) -> dict:
    """onnxruntime-genai's config for the `ort` graph (GroupQueryAttention, shared KV buffer)."""
    a = info["architecture"]
    return {
        "model": {
            "bos_token_id": info["special_tokens"]["bos_token_id"],
            "context_length": a["max_position"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": a["head_dim"],
                "hidden_size": a["dim"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": a["n_heads"],
                "num_hidden_layers": a["n_layers"],
                "num_key_value_heads": a["n_kv_heads"],
            },
            "eos_token_id": list(info["special_tokens"]["eos_token_ids"]),
            "pad_token_id": info["special_tokens"]["pad_token_id"],
            "type": "llama",
            "vocab_size": a["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": min(a["max_position"], 4096),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }

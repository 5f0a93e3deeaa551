"""Text ↔ token ids with a Hugging Face `tokenizers` tokenizer, chat prompts with the model's
jinja2 template (sandboxed, as transformers renders it), and UTF-8-safe incremental decoding."""

from __future__ import annotations

import json
from pathlib import Path


class Tokenizer:
    def __init__(self, tokenizer_json: dict | str, chat_template: str | None = None):
        from tokenizers import Tokenizer as _HF

        text = tokenizer_json if isinstance(tokenizer_json, str) else json.dumps(tokenizer_json)
        self._tok = _HF.from_str(text)
        self.chat_template = chat_template
        self._template = None

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        folder = Path(folder)
        template_path = folder / "chat_template.jinja"
        template = template_path.read_text() if template_path.is_file() else None
        return cls((folder / "tokenizer.json").read_text(), template)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; give a plain prompt instead")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The rendered template already holds the special tokens as text.
        return self._tok.encode(self.render_chat(messages), add_special_tokens=False).ids


class StreamDecoder:
    """Turns a growing list of token ids into text pieces that are always whole UTF-8 characters.

    Decodes the tail since the last emitted piece and holds it back while it ends in U+FFFD, the
    mark of a character whose bytes span more tokens than have arrived.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.start = 0  # first id of the undecoded tail

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids[self.start :])
        if text.endswith("\ufffd"):
            return ""
        self.start = len(self.ids)
        return text

    def flush(self) -> str:
        text = self.tok.decode(self.ids[self.start :])
        self.start = len(self.ids)
        return text

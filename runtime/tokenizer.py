"""Text ↔ token ids with a Hugging Face `tokenizers` tokenizer, chat prompts with the model's
jinja2 template (sandboxed and bounded: runtime/chat_template.py), and UTF-8-safe incremental
decoding. Text is checked at this edge: a string that is not valid Unicode (a lone surrogate, as
Python makes of invalid UTF-8 in argv) is an InvalidTextError, never a crash deeper down."""

from __future__ import annotations

import json
import re
from pathlib import Path

from runtime.chat_template import ChatTemplate
from runtime.errors import InvalidTextError, OptionError

ROLES_HINT = "a list of {'role': str, 'content': str} messages"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character that stands for each byte
    in a byte-level BPE vocabulary → that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def check_text(text, what: str = "the prompt") -> str:
    """`text` if it is a str that encodes as UTF-8, else InvalidTextError."""
    if not isinstance(text, str):
        raise InvalidTextError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidTextError(
            f"{what} is not valid Unicode text: {e.reason} at character {e.start} "
            f"({text[e.start : e.end]!a}); pass text decoded from UTF-8"
        ) from None
    return text


def repair_text(text: str) -> tuple[str, bool]:
    """Invalid UTF-8 that Python kept as lone surrogates (argv; stdin read with surrogateescape)
    → U+FFFD; also says whether anything was replaced."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        pass
    try:  # surrogateescape's U+DC80..U+DCFF give back the original bytes
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # other lone surrogates
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace"), True


class Tokenizer:
    def __init__(
        self,
        tokenizer_json: dict | str,
        chat_template: str | None = None,
        template_origin: str = "the chat template",
    ):
        from tokenizers import Tokenizer as _HF

        text = tokenizer_json if isinstance(tokenizer_json, str) else json.dumps(tokenizer_json)
        self._tok = _HF.from_str(text)
        self.chat_template = chat_template
        self.template_origin = template_origin
        self._template: ChatTemplate | None = None
        # (token_bytes': the decoders and their types, read once; each token's bytes as asked)
        self._decoders: tuple[list[dict], set] | None = None
        self._token_bytes: dict[int, bytes] = {}

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        folder = Path(folder)
        template_path = folder / "chat_template.jinja"
        template = template_path.read_text() if template_path.is_file() else None
        return cls((folder / "tokenizer.json").read_text(), template, f"{template_path}")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(check_text(text), add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for in a decoded text, as OpenAI's `logprobs` give them:
        a token may hold part of a character (a byte-level BPE piece, a SentencePiece byte
        fallback), so a reply's text is its tokens' bytes joined and decoded, not their strings
        joined. Read from the vocabulary's pieces through the tokenizer's decoders (byte-level,
        or SentencePiece's "▁" for a space and <0xHH> bytes), as `tokenizers` decodes every
        token, added ones included."""
        known = self._token_bytes.get(token_id)
        if known is not None:
            return known
        if self._decoders is None:
            spec = json.loads(self._tok.to_str()).get("decoder") or {}
            decoders = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
            self._decoders = (decoders, {d.get("type") for d in decoders})
        decoders, kinds = self._decoders
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            raise OptionError(
                f"token id {token_id} is not in this model's vocabulary "
                f"(0 to {self._tok.get_vocab_size() - 1})"
            )
        if "ByteLevel" in kinds:
            chars = _BYTE_LEVEL_CHARS
            got = b"".join(bytes([chars[c]]) if c in chars else c.encode() for c in piece)
        elif "ByteFallback" in kinds and (m := _BYTE_PIECE.fullmatch(piece)):
            got = bytes([int(m.group(1), 16)])
        else:
            for d in decoders:
                if d.get("type") == "Replace" and "String" in (d.get("pattern") or {}):
                    piece = piece.replace(d["pattern"]["String"], d.get("content", ""))
                elif d.get("type") == "Metaspace":
                    piece = piece.replace(d.get("replacement", "\u2581"), " ")
            got = piece.encode()
        self._token_bytes[int(token_id)] = got
        return got

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise OptionError("this model has no chat template; give a plain prompt instead")
        if not isinstance(messages, list) or not messages:
            raise OptionError(f"a chat needs {ROLES_HINT}, got {messages!r:.80}")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise OptionError(f"a chat needs {ROLES_HINT}; got the message {m!r:.80}")
            check_text(m.get("content"), f"the content of a {m['role']!r} message")
        if self._template is None:
            self._template = ChatTemplate(self.chat_template, self.template_origin)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The rendered template already holds the special tokens as text.
        return self._tok.encode(self.render_chat(messages), add_special_tokens=False).ids


_BYTE_LEVEL_CHARS = _byte_level_chars()


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
        """The rest, less the bytes of a character the stream ended in the middle of (a reply cut
        by max_new_tokens): the tail's longest run of tokens that decodes whole."""
        tail = self.ids[self.start :]
        self.start = len(self.ids)
        for end in range(len(tail), 0, -1):
            text = self.tok.decode(tail[:end])
            if not text.endswith("\ufffd"):
                return text
        return ""

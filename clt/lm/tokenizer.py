"""Tokenizers from `tokenizer.json` or from GGUF metadata, on the `tokenizers` library (no torch).

Readable token strings (`Tokenizer.token_strings`): a token that is part of a multi-byte UTF-8
character (byte-level BPE splits "“" into three tokens; SentencePiece's byte fallback gives
`<0xE2>` pieces) decodes on its own to "�". We take each token's bytes instead: its piece
mapped back through GPT-2's byte-to-unicode alphabet, or its `<0xNN>` byte, and show bytes that
do not decode as `<0xE2>` escapes; in a sequence (`merge=True`) the token that completes a
character shows it.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clt.configs import ConfigError


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the model card says about BOS and chat formatting."""

    backend: Any
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos: bool = True
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS prepended when the model expects it (or `add_bos=True`)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        want = self.add_bos if add_bos is None else add_bos
        if want and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (module docstring)."""
        return _token_bytes(self.backend, int(token_id))

    def token_strings(self, ids, merge: bool = False) -> list[str]:
        """Each token as readable text, for display (node labels, tables, cards): bytes that do
        not decode shown as `<0xE2>` escapes. `merge`: the ids are a text in order (a prompt,
        a context window), and a token completing a multi-byte character shows it."""
        return readable([self.token_bytes(int(i)) for i in ids], merge)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Render messages with the model's Jinja chat template (as transformers does)."""
        if not self.chat_template:
            raise ConfigError("this model has no chat template; run without --chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise ConfigError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        tok = self.backend.id_to_token
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=tok(self.bos_token_id) if self.bos_token_id is not None else "",
            eos_token=tok(self.eos_token_ids[0]) if self.eos_token_ids else "",
        )


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable Latin-1 bytes stand for themselves, the
    other bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def _token_bytes(backend, token_id: int) -> bytes:
    text = backend.decode([token_id], skip_special_tokens=False)
    if "\ufffd" not in text:
        return text.encode("utf-8")
    piece = backend.id_to_token(token_id) or ""
    m = _BYTE_PIECE.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    table = _unicode_to_byte()
    if piece and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return text.encode("utf-8")  # no byte form known: keep what the decoder gave


def _escape(b: bytes) -> str:
    return "".join(f"<0x{x:02X}>" for x in b)


def _decode(b: bytes) -> str:
    """UTF-8 text of `b`, with every byte that does not decode as an escape."""
    out = []
    while b:
        try:
            out.append(b.decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            out.append(b[:e.start].decode("utf-8") + _escape(b[e.start:e.end]))
            b = b[e.end:]
    return "".join(out)


def readable(pieces: list[bytes], merge: bool = False) -> list[str]:
    """Display strings of tokens given as bytes: UTF-8 where it decodes, `<0xNN>` escapes where
    it does not; with `merge`, bytes left incomplete by one token carry over to the next, which
    shows the character they complete (and the earlier token its escapes)."""
    out = []
    dec = codecs.getincrementaldecoder("utf-8")()
    for b in pieces:
        if not merge:
            out.append(_decode(b))
            continue
        try:
            text = dec.decode(b)
        except UnicodeDecodeError:
            dec.reset()
            out.append(_decode(b))
            continue
        pending = dec.getstate()[0]
        # Bytes still pending belong to a character the next token completes.
        out.append(text + _escape(pending[len(pending) - min(len(pending), len(b)):])
                   if pending else text)
    return out


def tokenizer_from_dir(path: Path, bos: int | None, eos: tuple[int, ...]) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    file = path / "tokenizer.json"
    if not file.exists():
        raise ConfigError(f"{path} has no tokenizer.json (slow tokenizers are not supported)")
    backend = Backend.from_file(str(file))
    tc: dict[str, Any] = {}
    if (path / "tokenizer_config.json").exists():
        tc = json.loads((path / "tokenizer_config.json").read_text())
    template = tc.get("chat_template")
    if template is None and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    bos_tok = tc.get("bos_token")
    if isinstance(bos_tok, dict):
        bos_tok = bos_tok.get("content")
    if bos_tok and backend.token_to_id(bos_tok) is not None:
        bos = backend.token_to_id(bos_tok)
    add_bos = tc.get("add_bos_token")
    if add_bos is None:  # whether the tokenizer's own post-processor adds it
        probe = backend.encode("a", add_special_tokens=True).ids
        add_bos = bool(probe) and bos is not None and probe[0] == bos
    return Tokenizer(backend, bos, eos, bool(add_bos) and bos is not None, template)


_GGUF_KEYS = {
    "ggml.model": "tokenizer_type", "ggml.pre": "pre_tokenizer_type", "ggml.tokens": "tokens",
    "ggml.scores": "scores", "ggml.token_type": "token_type", "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap", "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id", "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id", "ggml.add_space_prefix": "add_prefix_space",
}


def _gguf_converter():
    """transformers' `convert_gguf_tokenizer(architecture, tokenizer_dict)`; a release without
    it (5.17 has only `get_gguf_tokenizer`; the module's API moves between releases) is refused
    with the fix."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
        )
        return convert_gguf_tokenizer
    except ImportError:
        import transformers

        raise ConfigError(f"transformers {transformers.__version__} has no GGUF tokenizer "
                          "converter (convert_gguf_tokenizer), which reading a GGUF model needs: "
                          "pip install -U 'transformers>=5.25'") from None


def tokenizer_from_gguf(reader, bos: int | None, eos: tuple[int, ...]) -> Tokenizer:
    """Rebuild the tokenizer described by GGUF metadata (transformers' converters, no torch)."""
    convert_gguf_tokenizer = _gguf_converter()

    arch = reader.fields["general.architecture"].contents()
    tdict: dict[str, Any] = {}
    for key, name in _GGUF_KEYS.items():
        f = reader.fields.get("tokenizer." + key)
        if f is not None:
            tdict[name] = f.contents()
    if "tokens" not in tdict:
        raise ConfigError("GGUF file carries no tokenizer (tokenizer.ggml.tokens missing)")
    backend, _ = convert_gguf_tokenizer(arch, tdict)
    add_bos_f = reader.fields.get("tokenizer.ggml.add_bos_token")
    add_bos = bool(add_bos_f.contents()) if add_bos_f is not None else \
        tdict.get("tokenizer_type") == "llama"
    tmpl = reader.fields.get("tokenizer.chat_template")
    return Tokenizer(backend, bos, eos, add_bos and bos is not None,
                     tmpl.contents() if tmpl is not None else None)

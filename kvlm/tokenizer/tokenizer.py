"""`Tokenizer`: text <-> ids and chat rendering, over a `tokenizers` pipeline."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvlm.tokenizer.builtin_templates import builtin_template
from kvlm.tokenizer.chat_template import ChatTemplate
from kvlm.tokenizer.errors import TokenizerError
from kvlm.tokenizer.gguf_backend import build_backend
from kvlm.tokenizer.gguf_vocab import GGUFVocab
from kvlm.tokenizer.hf_dir import load_hf_dir
from kvlm.tokenizer.spec import TokenizerSpec

logger = logging.getLogger(__name__)

_BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))


class Tokenizer:
    """Encodes and decodes exactly as transformers does for the same GGUF file or HF folder.

    Invariants: ids are in `[0, vocab_size)`; `encode` prepends `bos_token_id` iff `add_bos` and
    `add_special_tokens`; special tokens written in the text (`<|im_start|>`) encode as one id;
    `stop_token_ids` contains `eos_token_id` whenever there is one.
    """

    def __init__(self, spec: TokenizerSpec) -> None:
        self._backend = spec.backend
        self.name = spec.name
        self.vocab_size: int = spec.backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = spec.bos_token_id
        self.eos_token_id: int | None = spec.eos_token_id
        self.stop_token_ids: frozenset[int] = spec.stop_token_ids()
        self.add_bos: bool = spec.add_bos
        self.chat_template: str | None = spec.chat_template
        # Where the template came from: "model files", "built-in gemma", or None without one.
        self.chat_template_origin: str | None = None
        if spec.chat_template is not None:
            builtin = spec.builtin_template
            self.chat_template_origin = f"built-in {builtin}" if builtin else "model files"
        self._template_tokens = spec.template_tokens
        self._compiled_template: ChatTemplate | None = None
        # Ids that `decode(..., skip_special_tokens=True)` leaves out.
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, t in spec.backend.get_added_tokens_decoder().items() if t.special
        )
        # Ids of "<0xNN>" byte-fallback tokens: their text depends on the neighbouring byte
        # tokens, which the incremental detokenizer needs to know.
        model = spec.backend.model
        byte_ids = (spec.backend.token_to_id(t) for t in _BYTE_TOKENS)
        self.byte_fallback_ids: frozenset[int] = (
            frozenset(i for i in byte_ids if i is not None)
            if getattr(model, "byte_fallback", False)
            else frozenset()
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Build from the vocabulary stored in a GGUF file (~1-3 s for 262k tokens)."""
        vocab = GGUFVocab.from_file(path)
        backend = build_backend(vocab)
        add_bos = vocab.add_bos and vocab.bos_token_id is not None
        template_tokens = {
            name: vocab.tokens[token_id]
            for name, token_id in (
                ("bos_token", vocab.bos_token_id),
                ("eos_token", vocab.eos_token_id),
                ("unk_token", vocab.unk_token_id),
                ("pad_token", vocab.pad_token_id),
            )
            if token_id is not None
        }
        chat_template, builtin = vocab.chat_template, None
        if chat_template is None and (known := builtin_template(vocab.architecture)) is not None:
            chat_template, builtin = known.source, known.name
            logger.info(
                "%s has no tokenizer.chat_template; using kvlm's built-in %r template "
                "for architecture %r",
                path,
                known.name,
                vocab.architecture,
            )
        spec = TokenizerSpec(
            backend=backend,
            name=vocab.name,
            bos_token_id=vocab.bos_token_id,
            eos_token_id=vocab.eos_token_id,
            add_bos=add_bos,
            chat_template=chat_template,
            template_tokens=template_tokens,
            extra_stop_ids=frozenset(vocab.eot_token_ids),
            builtin_template=builtin,
        )
        return cls(spec)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Build from a folder with tokenizer.json (and tokenizer_config.json, templates)."""
        return cls(load_hf_dir(path))

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
            f"eos={self.eos_token_id}, add_bos={self.add_bos})"
        )

    def content_hash(self) -> str:
        """A digest of everything that maps text to ids (vocabulary, merges, normalizers,
        BOS rule, chat template): equal hashes encode every text to the same ids."""
        h = hashlib.blake2b(digest_size=16)
        for part in (self.to_json(), str(self.add_bos), self.chat_template or ""):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def to_json(self) -> str:
        """The whole `tokenizers` pipeline as tokenizer.json text (what grammar engines read:
        `llguidance_bridge.py`); for a GGUF file, the pipeline kvlm rebuilt from its vocabulary."""
        return self._backend.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; BOS first iff `add_bos` and `add_special_tokens`.

        Through `encode_batch`, which releases the GIL (`encode` holds it throughout): a long
        prompt tokenized on a worker thread then does not stall the server's event loop.
        """
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for `ids`; special tokens are left out when `skip_special_tokens`."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The raw vocabulary piece ("Ġworld", "▁world", "<0x0A>"), for logprob display."""
        token = self._backend.id_to_token(int(token_id))
        if token is None:
            raise TokenizerError(
                f"token id {token_id} is outside the vocabulary of {self.vocab_size} tokens"
            )
        return token

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text for a conversation, rendered with the model's chat template
        (`tools`, OpenAI's tool objects, are passed to a template that reads them)."""
        return self._template().render(messages, add_generation_prompt, tools)

    @property
    def chat_template_reads_tools(self) -> bool:
        """Whether the chat template renders a `tools` list itself; False without one."""
        return self.chat_template is not None and self._template().reads_tools

    def _template(self) -> ChatTemplate:
        if self.chat_template is None:
            raise TokenizerError(
                f"model {self.name!r} has no chat template; use plain prompts "
                "(encode the text yourself) or a model that ships one"
            )
        if self._compiled_template is None:
            self._compiled_template = ChatTemplate(self.chat_template, self._template_tokens)
        return self._compiled_template

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Ids of the rendered conversation. No BOS is added: templates write their own, as
        with transformers' `apply_chat_template(..., tokenize=True)`."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

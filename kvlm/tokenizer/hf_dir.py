"""Load a Hugging Face tokenizer folder: tokenizer.json plus its JSON/Jinja side files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from kvlm.tokenizer.errors import TokenizerError
from kvlm.tokenizer.gguf_backend import template_processor
from kvlm.tokenizer.spec import TokenizerSpec

_TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def load_hf_dir(path: str | Path) -> TokenizerSpec:
    """Read `tokenizer.json`, `tokenizer_config.json` and, if present, the chat template files
    and `generation_config.json` (its eos ids become extra stop ids).

    BOS/EOS handling follows transformers: an explicit `add_bos_token`/`add_eos_token` in the
    config replaces the post-processor; otherwise the one in tokenizer.json is kept, and
    `add_bos` reports whether it prepends BOS.
    """
    folder = Path(path)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise TokenizerError(
            f"{folder} has no tokenizer.json; kvlm reads only the fast-tokenizer format "
            "(convert with transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
        )
    try:
        backend = Backend.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
        raise TokenizerError(f"cannot parse {tokenizer_file}: {e}") from e
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")

    template_tokens: dict[str, str] = {}
    for name in _TEMPLATE_TOKENS:
        text = _token_text(config.get(name, special_map.get(name)))
        if text is not None:
            template_tokens[name] = text
    bos_id = _token_id(backend, template_tokens.get("bos_token"), tokenizer_file)
    eos_id = _token_id(backend, template_tokens.get("eos_token"), tokenizer_file)

    if "add_bos_token" in config or "add_eos_token" in config:
        add_bos = bool(config.get("add_bos_token")) and bos_id is not None
        add_eos = bool(config.get("add_eos_token")) and eos_id is not None
        backend.post_processor = template_processor(
            template_tokens.get("bos_token") if add_bos else None,
            bos_id,
            template_tokens.get("eos_token") if add_eos else None,
            eos_id,
        )
    else:
        with_specials = backend.encode("", add_special_tokens=True).ids
        add_bos = bos_id is not None and with_specials[:1] == [bos_id]

    generation = _read_json(folder / "generation_config.json")
    return TokenizerSpec(
        backend=backend,
        name=folder.name,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        add_bos=add_bos,
        chat_template=_chat_template(folder, config),
        template_tokens=template_tokens,
        extra_stop_ids=frozenset(_int_list(generation.get("eos_token_id"))),
    )


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot parse {file}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{file} should hold a JSON object, not {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as configs store it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_id(backend: Backend, token: str | None, source: Path) -> int | None:
    if token is None:
        return None
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise TokenizerError(f"special token {token!r} from the config is not in {source}")
    return token_id


def _int_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja, else chat_template.json, else the config's "chat_template" (a string,
    or a list of named templates of which "default" is used)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None

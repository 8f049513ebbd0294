"""What a loader hands to `Tokenizer`: the backend pipeline plus the facts around it."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer as Backend

from kvlm.tokenizer.errors import TokenizerError

# Tokens that end an assistant turn in common chat formats. One counts as a stop token only when
# it is in the vocabulary and the model's chat template writes it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class TokenizerSpec:
    """A loaded tokenizer before it is wrapped.

    Invariants: `backend`'s post-processor adds BOS to single sequences iff `add_bos`;
    `template_tokens` maps template variable names ("bos_token", ...) to token text;
    `extra_stop_ids` are ids (besides eos) the source names as ending generation;
    `builtin_template` names the built-in `chat_template` used because the source has none.
    """

    backend: Backend
    name: str
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos: bool
    chat_template: str | None
    template_tokens: dict[str, str]
    extra_stop_ids: frozenset[int] = frozenset()
    builtin_template: str | None = None

    def __post_init__(self) -> None:
        if self.add_bos and self.bos_token_id is None:
            raise TokenizerError(f"tokenizer {self.name}: add_bos is set but there is no BOS token")

    def stop_token_ids(self) -> frozenset[int]:
        """eos, the source's extra stop ids, and end-of-turn tokens the chat template writes."""
        ids = set(self.extra_stop_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        if self.chat_template:
            for token in END_OF_TURN_TOKENS:
                token_id = self.backend.token_to_id(token)
                if token_id is not None and token in self.chat_template:
                    ids.add(token_id)
        return frozenset(ids)

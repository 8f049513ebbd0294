"""Session files: a conversation saved here and restored in a new process continues with the same
greedy tokens, prefilling only the tokens after the restored blocks (a prefix hit; the TTFT it
gives is measured by benchmarks/session_restore.py, not timed here); every damaged or mismatched
file is refused with a clear error and the conversation is recomputed, never read with wrong
K/V."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvlm import LLM
from kvlm.engine.session import Session
from kvlm.kv.block_hash import extend_block_hashes
from kvlm.kv.session_file import SessionFileError
from kvlm.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0)
DOCUMENT = (
    "The lighthouse keeper's log, kept from 1891 to 1893, records the weather twice a day, "
    "every ship that passed, the oil burned each night and the repairs made to the lamp. "
) * 12
FIRST = [
    {"role": "system", "content": f"You answer questions about this log.\n{DOCUMENT}"},
    {"role": "user", "content": "What does the log record?"},
]
NEXT_QUESTION = {"role": "user", "content": "And how long was it kept?"}


@pytest.fixture(scope="module")
def conversation(smollm2_llm: LLM) -> list[dict[str, str]]:
    """The first turn, answered greedily: what a session saves."""
    answer = smollm2_llm.chat(FIRST, GREEDY)[0].outputs[0].text
    return [*FIRST, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def session_file(
    smollm2_llm: LLM, conversation: list[dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("session") / "chat.kvs"
    num_saved = smollm2_llm.save_session(conversation, path)
    num_tokens = len(smollm2_llm.tokenizer.encode_chat(conversation, add_generation_prompt=False))
    assert num_saved == num_tokens // 16 * 16 > 400
    return path


@pytest.fixture(scope="module")
def reference(smollm2_llm: LLM, conversation: list[dict[str, str]], session_file: Path) -> dict:
    """The uninterrupted conversation's next turn, in this process."""
    out = smollm2_llm.chat([*conversation, NEXT_QUESTION], GREEDY)[0]
    return {"tokens": out.outputs[0].token_ids, "cached": out.metrics.num_cached_tokens}


CHILD = """
import json, sys
from kvlm import LLM
from kvlm.sampling import SamplingParams
llm = LLM("smollm2", num_threads=1, weight_format="float")
greedy = SamplingParams(max_tokens=16, temperature=0)
session = llm.load_session(sys.argv[1])
messages = session.messages + [json.loads(sys.argv[2])]
restored = llm.chat(messages, greedy)[0]
llm.engine.kv_cache.reset_prefix_cache()
recomputed = llm.chat(messages, greedy)[0]
print(json.dumps({
    "restored_tokens": session.num_restored_tokens,
    "refused": session.refused,
    "tokens": restored.outputs[0].token_ids,
    "cached": restored.metrics.num_cached_tokens,
    "recomputed_tokens": recomputed.outputs[0].token_ids,
    "recomputed_cached": recomputed.metrics.num_cached_tokens,
}))
"""


def test_restored_in_a_new_process_continues_like_the_uninterrupted_conversation(
    session_file: Path, reference: dict
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(session_file), json.dumps(NEXT_QUESTION)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    child = json.loads(result.stdout.strip().splitlines()[-1])
    assert child["refused"] is None
    assert child["tokens"] == reference["tokens"]  # the same greedy continuation
    assert child["cached"] == reference["cached"] >= child["restored_tokens"] - 16  # a prefix hit
    assert child["recomputed_cached"] == 0
    assert child["recomputed_tokens"] == reference["tokens"]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _payload_offset(path: Path) -> int:
    from kvlm.kv.session_file import read_header

    return read_header(path)[1]


def _hit(llm: LLM, token_ids: list[int]) -> int:
    hashes: list[bytes] = []
    extend_block_hashes(hashes, token_ids, len(token_ids), llm.config.block_size, None)
    return llm.engine.kv_cache.find_cached_prefix(hashes, len(token_ids) + 1).num_tokens


def _continues_by_recomputing(llm: LLM, session: Session, reference: dict) -> None:
    """Nothing of the refused file reached the cache; the next turn recomputes correctly."""
    assert session.num_restored_tokens == 0
    assert _hit(llm, session.token_ids) == 0
    out = llm.chat([*session.messages, NEXT_QUESTION], GREEDY)[0]
    assert out.metrics.num_cached_tokens == 0
    assert out.outputs[0].token_ids == reference["tokens"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip_payload", "K/V checksum mismatch"),
        ("truncate_payload", "is cut short: its K/V should be"),
        ("append", "longer than written"),
    ],
)
def test_damaged_kv_is_refused_and_recomputed(
    smollm2_llm: LLM, session_file: Path, reference: dict, tmp_path: Path, damage: str, message: str
) -> None:
    path = tmp_path / "damaged.kvs"
    path.write_bytes(session_file.read_bytes())
    offset = _payload_offset(path)
    if damage == "flip_payload":
        _flip(path, offset + 12_345)
    elif damage == "truncate_payload":
        path.write_bytes(path.read_bytes()[:-1000])
    else:
        path.write_bytes(path.read_bytes() + b"\0")
    smollm2_llm.engine.kv_cache.reset_prefix_cache()
    session = smollm2_llm.load_session(path)
    assert session.refused is not None and message in session.refused
    _continues_by_recomputing(smollm2_llm, session, reference)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip_header", "header checksum mismatch"),
        ("truncate_header", "cut short inside its header"),
        ("flip_magic", "not a kvlm session file"),
        ("missing", "cannot read session file"),
    ],
)
def test_unreadable_file_is_an_error(
    smollm2_llm: LLM, session_file: Path, tmp_path: Path, damage: str, message: str
) -> None:
    path = tmp_path / "bad.kvs"
    if damage != "missing":
        path.write_bytes(session_file.read_bytes())
    if damage == "flip_header":
        _flip(path, 40)  # inside the header's JSON (token ids, fingerprints)
    elif damage == "truncate_header":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "flip_magic":
        _flip(path, 0)
    smollm2_llm.engine.kv_cache.reset_prefix_cache()
    with pytest.raises(SessionFileError, match=message):
        smollm2_llm.load_session(path)
    assert smollm2_llm.engine.kv_cache.pools[0].prefix_index == {}


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ("gemma3", "saved with model"),
        ("int8", "saved with KV format float32, this engine has int8"),
        ("block32", "saved with block size 16, this engine has 32"),
    ],
)
def test_other_model_kv_format_or_block_size_is_refused(
    request: pytest.FixtureRequest, session_file: Path, reference: dict, engine: str, message: str
) -> None:
    if engine == "gemma3":
        llm = request.getfixturevalue("gemma3_llm")
    else:
        kwargs = {"int8": {"kv_cache_dtype": "int8"}, "block32": {"block_size": 32}}[engine]
        llm = LLM("smollm2", num_threads=1, weight_format="float", **kwargs)  # as the saver
    session = llm.load_session(session_file)
    assert session.refused is not None and message in session.refused
    assert session.num_restored_tokens == 0
    if engine != "gemma3":  # the same model recomputes the same continuation
        _continues_by_recomputing(llm, session, reference)


@pytest.mark.slow
def test_gemma3_session_restores_both_layer_groups(gemma3_llm: LLM, tmp_path: Path) -> None:
    """Gemma 3's global layers and its 512-token-window layers: a request (no chat template)
    longer than the window is saved (the window group only where a hit needs it), restored,
    and continued."""
    first = gemma3_llm.generate(f"Read this log.\n{DOCUMENT * 2}", GREEDY)[0]
    path = tmp_path / "gemma.kvs"
    saved = gemma3_llm.save_session(first, path)
    assert saved > 600
    follow_up = {
        "prompt_token_ids": [
            *first.prompt_token_ids,
            *first.outputs[0].token_ids,
            *gemma3_llm.tokenizer.encode(" How long was it kept?", add_special_tokens=False),
        ]
    }
    reference = gemma3_llm.generate(follow_up, GREEDY)[0]
    gemma3_llm.engine.kv_cache.reset_prefix_cache()
    session = gemma3_llm.load_session(path)
    assert session.refused is None and session.messages is None
    assert session.num_restored_tokens == saved
    again = gemma3_llm.generate(follow_up, GREEDY)[0]
    assert again.outputs[0].token_ids == reference.outputs[0].token_ids
    assert again.metrics.num_cached_tokens == reference.metrics.num_cached_tokens >= saved

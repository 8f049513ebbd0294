"""`kvlm visualize`: the page opens in headless Chromium without console errors, replays one
step per prefill chunk and per decode step, and shows the work counts a brute-force count
gives; the PNG is written; bad options fail before the model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from headless_chromium import chromium, console_errors

from kvlm.cli.main import main

PREFIX = "Here is a lesson about how a language model writes text, one token after another. "
PROMPT = "Each new token reads the keys and values of the tokens before it, so"
WINDOW, SINKS, CHUNK, BLOCK, NEW_TOKENS, LAYERS = 24, 4, 8, 16, 12, 30


def _keys_read(position: int) -> int:
    """Keys the query at `position` reads under the window and sinks, counted one by one."""
    return sum(1 for k in range(position + 1) if k > position - WINDOW or k < SINKS)


def test_page_replays_every_step_without_errors(tmp_path: Path, smollm2_llm) -> None:
    page, png = tmp_path / "cache.html", tmp_path / "cache.png"
    args = [
        "visualize", PROMPT, "--cached-prefix", PREFIX, "--out", str(page), "--png", str(png),
        "--sliding-window", str(WINDOW), "--attention-sinks", str(SINKS),
        "--prefill-chunk", str(CHUNK), "--max-tokens", str(NEW_TOKENS), "--ignore-eos",
        "--temperature", "0", "--threads", "1",
    ]  # fmt: skip
    assert main(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    encode = smollm2_llm.tokenizer.encode
    prefix_ids, ids = encode(PREFIX), encode(PREFIX + PROMPT)
    common = next(i for i, (a, b) in enumerate(zip(prefix_ids, ids, strict=False)) if a != b)
    num_cached = min(common // BLOCK, (len(ids) - 1) // BLOCK) * BLOCK
    assert num_cached > 0
    num_chunks = -(-(len(ids) - num_cached) // CHUNK)
    expected_steps = num_chunks + NEW_TOKENS - 1  # the last sampled token is never computed
    num_computed = len(ids) + NEW_TOKENS - 1
    pairs_with = LAYERS * sum(_keys_read(p) for p in range(num_cached, num_computed))
    sampled_at = range(len(ids), num_computed + 1)  # sequence lengths when a token was sampled
    pairs_without = LAYERS * sum(sum(_keys_read(p) for p in range(n)) for n in sampled_at)

    with chromium() as driver:
        driver.get(page.as_uri())
        text = driver.find_element
        assert int(text("id", "num-steps").text) == expected_steps
        driver.execute_script("for (let i = 0; i < steps.length; i++) show(i);")
        text("id", "first").click()
        assert text("id", "step-index").text == "1"
        assert "prefill chunk" in text("id", "step-label").text
        text("id", "last").click()
        assert text("id", "step-index").text == str(expected_steps)
        assert text("id", "step-label").text.startswith(f"Step {expected_steps}: decode")
        assert text("id", "pairs-with").text == f"{pairs_with:,}"
        assert text("id", "pairs-without").text == f"{pairs_without:,}"
        assert driver.find_elements("css selector", ".block.sink")  # the window passed them
        assert driver.find_elements("css selector", ".tok.reused")
        assert console_errors(driver) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--no-cache"], "drop --no-cache"),
        (["--prefill-chunk", "0"], "--prefill-chunk must be >= 1"),
        (["--channels", "0"], "--channels must be >= 1"),
        (["--out", "/no/such/folder/x.html"], "the folder /no/such/folder does not exist"),
        (["--png", "/no/such/folder/x.png"], "the folder /no/such/folder does not exist"),
        (["--max-tokens", "0"], "max_tokens"),
    ],
)
def test_bad_options_fail_before_loading(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["visualize", "hi", *extra]) == 2
    assert message in capsys.readouterr().err

"""End to end: the live cache view in headless Chromium follows real streaming requests.

Three requests share a 3-block prefix (the later two find the first one's blocks cached), so
while they run the pool has blocks in use and shared blocks. The engine thread is held between
two steps while the page is read, so the page's counts are compared with the pool's exact ones;
after the requests finish the page must show no block in use.
"""

from __future__ import annotations

import os
import queue
import threading
import uuid
from collections import Counter
from pathlib import Path

from headless_chromium import chromium, console_errors
from live_server import API_KEY, MODEL_NAME, LiveServer

from kvlm.engine.engine import LLMEngine
from kvlm.kv.events import BlockState, block_state

# The README's picture; rewritten only when asked (KVLM_UPDATE_DOCS=1), so runs leave docs alone.
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "cache-view.png"
NUM_NEW_TOKENS = 48
TIMEOUT_S = 60


def _pool_counts(engine: LLMEngine) -> list[Counter]:
    return [Counter(block_state(b) for b in pool.blocks[1:]) for pool in engine.kv_cache.pools]


def _page_counts(driver, group: int) -> dict[BlockState, int]:
    return {
        state: int(
            driver.find_element("id", f"count-{group}-{state.name.lower()}").get_attribute(
                "data-count"
            )
        )
        for state in BlockState
    }


def _stream(server: LiveServer, prompt: str, first_token: threading.Event) -> None:
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": NUM_NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with server.client() as client, client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                first_token.set()


def _click_block(driver, block_id: int) -> None:
    """Click a block's cell in group 0's grid (cells of 11 px, 2 px apart, block 1 first;
    selenium's offsets are from the canvas's centre)."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("css selector", "canvas.grid")
    cols, size = int(canvas.get_attribute("data-cols")), canvas.size
    x = (block_id - 1) % cols * 13 + 5 - size["width"] // 2
    y = (block_id - 1) // cols * 13 + 5 - size["height"] // 2
    ActionChains(driver).move_to_element_with_offset(canvas, x, y).click().perform()


def _wait(driver, condition, message: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, TIMEOUT_S, poll_frequency=0.1).until(lambda d: condition(), message)


def test_cache_page_shows_used_and_shared_blocks_then_an_empty_pool(
    server: LiveServer, tmp_path: Path
) -> None:
    server.wait_idle()
    prefix = f"Cache view {uuid.uuid4().hex}. " + "Blocks are shared between requests. " * 6
    with chromium() as driver:
        driver.get(f"{server.url}/cache?api_key={API_KEY}")
        _wait(driver, lambda: driver.find_element("id", "status").text == "live", "no stream")
        first = threading.Event()
        threads = [threading.Thread(target=_stream, args=(server, prefix + "One:", first))]
        threads[0].start()
        assert first.wait(TIMEOUT_S), "the first request produced no token"
        for suffix in ("Two:", "Three:"):  # they find the first one's prefix blocks cached
            thread = threading.Thread(
                target=_stream, args=(server, prefix + suffix, threading.Event())
            )
            thread.start()
            threads.append(thread)

        # Hold the engine thread between two steps once all three run, and read the page.
        held, release = queue.Queue(), threading.Event()

        def hold(engine: LLMEngine) -> None:
            held.put((len(engine.scheduler.running), _pool_counts(engine)))
            release.wait(TIMEOUT_S)

        _wait(driver, lambda: server.engine.stats().num_running == 3, "requests did not start")
        # The first block of every table holds the shared prefix's first tokens; what a click
        # shows stays on the page for the screenshot.
        script = "return [...view.requests.values()].map(r => r.block_tables[0][0]);"
        [first_block] = set(driver.execute_script(script))
        _click_block(driver, first_block)
        detail = driver.find_element("id", "detail")
        _wait(driver, lambda: "Cache view" in detail.text, f"no text for block {first_block}")
        assert f"block {first_block} · shared" in detail.text
        assert detail.text.count("cmpl-") == 3  # held by all three
        server.engine.call(hold)
        try:
            num_running, counts = held.get(timeout=TIMEOUT_S)
            assert num_running == 3
            assert counts[0][BlockState.SHARED] >= 3 and counts[0][BlockState.USED] > 0
            for group, expected in enumerate(counts):
                want = {state: expected[state] for state in BlockState}
                _wait(driver, lambda g=group, w=want: _page_counts(driver, g) == w, "page != pool")
            rows = driver.find_elements("css selector", "#requests tr")
            assert len(rows) == 3
            update_docs = os.environ.get("KVLM_UPDATE_DOCS") == "1"
            screenshot = DOCS_SCREENSHOT if update_docs else tmp_path / "cache-view.png"
            assert driver.save_screenshot(str(screenshot))
        finally:
            release.set()

        for thread in threads:
            thread.join(TIMEOUT_S)
        server.wait_idle()
        _wait(
            driver,
            lambda: (
                _page_counts(driver, 0)[BlockState.USED] == 0
                and _page_counts(driver, 0)[BlockState.SHARED] == 0
                and not driver.find_elements("css selector", "#requests tr")
            ),
            "the page still shows blocks in use after the requests finished",
        )
        after = server.engine.call(_pool_counts).result(TIMEOUT_S)
        assert _page_counts(driver, 0)[BlockState.CACHED] == after[0][BlockState.CACHED] > 0
        assert console_errors(driver) == []

"""The search app in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) opens the page
served on a free local port, types a query, waits for the results, checks the top one is the image the engine
ranks first, clicks it, checks the image search and the boxes overlay appear, and saves screenshots.

Needs gradio and playwright (`pip install -e ".[app,dev]"`) and a Chromium (`apt-get install chromium`, or the
browser named by $CHROMIUM); skipped with the reason otherwise. Screenshots go to $IMAGEBERT_APP_SCREENSHOTS
(docs/images/ holds the ones the docs show) or the test's temporary folder. $IMAGEBERT_APP_MODEL points the test at
a trained demo model (`make demo`'s outputs/imagebert-demo/final): then the typed caption's own image must come
first, not only the image the engine ranks first.
"""

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
from app_fixture import build_toy_app, demo_class_names, snapshot

gradio = pytest.importorskip("gradio", reason="the app's browser test needs gradio: pip install -e '.[app]'")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs playwright (the dev extra)"
)
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "no Chromium: apt-get install chromium (or set CHROMIUM to a Chromium binary)",
        allow_module_level=True,
    )

TIMEOUT_MS = 120_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, minilm_path):
    """The toy demo app on a free port of 127.0.0.1, served from a thread of this process."""
    from modeling_imagebert.app.ui import build_page, launch

    root = tmp_path_factory.mktemp("app-browser")
    model = os.environ.get("IMAGEBERT_APP_MODEL")
    app, images, captions, _ = build_toy_app(root, minilm_path, model=Path(model) if model else None)
    page = build_page(app)
    port = free_port()
    launch(page, host="127.0.0.1", port=port, allowed_paths=[images], block=False)
    yield app, images, f"http://127.0.0.1:{port}/", model is not None
    page.close()


def test_search_in_a_browser_then_click_the_top_result_and_draw_its_boxes(served, tmp_path):
    app, images, url, trained = served
    shots = Path(os.environ.get("IMAGEBERT_APP_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    before = snapshot(images)
    from modeling_imagebert.app.toy_demo import demo_split

    image_id = app.retriever.image_ids[2]
    query = next(row["caption"] for row in demo_split() if row["image_id"] == image_id)  # the third scene's
    expected = app.search_text(query).hits[0].image_id
    if trained:
        assert expected == image_id

    start = time.perf_counter()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.locator("#query textarea").fill(query)
            page.locator("#search").click()
            page.locator("#ranking table").wait_for()
            rows = page.locator("#ranking tbody tr")
            assert rows.count() == 8
            top = rows.nth(0).inner_text()
            assert expected in top, top  # the engine's first image is the page's first
            assert "ITM" in page.locator("#explanation").inner_text()
            timing = page.locator("#timing").inner_text()
            assert "embed" in timing and "search" in timing and "rerank" in timing
            first = page.locator("#results .thumbnail-item").first
            assert expected in first.inner_text()
            page.screenshot(path=str(shots / "app-text-search.png"), full_page=False)

            first.click()
            page.locator("#captions table").wait_for()
            assert expected in page.locator("#selected").inner_text()
            assert page.locator("#captions tbody tr").count() == 5
            assert page.locator("#similar .thumbnail-item").count() == 8
            page.locator("#draw-boxes").click()
            page.locator("#boxes img").wait_for()
            page.wait_for_function("document.querySelector('#boxes img').naturalWidth > 0")
            regions = page.locator("#regions").inner_text()
            assert "regions" in regions and any(name in regions for name in demo_class_names()), regions
            page.locator("#boxes").scroll_into_view_if_needed()
            page.screenshot(path=str(shots / "app-image-search.png"), full_page=False)

            # An uploaded file goes through the detector: the same captions as the indexed image it shows.
            expected_captions = [hit.caption for hit in app.search_captions(image_id).hits]
            page.locator("#query-image input[type=file]").set_input_files(app.paths[image_id])
            page.locator("#selected", has_text="uploaded").wait_for()
            page.locator("#captions table").wait_for()
            shown = page.locator("#captions tbody tr").all_inner_texts()
            assert [row.split("\t")[1].strip() for row in shown] == expected_captions, shown
        finally:
            browser.close()
    print(f"browser session: {time.perf_counter() - start:.1f} s")
    assert snapshot(images) == before  # serving the page wrote nothing among the images

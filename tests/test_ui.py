"""The web page end to end: a real headless Chromium against a live `fastgen serve` with one worker.

Chromium is Debian's (/usr/bin/chromium) driven by Playwright from PyPI; no browser is downloaded.
Without them the browser tests skip, except in CI (CI=true), where they must run. Every request
the page makes is recorded and must stay on loopback: no CDN, fonts or analytics.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from services import Api, free_port, service_env

from fastgen.client import ServiceError
from fastgen.ui.page import Form, Page
from fastgen.ui.render import history_html, problem_html, problem_text, progress_html
from fastgen.ui.session import Job, Session

pytestmark = pytest.mark.timeout(240)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WAIT_MS = 120_000


def test_the_ui_package_does_not_import_torch():
    code = "import sys, fastgen.ui; fastgen.ui.create_ui('http://127.0.0.1:1'); assert 'torch' not in sys.modules"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_the_form_leaves_blanks_to_the_model_and_sends_video_fields_only_to_video_models():
    form = Form("a cat", "", "tiny-sd", 64.0, None, 4.0, 7.5, 3.0, False, 2.0, 9.0, 8.0, accelerate=(True, True, True))
    request = form.request({"kind": "image"})
    assert request == {
        "prompt": "a cat",
        "negative_prompt": "",
        "model": "tiny-sd",
        "width": 64,
        "steps": 4,
        "guidance": 7.5,
        "seed": 3,
        "num_images": 2,
        "accelerate": {"fuse_qkv": True, "cache": {"enabled": True}, "sparse_attention": {"mode": "window"}},
    }
    video = form._replace(random_seed=True, accelerate=(False, False, False)).request({"kind": "video"})
    assert video["seed"] is None and video["num_frames"] == 9 and video["fps"] == 8 and "accelerate" not in video
    assert "num_images" not in video
    with_loras = form._replace(loras=["ink", "paper"], lora_scale=0.5)
    assert with_loras.request({"kind": "image", "loras": True})["loras"] == [
        {"name": "ink", "scale": 0.5},
        {"name": "paper", "scale": 0.5},
    ]
    assert "loras" not in with_loras.request({"kind": "image"})  # a model without LoRA support gets none


def test_capabilities_decide_the_controls_video_fields_and_usable_accelerations():
    caps = {"name": "m", "kind": "image", "architecture": "dit", "size_multiple": 16, "accelerations": []}
    caps["defaults"] = {"width": 64, "height": 32, "steps": 5, "guidance": 2.0, "num_frames": None, "fps": None}
    page = Page("http://127.0.0.1:1")
    controls = page.model_controls(Session({"m": caps}), "m")
    info, width, height, steps, guidance, images, video_row, frames, fps, cache, fuse_qkv, sparse, loras = controls
    assert width["value"] == 64 and width["step"] == 16 and video_row["visible"] is False
    assert images["visible"] is True
    assert (
        fuse_qkv["interactive"] is False and fuse_qkv["value"] is False and "Not available for m" in fuse_qkv["info"]
    )
    assert cache["interactive"] is False and sparse["interactive"] is False
    assert loras["interactive"] is False and loras["value"] == [] and "Not available for m" in loras["info"]
    caps = {**caps, "kind": "video", "frame_multiple": 4, "accelerations": ["fuse_qkv", "sparse_attention"]}
    *_, images, video_row, frames, fps, cache, fuse_qkv, sparse, loras = page.model_controls(
        Session({"m": {**caps, "loras": True}}), "m"
    )
    assert images["visible"] is False and video_row["visible"] is True and frames["info"] == "4·k + 1"
    assert fuse_qkv["interactive"] is True
    assert cache["interactive"] is False and sparse["interactive"] is True and loras["interactive"] is True


def test_progress_and_problems_read_as_sentences():
    job = Job("abc", "tiny-sd", "image", "a <b>cat</b>", random_seed=True, status="running")
    job.progress = {"step": 3, "total": 10, "eta_s": 1.5}
    assert "step 3 of 10, ETA 1.5 s" in progress_html(job)
    assert "&lt;b&gt;cat" in history_html([job])  # user text is escaped
    invalid = ServiceError(422, "width: bad", [{"field": "width", "message": "must be a multiple of 8"}])
    assert "<code>width</code>: must be a multiple of 8" in problem_html(*problem_text(invalid, "http://x"))


def test_a_service_that_is_down_is_a_readable_message():
    page = Page(f"http://127.0.0.1:{free_port()}")
    _, _, problem, _, _ = page.load_models(Session())
    assert "cannot be reached" in problem and "Traceback" not in problem


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install chromium, or bash scripts/system-deps)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser tests must run in CI: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def service(browser, tmp_path_factory, engine):
    """`fastgen serve` with one worker on the embedded queue, serving an image and a video model and one LoRA."""
    from fastgen.lora.synthetic import random_lora, write_lora

    data_dir = tmp_path_factory.mktemp("ui-service")
    unet = engine.pool.get(engine.registry.resolve("tiny-sd"))[0].pipe.unet  # the same seeded build as the service's
    write_lora(data_dir / "loras" / "ink.safetensors", random_lora(unet, 4, seed=5), base="tiny-sd")
    env = service_env(data_dir, job_timeout_s="60", models="tiny-sd,tiny-wan")
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    api = Api(env, data_dir / "serve.log", workers=1)
    yield api
    api.stop()


@pytest.fixture()
def page(browser, service):
    """The page, loaded with its model list; afterwards, no request may have left loopback."""
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    tab = context.new_page()
    requests: list[str] = []
    tab.on("request", lambda request: requests.append(request.url))
    tab.goto(f"{service.url}/ui/")
    tab.wait_for_function("() => document.querySelector('#model input')?.value", timeout=60_000)
    yield tab
    context.close()
    outside = [url for url in requests if urlparse(url).scheme in ("http", "https", "ws", "wss") and _off_host(url)]
    assert not outside, f"the page reached outside the service: {outside}"
    assert requests, "no requests were recorded"


def _off_host(url: str) -> bool:
    return urlparse(url).hostname not in LOOPBACK


def _outside(url: str) -> bool:
    return urlparse(url).scheme in ("http", "https", "ws", "wss") and _off_host(url)


def test_the_api_docs_render_with_the_internet_out_of_reach(browser, service):
    """/docs and /redoc draw the operations from the service's own copies; every request off loopback is refused."""
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    tab = context.new_page()
    attempted: list[str] = []

    def loopback_only(route):
        if _outside(route.request.url):
            attempted.append(route.request.url)
            return route.abort()
        return route.continue_()

    tab.route("**/*", loopback_only)
    try:
        tab.goto(f"{service.url}/docs")
        tab.locator(".opblock-post", has_text="/v1/jobs").first.wait_for(state="visible", timeout=30_000)
        assert "fastgen" in tab.title()
        assert tab.locator(".opblock-get", has_text="/v1/jobs/{job_id}").count() >= 1
        tab.goto(f"{service.url}/redoc")
        tab.get_by_text("/v1/jobs/{job_id}/result").first.wait_for(state="attached", timeout=30_000)
        assert "fastgen" in tab.title()
    finally:
        context.close()
    assert not attempted, f"the docs reached outside the service: {attempted}"


def choose_model(tab, name: str) -> None:
    tab.locator("#model input").click()
    tab.get_by_role("option", name=name).click()
    tab.wait_for_function(f"() => document.querySelector('#model-info')?.innerText.includes({name!r})")


def set_number(tab, elem_id: str, value: int) -> None:
    field = tab.locator(f"#{elem_id} input[type=number]").first
    field.fill(str(value))
    field.press("Tab")


def progress_text(tab) -> str:
    return tab.locator("#progress .fg-progress-text").inner_text()


def test_type_a_prompt_generate_and_see_the_image(page):
    choose_model(page, "tiny-sd")
    page.locator("#prompt textarea").fill("a red circle at the top left on a blue background")
    page.locator("#accel-fuse_qkv input[type=checkbox]").check()
    page.locator("#generate").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#gallery img')].some(i => i.complete && i.naturalWidth > 0)",
        timeout=WAIT_MS,
    )
    page.wait_for_function("() => document.querySelector('#metadata table')", timeout=WAIT_MS)
    metadata = page.locator("#metadata").inner_text()
    assert "picked at random" in metadata and "ms per step" in metadata
    assert "fuse_qkv" in metadata and "fused attention layers" in metadata
    assert page.locator("#history tr[data-status=succeeded]").count() == 1
    assert "done: 20 steps" in progress_text(page)
    assert page.locator("#downloads a").count() >= 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)


def test_ask_for_three_images_and_see_all_three_each_with_its_seed(page):
    choose_model(page, "tiny-sd")
    page.locator("#random input[type=checkbox]").uncheck()
    set_number(page, "seed", 40)
    set_number(page, "images", 3)
    set_number(page, "steps", 4)
    page.locator("#prompt textarea").fill("three red circles")
    page.locator("#generate").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#gallery img')].filter(i => i.complete && i.naturalWidth > 0).length"
        " === 3",
        timeout=WAIT_MS,
    )
    gallery = page.locator("#gallery").inner_text()
    assert all(f"three red circles (seed {seed})" in gallery for seed in (40, 41, 42)), gallery
    assert page.locator("#downloads a").count() == 3


def test_pick_a_lora_generate_and_see_it_in_the_metadata(page):
    choose_model(page, "tiny-sd")
    page.locator("#loras input").click()
    page.get_by_role("option", name="ink").click()
    page.keyboard.press("Escape")
    page.locator("#prompt textarea").fill("a red circle in ink")
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelector('#metadata')?.innerText.includes('ink')", timeout=WAIT_MS)
    metadata = page.locator("#metadata").inner_text()
    assert "LoRAs" in metadata and "ink × 1" in metadata and "swapped in" in metadata, metadata


def test_pick_the_video_model_generate_and_see_the_player(page):
    assert not page.locator("#video-controls").is_visible()  # tiny-sd first: no frames or fps
    assert page.locator("#images").is_visible()
    choose_model(page, "tiny-wan")
    page.locator("#frames input").first.wait_for(state="visible")
    assert page.locator("#frames input").first.input_value() == "17"
    assert not page.locator("#images").is_visible()  # one video per request
    set_number(page, "frames", 9)
    page.locator("#prompt textarea").fill("a paper boat drifting on a lake")
    page.locator("#generate").click()
    page.wait_for_function(
        "() => { const v = document.querySelector('#video video');"
        " return v && v.currentSrc && v.readyState >= 1 && v.videoWidth > 0; }",
        timeout=WAIT_MS,
    )
    assert page.locator("#video video").evaluate("v => [v.videoWidth, v.videoHeight]") == [128, 128]
    assert "9 frames" in page.locator("#metadata").inner_text()
    page.locator("#accel-sparse_attention input[type=checkbox]").check()
    set_number(page, "frames", 5)
    page.locator("#generate").click()
    page.wait_for_function(
        "() => document.querySelector('#metadata')?.innerText.includes('sparse_attention')", timeout=WAIT_MS
    )
    assert "5 frames" in page.locator("#metadata").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-video.png"), full_page=True)


def test_cancel_a_long_job(page):
    choose_model(page, "tiny-sd")
    set_number(page, "width", 512)
    set_number(page, "height", 512)
    set_number(page, "steps", 100)
    page.locator("#prompt textarea").fill("a long job")
    page.locator("#generate").click()
    first = _wait_for_step(page, at_least=1)
    _wait_for_step(page, at_least=first + 1)  # the bar moves
    page.locator("#cancel").click()
    page.wait_for_function(
        "() => document.querySelector('#progress')?.innerText.includes('cancelled at step')", timeout=60_000
    )
    step = int(re.search(r"cancelled at step (\d+) of 100", progress_text(page)).group(1))
    assert first < step < 100
    assert page.locator("#history tr[data-status=cancelled]").count() == 1
    assert page.locator("#cancel").is_disabled()


def _wait_for_step(tab, at_least: int) -> int:
    tab.wait_for_function(
        f"() => {{ const m = /step (\\d+) of 100, ETA/.exec(document.querySelector('#progress')?.innerText || '');"
        f" return m && Number(m[1]) >= {at_least}; }}",
        timeout=WAIT_MS,
    )
    return int(re.search(r"step (\d+) of 100", progress_text(tab)).group(1))


def test_a_refused_request_shows_each_problem_under_its_field(page):
    choose_model(page, "tiny-sd")
    page.locator("#prompt textarea").fill("a cat")
    set_number(page, "width", 60)
    page.locator("#generate").click()
    size = page.locator("#problem-size")
    page.wait_for_function("() => document.querySelector('#problem-size')?.innerText.includes('8')", timeout=30_000)
    assert "Width" in size.inner_text() and "multiple of 8" in size.inner_text(), size.inner_text()
    field, message = page.locator("#width").bounding_box(), size.bounding_box()
    assert 0 <= message["y"] - (field["y"] + field["height"]) < 60  # right under the size row, not under the buttons
    assert page.locator("#problem-sampling").is_hidden() and page.locator("#problem-prompt").is_hidden()
    assert "Refused" in progress_text(page) and "No job yet" not in progress_text(page)
    assert "refused" in page.locator("#problem").inner_text()
    set_number(page, "width", 5000)
    page.locator("#prompt textarea").fill("")
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelector('#problem-size')?.innerText.includes('2048')", timeout=30_000)
    assert "FASTGEN_MAX_SIDE" in size.inner_text() and "Prompt" in page.locator("#problem-prompt").inner_text()
    assert page.locator("#history tr[data-job]").count() == 0  # nothing was queued
    assert "Traceback" not in page.content()
    page.locator("#prompt textarea").fill("a cat")
    set_number(page, "width", 64)
    set_number(page, "steps", 2)
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelector('#history tr[data-job]')", timeout=30_000)
    assert size.is_hidden() and page.locator("#problem-prompt").is_hidden()  # a queued job clears them


def test_the_previous_result_leaves_the_screen_when_the_next_job_is_submitted(page):
    choose_model(page, "tiny-sd")
    set_number(page, "steps", 2)
    page.locator("#prompt textarea").fill("a quick first job")
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelector('#metadata table')", timeout=WAIT_MS)
    page.wait_for_function("() => document.querySelector('#gallery img')", timeout=WAIT_MS)
    assert page.locator("#seed input[type=number]").is_disabled()  # still locked after a job: random is ticked
    set_number(page, "width", 512)
    set_number(page, "height", 512)
    set_number(page, "steps", 100)
    page.locator("#prompt textarea").fill("a long second job")
    page.locator("#generate").click()
    _wait_for_step(page, at_least=2)  # the second job runs, and the page has polled it a few times
    assert page.locator("#metadata").inner_text().strip() == ""
    assert page.locator("#gallery img").count() == 0 and page.locator("#downloads a").count() == 0
    page.locator("#cancel").click()
    page.wait_for_function(
        "() => document.querySelector('#progress')?.innerText.includes('cancelled at step')", timeout=60_000
    )


def test_the_seed_box_is_locked_while_random_seed_is_ticked(page):
    seed, random = page.locator("#seed input[type=number]"), page.locator("#random input")
    assert random.is_checked() and seed.is_disabled()
    choose_model(page, "tiny-wan")
    choose_model(page, "tiny-sd")
    assert random.is_checked() and seed.is_disabled()
    random.uncheck()
    page.wait_for_function("() => !document.querySelector('#seed input[type=number]').disabled", timeout=30_000)
    seed.fill("7")
    held = []  # the page's calls to its server wait here: the lock must not depend on an answer
    page.route("**/gradio_api/queue/join*", lambda route: held.append(route))
    random.check()
    page.wait_for_function("() => document.querySelector('#seed input[type=number]').disabled", timeout=5_000)
    page.unroute("**/gradio_api/queue/join*")
    for route in held:
        route.continue_()


def test_a_page_load_and_a_job_answer_no_error_status(browser, service):
    """Every resource the browser asks for exists: no 404 (nor any 4xx/5xx) for the page, its icon, or a job."""
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    tab = context.new_page()
    failed: list[str] = []
    tab.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.request.method} {r.url}"))
    # The browser fetches the site's icon on its own and reports a missing one only on the console.
    tab.on("console", lambda m: "Failed to load resource" in m.text and failed.append(f"{m.text} {m.location}"))
    try:
        tab.goto(f"{service.url}/ui/")
        tab.wait_for_function("() => document.querySelector('#model input')?.value", timeout=60_000)
        choose_model(tab, "tiny-sd")
        set_number(tab, "steps", 2)
        tab.locator("#prompt textarea").fill("a small job")
        tab.locator("#generate").click()
        tab.wait_for_function("() => document.querySelector('#gallery img')", timeout=WAIT_MS)
        tab.wait_for_timeout(1_000)  # the last poll's streams close
        # A browser that already met this site may skip its icon, so ask for it the way the browser would.
        icon = tab.evaluate("() => document.querySelector('link[rel~=icon]')?.href || '/favicon.ico'")
        assert tab.evaluate("async url => (await fetch(url)).status", icon) == 200, icon
    finally:
        context.close()
    assert not failed, failed


@pytest.fixture(scope="module", autouse=True)
def keep_a_screenshot_for_the_readme():
    """Copy the result screenshot to docs/images/ui.png when asked (FASTGEN_UPDATE_SCREENSHOT=1)."""
    yield
    shot = ARTIFACTS / "ui.png"
    if os.environ.get("FASTGEN_UPDATE_SCREENSHOT") == "1" and shot.is_file():
        target = Path(__file__).resolve().parents[1] / "docs" / "images" / "ui.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)

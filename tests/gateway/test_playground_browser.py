"""The playground in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
installed by ``make test``), driven by Selenium, against a real ``taxiway serve`` of the default
models with an API key: the key asked for, a model picked, a prompt's answer streamed with its
TTFT, tokens/s and usage; a wrong key's error as the API words it; embeddings; a phone's width.

Screenshots go to the test's tmp dir (``docs/playground.png`` is one of them).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, serve_process

pytestmark = pytest.mark.slow

KEY = "playground-test-key"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

if CHROMIUM is None or CHROMEDRIVER is None:
    # `make test` installs them (CI runs it); a bare pytest elsewhere may lack them
    if os.environ.get("CI"):
        raise RuntimeError("CI needs chromium and chromedriver: `make browser` installs them")
    pytest.skip("no chromium/chromedriver here: `make browser` installs them", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``taxiway serve --api-key KEY``: no config, the default chat and embedding models."""
    with serve_process(None, tmp_path_factory.mktemp("playground"), extra_args=("--api-key", KEY),
                       startup_timeout=180) as server:  # fmt: skip
        server.wait_ready(300)
        yield server


def _browser(width: int = 1100, height: int = 820) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):  # fmt: skip
        options.add_argument(arg)
    # a driver path given: Selenium does not look for (or download) one of its own
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    driver = _browser()
    yield driver
    driver.quit()


def _text(driver: WebDriver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).get_attribute("textContent") or ""


def _use_key(driver: WebDriver, key: str) -> None:
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.ID, "key-apply").click()


def _api_error(server: ServerProcess, key: str | None) -> str:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{server.base_url}/models", headers=headers, timeout=10)
    assert response.status_code == 401
    return str(response.json()["error"]["message"])


def test_chat_streams_an_answer_with_ttft_tokens_per_s_and_usage(
    server: ServerProcess, browser: WebDriver, tmp_path: Path
) -> None:
    wait = WebDriverWait(browser, 60, poll_frequency=0.02)
    browser.get(server.url + "/")
    # keys are on: the page shows the key field and the API's own 401 message
    wait.until(lambda d: d.find_element(By.ID, "key-row").is_displayed() and _text(d, "error"))
    assert _text(browser, "error") == _api_error(server, None)

    _use_key(browser, KEY)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) >= 2)
    assert not browser.find_element(By.ID, "error").is_displayed()
    picker = Select(browser.find_element(By.ID, "model"))
    values = [o.get_attribute("value") for o in picker.options]
    assert values == ["smollm2-135m-instruct", "default"]  # the embedding model is not offered for chat
    picker.select_by_value("smollm2-135m-instruct")
    for field, value in (("system", "You are a concise assistant."), ("temperature", "0"), ("max-tokens", "40")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)

    browser.find_element(By.ID, "prompt").send_keys("Name three colours of the rainbow.")
    browser.find_element(By.ID, "send").click()
    # streamed: the answer is seen growing before it is complete (its stats come at the end)
    answer = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant .content"))[0]
    partials: list[str] = []
    deadline = time.monotonic() + 60
    while not browser.find_elements(By.CSS_SELECTOR, ".message.assistant .stats") and time.monotonic() < deadline:
        text = answer.get_attribute("textContent") or ""
        if text and (not partials or text != partials[-1]):
            partials.append(text)
    final = answer.get_attribute("textContent") or ""
    assert final.strip() and len(partials) >= 2 and all(final.startswith(p) for p in partials), partials

    ttft = float(browser.find_element(By.CSS_SELECTOR, "[data-ttft]").text.removesuffix(" s"))
    tokens_per_s = float(browser.find_element(By.CSS_SELECTOR, "[data-tps]").text)
    usage = browser.find_element(By.CSS_SELECTOR, "[data-usage]").text
    prompt_tokens, completion_tokens, total = map(int, re.findall(r"\d+", usage))
    assert 0 < ttft < 30 and tokens_per_s > 0
    assert 1 < completion_tokens <= 40 and total == prompt_tokens + completion_tokens  # max tokens was sent
    screenshot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot} ttft={ttft} tokens/s={tokens_per_s} usage={usage}")

    # a second turn carries the first: the history is sent with it
    browser.find_element(By.ID, "prompt").send_keys("And one more?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant .stats")) == 2)
    second = browser.find_elements(By.CSS_SELECTOR, ".message.assistant [data-usage]")[1].text
    assert int(re.findall(r"\d+", second)[0]) > prompt_tokens + completion_tokens


def test_a_wrong_key_shows_the_apis_error(server: ServerProcess, browser: WebDriver, tmp_path: Path) -> None:
    wait = WebDriverWait(browser, 30)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "key-row").is_displayed())
    _use_key(browser, "not-the-key")
    expected = _api_error(server, "not-the-key")
    wait.until(lambda d: _text(d, "error") == expected)
    assert browser.find_element(By.ID, "error").is_displayed()

    # the same for a chat request: the key turns wrong after the models were listed
    _use_key(browser, KEY)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) >= 2 and not _text(d, "error"))
    browser.execute_script("state.key = 'not-the-key'")
    browser.find_element(By.ID, "prompt").send_keys("Hello?")
    browser.find_element(By.ID, "send").click()
    failed = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant.failed"))[0]
    assert failed.text == expected and _text(browser, "error") == expected
    browser.save_screenshot(str(tmp_path / "playground-wrong-key.png"))


def test_embeddings_tab_for_the_encoder(server: ServerProcess, browser: WebDriver) -> None:
    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    _use_key(browser, KEY)
    tab = wait.until(lambda d: d.find_element(By.ID, "tab-embeddings") if d.find_element(By.ID, "tab-embeddings").is_displayed() else None)
    tab.click()
    assert [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "embed-model")).options] == [
        "all-minilm-l6-v2", "embed"
    ]  # fmt: skip
    browser.find_element(By.ID, "embed-send").click()
    summary = wait.until(lambda d: d.find_elements(By.ID, "embed-summary"))[0].text
    assert summary.startswith("3 vectors of 384 dimensions")
    cells = [float(c.text) for c in browser.find_elements(By.CSS_SELECTOR, "#embed-result td")]
    assert len(cells) == 9 and all(abs(cells[i * 4] - 1) < 1e-3 for i in range(3))
    # the cat and the kitten are nearer each other than the stock market
    assert cells[1] > cells[2] + 0.2


def test_a_phone_sized_screen_has_no_sideways_scroll(server: ServerProcess, tmp_path: Path) -> None:
    driver = _browser(390, 844)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server.url + "/")
        _use_key(driver, KEY)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) >= 2)
        driver.find_element(By.ID, "prompt").send_keys("Hi")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant .stats"))
        inner, scroll = driver.execute_script("return [window.innerWidth, document.documentElement.scrollWidth]")
        assert scroll <= inner, (scroll, inner)
        for element_id in ("prompt", "send", "api-key"):
            rect = driver.find_element(By.ID, element_id).rect
            assert rect["x"] >= 0 and rect["x"] + rect["width"] <= inner, (element_id, rect)
        driver.save_screenshot(str(tmp_path / "playground-phone.png"))
    finally:
        driver.quit()

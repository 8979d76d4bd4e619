"""`histo serve` in a real browser: Debian's headless Chromium, driven by Selenium through Debian's
chromedriver (`make browser` installs both when missing). The page is served by uvicorn on a thread; the
tests upload a patch and pick a slide as a user would, wait for the results, check the ranked rows and
the crops in the DOM, open the Deep Zoom viewer, and save screenshots under the test's tmp folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from pathology.store import TileStore
from search.web.app import create_app
from search.web.server import background
from search.web.service import ServeConfig, Service

WAIT_S = 120


@pytest.fixture(scope="module")
def site(demo: dict[str, Path]):
    """The app on a live uvicorn (its own picture cache, so the browser sees cold reads too)."""
    service = Service(
        ServeConfig(
            index_dir=demo["index"], slides_root=demo["slides"], cache_dir=demo["root"] / "browser-cache"
        )
    )
    with background(create_app(service.config, service)) as url:
        yield url


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert browser and driver, "headless Chromium and chromedriver are missing: run `make browser`"
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _chromium()
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,1100", "--disable-extensions", "--no-first-run"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=DriverService(executable_path=driver_path))
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait_for_results(driver: webdriver.Chrome) -> None:
    """The job page reloads itself until the query is done; then the ranked list is there."""
    WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(
        lambda d: d.find_elements(By.ID, "hits") or d.find_elements(By.ID, "job-error")
    )
    assert not driver.find_elements(By.ID, "job-error"), driver.find_element(By.ID, "job-error").text


def loaded_images(driver: webdriver.Chrome, css: str) -> list[dict]:
    """src, natural size and completeness of the images matching `css`, once all have settled."""
    script = (
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(i => ({src: i.getAttribute('src'), w: i.naturalWidth, h: i.naturalHeight, done: i.complete}));"
    )
    WebDriverWait(driver, WAIT_S).until(lambda d: all(i["done"] for i in d.execute_script(script, css)))
    return driver.execute_script(script, css)


def rows(driver: webdriver.Chrome) -> list[tuple[str, str]]:
    return [(li.get_attribute("data-rank"), li.get_attribute("data-slide"))
            for li in driver.find_elements(By.CSS_SELECTOR, "li.hit")]  # fmt: skip


def submit(driver: webdriver.Chrome, form, k: int, button: str) -> list[tuple[str, str]]:
    """Ask for `k` hits, press the form's `button`, wait for the results: their (rank, slide) rows."""
    field = form.find_element(By.NAME, "k")
    field.clear()
    field.send_keys(str(k))
    form.find_element(By.ID, button).click()
    wait_for_results(driver)
    return rows(driver)


def test_upload_a_patch_and_see_its_tile_first(site: str, browser, demo: dict, tmp_path: Path) -> None:
    tile = TileStore.open(demo["tiles"]).read_selected("SYN-C1-P01-S0", [0])[0]
    patch = tmp_path / "query patch.png"
    Image.fromarray(tile).save(patch)
    browser.get(f"{site}/query")
    form = browser.find_element(By.ID, "form-patch")
    form.find_element(By.ID, "image").send_keys(str(patch))
    ranked = submit(browser, form, k=5, button="run-patch")
    assert [r for r, _ in ranked] == ["1", "2", "3", "4", "5"] and ranked[0][1] == "SYN-C1-P01-S0"
    crops = loaded_images(browser, "img.crop")
    assert len(crops) == 10 and all(c["w"] == 64 and c["h"] == 64 for c in crops), crops
    query = loaded_images(browser, "#query-image")[0]
    assert (query["w"], query["h"]) == (64, 64)
    assert browser.find_element(By.CSS_SELECTOR, "#prediction .label").text.startswith("class")
    first = browser.find_element(By.CSS_SELECTOR, 'li.hit[data-rank="1"] .distance')
    assert float(first.text) < 1e-3  # the patch is that very tile
    browser.save_screenshot(str(tmp_path / "patch-results.png"))
    assert (tmp_path / "patch-results.png").stat().st_size > 10_000


def test_pick_a_slide_and_see_matched_tile_pairs(site: str, browser, demo: dict, tmp_path: Path) -> None:
    browser.get(f"{site}/query")
    form = browser.find_element(By.ID, "form-slide")
    Select(form.find_element(By.ID, "slide_id")).select_by_value("SYN-C2-P00-S0")
    ranked = submit(browser, form, k=4, button="run-slide")
    assert len(ranked) == 4 and ranked[0][1] == "SYN-C2-P00-S0"
    for li in browser.find_elements(By.CSS_SELECTOR, "li.hit"):
        pairs = li.find_elements(By.CSS_SELECTOR, "figure.pair")
        assert pairs and all(len(p.find_elements(By.CSS_SELECTOR, "img.crop")) == 2 for p in pairs)
        assert li.find_element(By.CSS_SELECTOR, ".label").text.startswith("class")
        assert li.find_element(By.CSS_SELECTOR, ".distance").text
    crops = loaded_images(browser, "img.crop")
    assert crops and all(c["w"] == 64 and c["h"] == 64 for c in crops), crops
    thumbs = loaded_images(browser, "img.hit-thumb, #query-image")
    assert len(thumbs) == 5 and all(t["w"] > 0 for t in thumbs)
    assert browser.find_element(By.ID, "patient-state").text == "included"
    browser.save_screenshot(str(tmp_path / "slide-results.png"))
    browser.get(f"{site}/")
    loaded_images(browser, "td.thumb img")
    browser.save_screenshot(str(tmp_path / "archive.png"))


def test_viewer_loads_deep_zoom_tiles_and_draws_the_matches(site: str, browser, tmp_path: Path) -> None:
    browser.get(f"{site}/query?slide_id=SYN-C0-P01-S0")
    browser.find_element(By.ID, "run-slide").click()
    wait_for_results(browser)
    browser.find_element(By.CSS_SELECTOR, 'li.hit[data-rank="2"] a.id').click()
    viewer = browser.find_element(By.ID, "viewer")
    WebDriverWait(browser, WAIT_S).until(lambda d: int(viewer.get_attribute("data-tiles-loaded")) >= 4)
    WebDriverWait(browser, WAIT_S).until(lambda d: viewer.get_attribute("data-overlays"))
    assert viewer.get_attribute("data-tile-failed") is None
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').filter(e => e.name.includes('_files/'))"
        ".map(e => [e.name, e.responseStatus]);"
    )
    assert fetched and all(status == 200 for _, status in fetched), fetched
    matches = browser.find_elements(By.CSS_SELECTOR, ".ov.match")
    assert matches and [m.text for m in matches] == [str(i + 1) for i in range(len(matches))]
    assert browser.find_elements(By.CSS_SELECTOR, ".ov.cellular")
    assert browser.find_elements(By.CSS_SELECTOR, ".ov.mosaic")
    browser.find_element(By.CSS_SELECTOR, 'input[data-layer="mosaic"]').click()
    assert "hide-mosaic" in viewer.get_attribute("class")
    browser.find_element(By.CSS_SELECTOR, 'input[data-layer="mosaic"]').click()
    shot = tmp_path / "viewer.png"
    browser.save_screenshot(str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.std() > 10  # the slide is drawn, not a blank canvas

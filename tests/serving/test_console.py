"""The operator console in a real headless browser (Debian's Chromium through chromedriver,
driven by Selenium) against a real `contentml serve`: the models with their aliases and
history, the review queue with a decision made through the page, the experiments with P(best)
and the stop rule, a trend forecast drawn with its interval for a chosen series, and the page
following `/v1/events` (a promotion made elsewhere shows without a reload)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import httpx
import mlflow
import numpy as np
import pytest

from contentml import events, registry
from contentml.settings import Settings
from entrypoints.demo import free_port, model_server
from tests.conftest import DATA_DIR, make_settings
from tests.helpers.registry import register_versions
from training.quality.review_store import NewItem, ReviewStore, Source, Status
from training.revenue.store import RewardStore
from training.trend.ensemble import EnsembleConfig
from training.trend.forecasters import Member
from training.trend.train import log_saved_model, train

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMEDRIVER is None or CHROMIUM is None,
        reason="Debian's chromium and chromium-driver are not installed (`make browser` "
        "installs them with apt-get, as root)",
    ),
]

ADMIN = "console-admin-token"
CALLERS = "console-callers-token"
WAIT_SECONDS = 30
QUICK_TREND = EnsembleConfig(members=(Member.SEASONAL_NAIVE_DAY, Member.SEASONAL_NAIVE_WEEK))


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Settings:
    """A registry with a model promoted twice and a trend champion, two open review items, an
    experiment with rewards: what the page shows."""
    settings = make_settings(
        tmp_path_factory.mktemp("console") / "state",
        CONTENTML_API_TOKEN=CALLERS,
        CONTENTML_ADMIN_TOKEN=ADMIN,
    )
    events.configure(settings)
    client = registry.connect(settings)
    first, second = register_versions(settings, "console-toy", 2)
    registry.promote(client, "console-toy", first, reason="first")
    registry.promote(client, "console-toy", second, reason="second is better")
    # A real trend champion, quick to train (two seasonal-naive members): its forecasts have
    # the interval the page shades.
    hours = np.arange(24 * 28)
    histories = {f"S{i}": 100 + 20 * np.sin(2 * np.pi * hours / 24) * (i + 1) for i in range(3)}
    model_dir = tmp_path_factory.mktemp("trend-model") / "model"
    train(histories, QUICK_TREND, model_dir, workers=1)
    with mlflow.start_run(experiment_id=registry.experiment_id(client, settings)):
        trend_version = str(log_saved_model(model_dir, "trend").registered_model_version)
    registry.promote(client, "trend", trend_version, reason="console test")
    reviews = ReviewStore.from_settings(settings)
    for text, video in (("borderline words one", "vid-1"), ("borderline words two", "vid-2")):
        new = NewItem(
            text=text,
            reasons=[{"check": "toxicity", "detail": "classifier unsure"}],
            labels={"neither": 0.55, "offensive_language": 0.45},
            source=Source.TASK,
            score=0.55,
            channel="garden",
            video_id=video,
            model_version="3",
        )
        reviews.add(new)
    reviews.close()
    rewards = RewardStore(settings.revenue_store)
    rewards.ensure("thumbnails", ["a", "b"])
    rewards.add_rewards("thumbnails", [("a", 1)] * 30 + [("a", 0)] * 70 + [("b", 0)] * 100)
    rewards.close()
    return settings


@pytest.fixture(scope="module")
def server(state: Settings) -> Iterator[str]:
    with model_server(state, free_port(), "--workers", "0") as url:
        yield url


@pytest.fixture
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, what: str):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page re-renders a table on every event: an element found just before a re-render
    # is stale when read, which means "not yet", as a missing one does.
    wait = WebDriverWait(driver, WAIT_SECONDS, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(lambda d: condition(d), message=what)


def wait_live(driver) -> None:
    wait_for(driver, lambda d: text_of(d, "#live") == "live (WebSocket)", "the page follows events")


def text_of(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text


def test_the_console_needs_the_token_and_keeps_it_out_of_the_address(server, browser):
    assert httpx.get(f"{server}/console").status_code == 401
    browser.get(f"{server}/console?token={ADMIN}")
    assert browser.current_url == f"{server}/console"  # redirected: the token is in the cookie
    cookie = browser.get_cookie("contentml_token")
    assert cookie["value"] == ADMIN and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    wait_live(browser)


def test_the_console_shows_models_review_items_and_experiments(server, browser, state):
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/console?token={ADMIN}")
    models = text_of(browser, "#models")
    assert "console-toy" in models and "trend" in models
    assert "promote champion v1 → v2" in models and "second is better" in models
    review = text_of(browser, "#review")
    assert "borderline words one" in review and "borderline words two" in review
    assert "garden / vid-1" in review and "toxicity: classifier unsure" in review
    experiments = text_of(browser, "#experiments")
    assert "thumbnails" in experiments and "P(best)" in experiments
    p_best = [float(cell.text) for cell in browser.find_elements(By.CSS_SELECTOR, ".p-best")]
    assert len(p_best) == 2 and sum(p_best) == pytest.approx(1.0, abs=0.002)
    assert p_best[0] > 0.99  # arm a: 30 clicks in 100 against none in 100
    assert text_of(browser, ".recommendation").startswith(("stop:", "continue:"))


def test_a_review_decision_made_through_the_page(server, browser, state):
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/console?token={ADMIN}")
    wait_live(browser)
    row = browser.find_element(By.CSS_SELECTOR, ".review-item")
    item_id = row.get_attribute("data-item")
    text = row.find_element(By.CSS_SELECTOR, ".text").text
    row.find_element(By.CSS_SELECTOR, "button[data-decision=approve]").click()
    wait_for(
        browser,
        lambda d: not d.find_elements(By.CSS_SELECTOR, f'tr[data-item="{item_id}"]'),
        "the decided item leaves the list",
    )
    assert text_of(browser, "#review-status") == f"{item_id}: approved"
    wait_for(
        browser,
        lambda d: "review.decided" in text_of(d, "#events"),
        "the decision's event shows in the page's event list",
    )
    reviews = ReviewStore.from_settings(state)
    decided = reviews.get(item_id)
    reviews.close()
    assert (decided.status, decided.text, decided.label) == (Status.APPROVED, text, "neither")


def test_with_the_callers_token_a_decision_is_refused_and_the_item_stays(server, browser, state):
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/console?token={CALLERS}")
    row = browser.find_element(By.CSS_SELECTOR, ".review-item")
    item_id = row.get_attribute("data-item")
    row.find_element(By.CSS_SELECTOR, "button[data-decision=reject]").click()
    wait_for(browser, lambda d: "failed (403)" in text_of(d, "#review-status"), "a 403 is shown")
    reviews = ReviewStore.from_settings(state)
    assert reviews.get(item_id).status is Status.PENDING
    reviews.close()


def test_a_promotion_elsewhere_updates_the_page_without_a_reload(server, browser, state):
    browser.get(f"{server}/console?token={ADMIN}")
    wait_live(browser)
    browser.execute_script("window.notReloaded = true")
    toy = 'tr[data-model="console-toy"] .alias[data-alias="champion"]'
    assert text_of(browser, toy) == "champion: v2"
    events.configure(state)  # this process's promotion reaches the server through the store
    registry.rollback(registry.connect(state), "console-toy", reason="rolled back in a test")
    wait_for(browser, lambda d: text_of(d, toy) == "champion: v1", "the models re-render")
    assert "alias.changed" in text_of(browser, "#events")
    assert browser.execute_script("return window.notReloaded") is True


@pytest.mark.skipif(
    not (DATA_DIR / "m4-hourly" / "Hourly-train.csv").is_file(), reason="no M4 hourly data"
)
def test_a_trend_forecast_is_drawn_for_a_chosen_series(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{server}/console?token={ADMIN}")
    Select(browser.find_element(By.ID, "series")).select_by_value("H2")
    browser.find_element(By.ID, "forecast").click()
    wait_for(browser, lambda d: text_of(d, "#trend-note").startswith("H2:"), "a forecast")
    history = browser.find_element(By.ID, "history-line").get_attribute("points").split()
    forecast = browser.find_element(By.ID, "forecast-line").get_attribute("points").split()
    assert len(history) == 14 * 24 and len(forecast) == 48 + 1  # joined at the last point
    assert text_of(browser, "#trend-note").endswith("model 1, 80 % interval shaded")
    band = browser.find_element(By.ID, "interval-band").get_attribute("points").split()
    assert len(band) == 2 * 48  # the upper bounds forward, the lower ones back
    top = [float(point.split(",")[1]) for point in band[:48]]
    bottom = [float(point.split(",")[1]) for point in band[48:]][::-1]
    assert all(t <= b for t, b in zip(top, bottom, strict=True))  # SVG's y grows downwards


def test_the_cookie_changes_nothing_without_the_pages_header(server):
    """A forged cross-site form sends the cookie (where a browser ignores SameSite) but cannot
    add a header of its own: the cookie alone reads, and opens no write."""
    cookies = {"contentml_token": ADMIN}
    decide = f"{server}/v1/review/items/any/decision"
    with httpx.Client(cookies=cookies) as browser_like:
        assert browser_like.get(f"{server}/v1/review/items").status_code == 200
        assert browser_like.post(decide, json={}).status_code == 401
        answered = browser_like.post(decide, json={}, headers={"X-Contentml-Console": "1"})
    assert answered.status_code == 422, answered.text  # admitted: only the body is wrong

"""The reports are web pages: open them in headless Chromium and check what a reader sees."""
import shutil
import time

import pytest
import yaml

from workflow import snakemake

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium is not installed")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def runs_of(workdir):
    return list(yaml.safe_load((workdir / "config" / "config.yaml").read_text())["runs"])


def click(driver, locator, timeout=30):
    """Click an element once it can take the click (the report's menus animate in)."""
    deadline = time.time() + timeout
    while True:
        try:
            WebDriverWait(driver, timeout).until(expected_conditions.element_to_be_clickable(locator)).click()
            return
        except (ElementClickInterceptedException, StaleElementReferenceException):
            if time.time() > deadline:
                raise
            time.sleep(0.3)


def visible_text(driver):
    return driver.find_element(By.TAG_NAME, "body").text


def test_snakemake_report_shows_the_sweep_table_and_every_run(finished, browser, tmp_path):
    snakemake(finished, "--report", "report.html")
    browser.get((finished / "report.html").as_uri())
    wait = WebDriverWait(browser, 30)
    click(browser, (By.XPATH, "//*[text()='Sweep']"))
    click(browser, (By.XPATH, "//tr[td[normalize-space()='sweep table']]//a[@iconname='eye']"))
    wait.until(expected_conditions.frame_to_be_available_and_switch_to_it((By.TAG_NAME, "iframe")))
    table = wait.until(expected_conditions.visibility_of_element_located((By.ID, "sweep")))
    assert table.is_displayed()
    cells = [c.text for c in table.find_elements(By.XPATH, ".//tbody/tr/td[1]")]
    assert sorted(cells) == sorted(runs_of(finished))
    browser.save_screenshot(str(tmp_path / "sweep.png"))

    browser.switch_to.default_content()
    click(browser, (By.XPATH, "//a[.//*[text()='Results'] or text()='Results']"))
    click(browser, (By.XPATH, "//*[text()='Runs']"))
    time.sleep(0.5)
    text = visible_text(browser)
    for run in runs_of(finished):
        assert run in text, f"run {run} is not listed under Runs"


def test_sweep_page_sorts_by_a_clicked_column(finished, browser):
    browser.get((finished / "results/report/sweep.html").as_uri())
    header = browser.find_element(By.XPATH, "//th[@title='eval_loss']")
    header.click()
    ascending = [float(td.get_attribute("data-value")) for td in
                 browser.find_elements(By.XPATH, "//table[@id='sweep']/tbody/tr/td[12]")]
    assert ascending == sorted(ascending)
    header.click()
    descending = [float(td.get_attribute("data-value")) for td in
                  browser.find_elements(By.XPATH, "//table[@id='sweep']/tbody/tr/td[12]")]
    assert descending == sorted(ascending, reverse=True)


def test_run_page_leads_with_what_was_learned(finished, browser):
    for run in runs_of(finished):
        browser.get((finished / "results/runs" / run / "report.html").as_uri())
        headings = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
        assert headings[0] == "What was learned"
        assert {"Exact match per task", "Answers over training", "Loss curve", "Held-out generations"} <= set(headings)
        learned = browser.find_element(By.XPATH, "//h2[text()='What was learned']/following-sibling::table[1]")
        assert [th.text for th in learned.find_elements(By.TAG_NAME, "th")] == [
            "prompt", "reference", "base answer", "tuned answer"]
        marks = [td.get_attribute("class") for td in learned.find_elements(By.XPATH, ".//td[3] | .//td[4]")]
        assert marks and set(marks) <= {"right", "wrong"} and "right" in marks
        settings = {row.find_elements(By.TAG_NAME, "td")[0].text: row.find_elements(By.TAG_NAME, "td")[1].text
                    for row in browser.find_elements(By.XPATH, "//th[text()='setting']/../../tr[td]")}
        assert settings["use_rslora"] == "false" and settings["merge"] in ("true", "false")
        image = browser.find_element(By.XPATH, "//img[@alt='loss curve']")
        assert browser.execute_script("return arguments[0].naturalWidth", image) > 0


def test_sweep_page_fits_a_1400_pixel_window(finished, browser, tmp_path):
    browser.set_window_size(1400, 1000)
    browser.get((finished / "results/report/sweep.html").as_uri())
    width = browser.execute_script("return window.innerWidth")
    assert width <= 1400
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width
    overflowing = browser.execute_script(
        "return [...document.querySelectorAll('.scroll')].filter(d => d.scrollWidth > d.clientWidth).length")
    assert overflowing == 0, "the sweep tables scroll sideways"
    assert browser.save_screenshot(str(tmp_path / "sweep-1400.png"))

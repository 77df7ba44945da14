"""`snug ui`: its refusals (a non-loopback address without a token, a path outside --root),
and the page itself in a real browser: `snug ui` started as a user starts it, on a loopback
port, driven by a headless Chromium from the system's packages (Debian's chromium and
chromium-driver; .ci/run installs them) with selenium.

docs/ui/plan.png is a copy of the screenshot the browser test saves (its tmp_path; pytest's
--basetemp=DIR keeps it)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import urllib.request

import pytest

from snug.cli import build_parser, main
from snug.ui.safety import OutsideRoot, inside_root, token_check

from conftest import ROOT

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


def test_paths_resolve_inside_the_root_or_are_refused(tmp_path):
    root = tmp_path / "root"
    (root / "configs").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "in").symlink_to(root / "configs")
    (root / "out").symlink_to(outside)
    assert inside_root(root, "configs/a.yaml") == root / "configs/a.yaml"
    assert inside_root(root, "in/a.yaml") == root / "configs/a.yaml"  # a symlink within
    assert inside_root(root, root / "configs") == root / "configs"
    assert inside_root(root, ".") == root
    for path in ("../secret", "out/a.yaml", str(outside), "configs/../../secret", "/etc/passwd"):
        with pytest.raises(OutsideRoot, match=r"outside --root .* only under its root"):
            inside_root(root, path)


def test_a_non_loopback_host_needs_a_token(tmp_path, capsys):
    assert main(["ui", "--host", "0.0.0.0", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--host 0.0.0.0 would let other machines in" in err
    assert "--token-file" in err
    token = tmp_path / "token"
    for text, said in [("", "first line is empty"), ("short\n", "shorter than 8 characters")]:
        token.write_text(text)
        args = ["ui", "--host", "0.0.0.0", "--token-file", str(token), "--root", str(tmp_path)]
        assert main(args) == 2
        assert said in capsys.readouterr().err
    assert main(["ui", "--token-file", str(tmp_path / "none"), "--root", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["ui", "--root", str(tmp_path / "none")]) == 2
    assert "--root" in capsys.readouterr().err


def test_without_gradio_one_line_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else find_spec(name)
    )
    assert main(["ui", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: snug ui needs its extra: pip install 'snug[ui]'\n"


def test_the_token_is_the_password():
    check = token_check("a-long-random-token")
    assert check("anyone", "a-long-random-token")
    assert not check("anyone", "a-long-random-tokem")
    assert not check("anyone", "")


def test_the_plan_tab_plans_with_the_arguments_snug_plan_parses():
    from snug.ui.plan_tab import plan_args

    given = ["--model", "m", "--gpu", "16GiB", "--num-gpus", "2", "--seq-len", "128"]
    parsed = vars(build_parser().parse_args(["plan", "--search", "--json", *given]))
    for key in ("command", "func", "debug"):
        parsed.pop(key, None)
    assert vars(plan_args("m", "16GiB", 2, 128)) == parsed


def test_a_chosen_config_is_written_under_the_root_and_never_over_a_file(tmp_path):
    from snug.config import load_config
    from snug.ui.plan_tab import write_config
    from snug.ui.safety import UiError

    cfg = load_config(None, ["method.name=ia3", f"model.name_or_path={ROOT / 'models/tiny'}"])
    said = write_config(tmp_path, cfg, "mine")
    assert said.startswith("wrote `configs/mine.yaml`") and "data.train" in said
    assert load_config(tmp_path / "configs/mine.yaml").method.name == "ia3"
    with pytest.raises(UiError, match="exists"):
        write_config(tmp_path, cfg, "mine")
    for name in ("../mine", "a/b", "", ".hidden"):
        with pytest.raises(UiError, match="config name"):
            write_config(tmp_path, cfg, name)


@pytest.fixture
def ui_server(tmp_path):
    """`snug ui --port 0` on a root holding a copy of the bundled base; (URL, root)."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(ROOT / "models/tiny", root / "tiny")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "snug.cli", "ui", "--port", "0", "--root", str(root)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: queue.Queue[str] = queue.Queue()
    said: list[str] = []
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=120)
            said.append(line)
            if line.startswith("snug ui: http://"):
                break
        yield line.split()[2], root
    except queue.Empty:
        pytest.fail(f"snug ui did not start in 120 s: {''.join(said)}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromium-driver")
def test_the_plan_tab_in_a_browser(ui_server, tmp_path):
    """Plan the bundled base on a 16GiB card: every candidate a row, a recommendation; carry it
    into a config; the page fetches nothing from another origin."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    from snug.config import load_config

    url, root = ui_server
    with urllib.request.urlopen(url) as page:  # the browser loads nothing from elsewhere
        assert page.headers["Content-Security-Policy"].startswith("default-src 'self';")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1700")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.get(url)
        WebDriverWait(browser, 60).until(ready.element_to_be_clickable((By.ID, "plan-button")))
        tabs = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]")]
        assert tabs == ["Plan", "Train", "Runs", "Chat", "Export"]
        model = browser.find_element(By.CSS_SELECTOR, "#plan-model input")
        assert model.get_attribute("value") == "tiny"  # the model folder under the root
        gpu = browser.find_element(By.CSS_SELECTOR, "#plan-gpu input")
        gpu.send_keys(Keys.CONTROL, "a")
        gpu.send_keys("16GiB", Keys.ENTER)
        browser.find_element(By.ID, "plan-button").click()
        verdict = browser.find_element(By.ID, "plan-verdict")
        verdicts = ("recommended:", "nothing fits", "error")  # or gradio's own "Error"
        WebDriverWait(browser, 300).until(
            lambda _: any(v in verdict.text.lower() for v in verdicts)
        )
        assert "recommended" in verdict.text, verdict.text
        # gradio's table draws its rows as a virtual list of div rows and cells
        rows = browser.find_elements(By.CSS_SELECTOR, "#plan-table div[role=row]")
        cells = [
            [c.text for c in r.find_elements(By.CSS_SELECTOR, "[role=gridcell]")] for r in rows
        ]
        assert len(cells) >= 5 and {c[6] for c in cells} == {"yes"}, cells
        assert "on 16GiB x1" in verdict.text
        chosen = verdict.text.split("recommended: ")[1].split(" — ")[0]
        assert chosen in [c[0] for c in cells]
        browser.save_screenshot(str(tmp_path / "plan.png"))
        browser.find_element(By.ID, "plan-use").click()
        written = browser.find_element(By.ID, "plan-written")
        WebDriverWait(browser, 30).until(lambda _: "wrote" in written.text)
        cfg = load_config(root / "configs/planned.yaml")
        assert cfg.model.name_or_path == str(root / "tiny")
        assert chosen.startswith(cfg.method.name)
        requests = [
            json.loads(e["message"])["message"]["params"]["request"]["url"]
            for e in browser.get_log("performance")
            if '"Network.requestWillBeSent"' in e["message"]
        ]
        assert requests and [r for r in requests if not r.startswith((url, "data:"))] == []
    finally:
        browser.quit()

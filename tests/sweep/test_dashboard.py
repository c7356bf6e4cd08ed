"""`dps-tune dashboard` in a real headless Chromium (Debian's package, driven by Playwright), on a live sweep."""

import http.client
import http.cookiejar
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

from http.cookies import SimpleCookie

import pytest
import yaml

from support.cli import cli_argv, run_cli
from support.experiments import write_experiment
from support.worlds import SWEEP_WORLD, tiny_raw

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WORLD = {**SWEEP_WORLD, "train_per_class": 100}  # longer trials: the browser looks while the sweep runs


def start(*args, env: dict | None = None, ctrl_c: bool = False) -> subprocess.Popen:
    """``dps-tune ARGS`` in a session of its own. With ``ctrl_c`` it takes SIGINT as a terminal's foreground job
    does: started by a pytest-xdist worker, or by any shell without job control (`make test &`), a process begins
    with SIGINT ignored, and Python then installs no KeyboardInterrupt handler."""
    def default_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen(cli_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})},
                            preexec_fn=default_sigint if ctrl_c else None)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """``sig`` to the process's session (SIGTERM: as a service manager stops it); SIGKILL after ``timeout``."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(predicate, timeout=300, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def study_json(page, study_id=1) -> dict:
    response = page.request.get(f"/api/studies/{study_id}?after=0")
    assert response.ok, response.status
    return response.json()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")
def test_dashboard_in_a_real_browser_on_a_running_sweep(tmp_path):
    from playwright.sync_api import sync_playwright

    raw = tiny_raw(**{"data.synthetic": WORLD, "data.batch_size": 16, "optim.epochs": 4})
    raw["search"] = {"lr": {"loguniform": [5e-4, 3e-3]}}
    raw["tune"] = {"metric": "id_val_f1", "num_samples": 3, "max_concurrent_trials": 1, "grace_period": 4}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    exp = tmp_path / "runs" / "live"
    sweep = start("sweep", space, "--storage", tmp_path / "runs", "--name", "live", "--no-dashboard")
    dash = None
    try:
        # The dashboard starts while the sweep runs: its study exists, its first trial has reported.
        wait_for(lambda: (exp / "optuna.db").is_file() and list(exp.glob("*/result.json")), what="the first report")
        dash = start("dashboard", exp, "--port", "0")
        line = wait_for(lambda: dash.stdout.readline(), timeout=120, what="the dashboard's URL")
        assert line.startswith("dashboard: http://127.0.0.1:"), line
        url = line.split(" ", 1)[1].strip()
        root = url.split("/?token=")[0]
        for path in ("/", "/report", "/dashboard", "/api/studies"):  # no token, no page
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(root + path, timeout=30)
            assert err.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(root + "/?token=wrong", timeout=30)
        assert err.value.code == 401

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            context = browser.new_context(base_url=root)
            context.set_default_timeout(120_000)  # Playwright's 30 s is short while two other workers run sweeps
            page = context.new_page()
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))

            page.goto(url)
            assert page.url.rstrip("/") == root  # the token went into a cookie, out of the address bar
            assert page.locator("#open-0").inner_text() == "live"
            page.click("#open-0")
            page.wait_for_url("**/dashboard**")
            page.wait_for_selector("text=live", timeout=60_000)  # optuna-dashboard lists the study

            first = study_json(page)
            assert first["trials"], first
            for t in first["trials"]:
                attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
                if attrs:
                    assert {"id_val_acc", "id_val_f1", "ood_val_acc", "ood_val_f1", "epoch", "status"} <= set(attrs)
            finished_before = sum(t["state"] in ("Complete", "Pruned") for t in first["trials"])
            assert sweep.poll() is None and finished_before < 3, "the sweep ended before the page opened"

            # A trial that finishes while the page is open appears, with nothing restarted.
            assert sweep.wait(timeout=1200) == 0, sweep.stderr.read()[-2000:]
            page.reload()
            page.wait_for_selector("text=live", timeout=60_000)
            last = study_json(page)
            assert len(last["trials"]) == 3
            assert sum(t["state"] == "Complete" for t in last["trials"]) == 3 > finished_before
            for t in last["trials"]:
                attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
                assert attrs["status"] == "completed" and float(attrs["epoch"]) == 4.0, attrs
                assert {"id_test_acc", "ood_test_acc", "id_test_f1", "ood_test_f1"} <= set(attrs)
                assert str(exp) in attrs["checkpoint"] and "checkpoint_" in attrs["checkpoint"]
            # ...and the trial list shows each one's status and ID/OOD metrics (its user attributes)
            page.goto(root + "/dashboard/studies/1/trials")
            page.get_by_text("Trial 2", exact=True).first.wait_for(timeout=60_000)
            text = page.inner_text("body")
            for word in ("Trial 0", "Trial 1", "Trial 2", "completed", "id_test_acc", "ood_test_acc", "ood_val_f1",
                         "checkpoint_"):
                assert word in text, word

            # The report renders its images, rebuilt with every trial.
            page.goto(root + "/report")
            for img in ("#plot-id-ood-acc", "#plot-learning-curves"):
                page.wait_for_selector(img)
                assert page.eval_on_selector(img, "e => e.complete && e.naturalWidth > 300"), img
            table = page.locator("#results-table").inner_text()
            assert table.count("completed") == 3

            assert not errors, errors
            assert all(u.startswith(root) or u.startswith("data:") for u in requests), \
                [u for u in requests if not u.startswith(root)]
            browser.close()
    finally:
        stop(sweep)
        if dash is not None:
            stop(dash)


def test_the_dashboard_refuses_what_it_cannot_serve(tmp_path):
    (tmp_path / "plain").mkdir()
    for args, message in [((tmp_path / "nothing",), "no such directory"),
                          ((tmp_path / "plain",), "not a dps_tune experiment"),
                          ((tmp_path / "plain", "--port", "70000"), "--port 70000")]:
        proc = run_cli("dashboard", *args, check=False, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "dps_tune_sweep.json").write_text(json.dumps({"name": "s", "base": tiny_raw()}))
    proc = run_cli("dashboard", tmp_path / "sweep", check=False, timeout=60)
    assert proc.returncode == 2 and "no optuna.db" in proc.stderr


def dashboard_url(proc: subprocess.Popen) -> str:
    line = wait_for(lambda: proc.stdout.readline(), timeout=120, what="the dashboard's URL")
    assert line.startswith("dashboard: http://127.0.0.1:"), line + proc.stderr.read()[-2000:]
    return line.split(" ", 1)[1].strip()


def get(url: str, cookie: str = "") -> http.client.HTTPResponse:
    """One request, redirects not followed."""
    host, rest = url.removeprefix("http://").split("/", 1)
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request("GET", "/" + rest, headers={"Cookie": cookie} if cookie else {})
    response = conn.getresponse()
    response.read()
    return response


def test_two_dashboards_on_one_host_keep_their_logins_with_strict_cookies_and_csp(tmp_path):
    """Browsers share cookies between the ports of a host; each dashboard's cookies carry its port."""
    import optuna

    exps = []
    for name in ("first", "second"):
        exp = write_experiment(tmp_path, name, [("ce000001", {"algorithm": "ce"}, 2, 0.8)])
        optuna.create_study(study_name=name, storage=f"sqlite:///{exp / 'optuna.db'}")
        exps.append(exp)
    # Each with a temporary folder of its own, to see that it removes the one it makes for its live report.
    temps = [tmp_path / "tmp-first", tmp_path / "tmp-second"]
    for t in temps:
        t.mkdir()
    dashboards = [start("dashboard", exp, "--port", "0", env={"TMPDIR": str(t)}, ctrl_c=True)
                  for exp, t in zip(exps, temps)]
    try:
        urls = [dashboard_url(d) for d in dashboards]
        roots = [url.split("/?token=")[0] for url in urls]
        ports = [root.rsplit(":", 1)[1] for root in roots]
        assert ports[0] != ports[1]

        # One browser's cookie jar (per host, not per port), logged in to both, one after the other.
        jar = http.cookiejar.CookieJar()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        for url in urls:
            assert browser.open(url, timeout=30).status == 200
        for root, name in zip(roots, ("first", "second")):
            page = browser.open(root + "/", timeout=30)  # no token in the URL: the cookie alone
            assert page.status == 200 and f'href="/open/0">{name}</a>' in page.read().decode()
            csp = dict(d.strip().split(" ", 1) for d in page.getheader("Content-Security-Policy").split(";"))
            assert csp["default-src"] == "'self'" and csp["script-src"] == "'none'", csp
            assert csp["frame-ancestors"] == "'none'", csp
            assert not any(w in v for v in csp.values() for w in ("*", "http:", "https:")), csp
            # Opening the experiment sets this dashboard's experiment cookie, the other's login untouched.
            assert browser.open(root + "/open/0", timeout=30).status == 200
        assert sorted(c.name for c in jar) == sorted(f"dps_tune_{what}_{p}" for p in ports
                                                     for what in ("token", "experiment"))
        for root in roots:
            assert browser.open(root + "/", timeout=30).status == 200
            assert get(root + "/").status == 401  # and the cookie is what logs in

        # The login answer: the token goes into an HttpOnly, SameSite=Strict cookie for the whole site.
        login = get(urls[0])
        assert login.status == 303 and login.getheader("Location") == "/"
        (morsel,) = SimpleCookie(login.getheader("Set-Cookie")).values()
        assert morsel.key == f"dps_tune_token_{ports[0]}" and morsel.value == urls[0].split("token=")[1]
        assert morsel["httponly"] is True and morsel["samesite"] == "Strict" and morsel["path"] == "/"
        assert all(list(t.iterdir()) for t in temps)  # each made its report folder there

        # Ctrl-C stops the first, SIGTERM the second (kill, systemd, Kubernetes): each at once, exit 0, its
        # report folder gone.
        for d, sig in zip(dashboards, (signal.SIGINT, signal.SIGTERM)):
            began = time.time()
            stop(d, sig, timeout=20)
            assert d.returncode == 0 and time.time() - began < 20, (sig, d.returncode, d.stderr.read()[-2000:])
        assert not [list(t.iterdir()) for t in temps if list(t.iterdir())]
    finally:
        for d in dashboards:
            stop(d)

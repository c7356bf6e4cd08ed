"""``dps-tune dashboard``: one local URL for watching sweeps, live, behind a token.

* ``/`` lists the experiments. Opening one (``/open/N``) selects it, and optuna-dashboard
  serves its Optuna study at ``/dashboard``: history, the ASHA learning curves
  (intermediate values), parallel coordinates, parameter importance, Pareto fronts, and
  the trials' user attributes, which the sweep fills as trials report (every ID/OOD
  accuracy and macro-F1, the epoch, the status and the newest checkpoint).
  optuna-dashboard's pages use absolute paths (``/api``, ``/static``), so one experiment
  is selected at a time, remembered in a cookie.
* ``/report`` is the dps_tune report of all the experiments, rebuilt whenever a trial
  reports, and reloading itself every 15 s.

Secure by default: the server binds 127.0.0.1 unless ``--host`` says otherwise, and
every request needs the token printed with the URL (``?token=…`` once, then a cookie);
without it the answer is 401. The pages load nothing from outside the server. Browsers
share cookies between the ports of one host, so the cookies' names carry the port: two
dashboards on one host (two users, or one per sweep) do not log each other out.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import logging
import os
import secrets
import socketserver
import sqlite3
import threading
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import parse_qs, urlencode
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from dps_tune.errors import UserError
from dps_tune.sweep import report as report_mod
from dps_tune.sweep.results import open_sweep
from dps_tune.sweep.sweep_file import SWEEP_FILE, SweepFile

logger = logging.getLogger(__name__)

TOKEN_COOKIE = "dps_tune_token_{port}"
EXP_COOKIE = "dps_tune_experiment_{port}"
COOKIE_FLAGS = "Path=/; HttpOnly; SameSite=Strict"
REFRESH_S = 15
OPTUNA_PREFIXES = ("/dashboard", "/api/", "/static/", "/csv/", "/favicon.ico")
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'none'; "
       "frame-ancestors 'none'")


@dataclass
class ServedExperiment:
    name: str
    path: Path
    db: Path


def _check_study_file(db: Path) -> None:
    """``db`` is an SQLite file holding Optuna's tables (opened read-only: nothing is created beside it)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            conn.execute("SELECT count(*) FROM studies").fetchone()
    except sqlite3.Error as exc:
        raise UserError(f"experiment {str(db.parent)!r}: optuna.db is not a readable Optuna study ({exc})") from None


def find_experiments(exp_dirs: Sequence[str | os.PathLike]) -> list[ServedExperiment]:
    """The experiments to serve; each must be a sweep directory with an Optuna study."""
    if not exp_dirs:
        raise UserError("no experiment directory given")
    found = []
    for d in exp_dirs:
        path, sweep = open_sweep(d)
        db = path / "optuna.db"
        if not db.is_file():
            raise UserError(f"experiment {str(d)!r}: no optuna.db (a sweep without a search: space has no study)")
        _check_study_file(db)
        found.append(ServedExperiment(sweep.name or path.name, path.resolve(), db))
    return found


class _LiveReport:
    """The report of the experiments, rebuilt when any trial has reported since the last build."""

    def __init__(self, experiments: Sequence[ServedExperiment], out: Path):
        self.experiments, self.out = experiments, out
        self.lock = threading.Lock()
        self.signature: str | None = None

    def _signature(self) -> str:
        h = hashlib.sha256()
        for e in self.experiments:
            for p in sorted(e.path.glob("*/result.json")) + [e.path / SWEEP_FILE]:
                try:
                    st = p.stat()
                except OSError:
                    continue
                h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def page(self) -> bytes:
        with self.lock:
            sig = self._signature()
            if sig != self.signature or not self.out.is_file():
                zero_shot = report_mod.find_zero_shot([e.path for e in self.experiments])
                try:
                    report_mod.render_report([e.path for e in self.experiments], self.out, zero_shot=zero_shot)
                except UserError as exc:  # no trial has reported yet, say
                    text = f"<p>No report yet: {html.escape(str(exc))}</p>"
                    self.out.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>report</title>"
                                        f"</head><body>{text}</body></html>")
                self.signature = sig
            page = self.out.read_text()
        refresh = f'<meta http-equiv="refresh" content="{REFRESH_S}">'
        return page.replace("<head>", "<head>\n" + refresh, 1).encode()


class Dashboard:
    """The WSGI application: token check, experiment index, live report, optuna-dashboard."""

    def __init__(self, experiments: Sequence[ServedExperiment], token: str, work_dir: Path, port: int):
        import optuna_dashboard

        self.experiments, self.token = list(experiments), token
        self.token_cookie, self.exp_cookie = TOKEN_COOKIE.format(port=port), EXP_COOKIE.format(port=port)
        self.apps = [optuna_dashboard.wsgi(f"sqlite:///{e.db}") for e in experiments]
        self.report = _LiveReport(experiments, work_dir / "report.html")

    # ------------------------------------------------------------------ auth

    def _authorised(self, environ: dict) -> tuple[bool, bool]:
        """(the request carries the token, it came in the query string)."""
        query = parse_qs(environ.get("QUERY_STRING", ""))
        given = query.get("token", [None])[0]
        if given is not None:
            return hmac.compare_digest(given, self.token), True
        header = environ.get("HTTP_AUTHORIZATION", "")
        if header.startswith("token "):
            return hmac.compare_digest(header[len("token "):], self.token), False
        cookie = SimpleCookie(environ.get("HTTP_COOKIE", ""))
        if self.token_cookie in cookie:
            return hmac.compare_digest(cookie[self.token_cookie].value, self.token), False
        return False, False

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        ok, in_query = self._authorised(environ)
        if not ok:
            body = b"401: this dashboard needs the token printed with its URL (?token=...)\n"
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        path = environ.get("PATH_INFO", "/") or "/"
        if in_query:  # set the cookie, and drop the token from the address bar
            rest = {k: v for k, v in parse_qs(environ.get("QUERY_STRING", "")).items() if k != "token"}
            target = path + (f"?{urlencode(rest, doseq=True)}" if rest else "")
            start_response("303 See Other", [
                ("Location", target),
                ("Set-Cookie", f"{self.token_cookie}={self.token}; {COOKIE_FLAGS}")])
            return [b""]
        if path == "/":
            return self._html(start_response, self._index())
        if path == "/report":
            return self._html(start_response, self.report.page())
        if path.startswith("/open/"):
            try:
                index = int(path[len("/open/"):])
                self.experiments[index]
            except (ValueError, IndexError):
                return self._not_found(start_response)
            start_response("303 See Other", [
                ("Location", "/dashboard"),
                ("Set-Cookie", f"{self.exp_cookie}={index}; {COOKIE_FLAGS}")])
            return [b""]
        if path.startswith(OPTUNA_PREFIXES):
            return self.apps[self._selected(environ)](environ, start_response)
        return self._not_found(start_response)

    def _selected(self, environ: dict) -> int:
        cookie = SimpleCookie(environ.get("HTTP_COOKIE", ""))
        try:
            index = int(cookie[self.exp_cookie].value) if self.exp_cookie in cookie else 0
        except ValueError:
            index = 0
        return index if 0 <= index < len(self.apps) else 0

    # ----------------------------------------------------------------- pages

    @staticmethod
    def _html(start_response: Callable, body: bytes) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
                                  ("Content-Security-Policy", CSP), ("Cache-Control", "no-store")])
        return [body]

    @staticmethod
    def _not_found(start_response: Callable) -> list[bytes]:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"404\n"]

    def _index(self) -> bytes:
        rows = []
        for i, e in enumerate(self.experiments):
            sweep = SweepFile.read(e.path)
            status = (sweep.status if sweep else None) or "?"
            trials = len(list(e.path.glob("*/params.json")))
            rows.append(f'<tr><td><a id="open-{i}" href="/open/{i}">{html.escape(e.name)}</a></td>'
                        f"<td>{html.escape(status)}</td><td class='num'>{trials}</td>"
                        f"<td><code>{html.escape(str(e.path))}</code></td></tr>")
        body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dps-tune dashboard</title>
<meta http-equiv="refresh" content="{REFRESH_S}">
<style>
{report_mod.CSS}</style></head>
<body><h1>dps-tune dashboard</h1>
<p><a id="report-link" href="/report">The report</a>: ID against OOD, masking, learning curves and the tables of
every experiment below, rebuilt as trials report.</p>
<p>Open an experiment for its Optuna study (optuna-dashboard): history, learning curves, parameter importance,
and every trial's ID/OOD metrics, epoch, status and checkpoint under its user attributes.</p>
<div class="scroll"><table id="experiments"><thead><tr><th>experiment</th><th>status</th><th>trials</th>
<th>path</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>
</body></html>
"""
        return body.encode()


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("%s - %s", self.address_string(), format % args)


def _not_ready(environ: dict, start_response: Callable) -> list[bytes]:  # replaced before the first request
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"starting"]


def serve(exp_dirs: Sequence[str | os.PathLike], *, host: str = "127.0.0.1", port: int = 0,
          token: str | None = None, work_dir: Path | None = None,
          ready: Callable[[str], None] | None = None) -> None:
    """Serve the dashboard until interrupted (Ctrl-C, or SIGTERM as a service manager stops it); ``ready(url)``
    is called with the URL (token included). The temporary folder it made for the live report is removed."""
    import shutil
    import tempfile

    experiments = find_experiments(exp_dirs)
    try:
        server = make_server(host, port, _not_ready, server_class=_ThreadingServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    token = token or secrets.token_urlsafe(24)
    work = work_dir or Path(tempfile.mkdtemp(prefix="dps_tune_dashboard_"))  # only once the port is ours
    try:
        with _sigterm_as_ctrl_c():
            server.set_app(Dashboard(experiments, token, work, server.server_port))
            url = f"http://{host if ':' not in host else f'[{host}]'}:{server.server_port}/?token={token}"
            if ready:
                ready(url)
            server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while the server runs, so ``kill``, systemd or Kubernetes stop it as
    Ctrl-C does: its report folder removed, exit status 0. Only the main thread can take a signal handler."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

"""What a person sees in the MLflow UI, checked in a real browser (`make ui-check`,
tests/test_mlflow_ui.py): headless Chromium driven over the DevTools protocol.

    python cluster/uicheck.py --store sqlite:////abs/work/mlflow.db --run-name retro-demo \\
        [--experiment ratray-retro] [--out ui-check/]
    (tooling outside the ratray package, like cluster/mlflowserver.py; needs Debian's `chromium`
    and aiohttp, which Ray already installs)

Data flow:

    MLflow store ──► `mlflow ui` on 127.0.0.1:<free port> (1 worker; or --url of a running server)
                          │  (the UI is a React SPA: nothing is in the HTML until its JS ran)
    chromium --headless --remote-debugging-port=0 ──► DevTools websocket (CDP, aiohttp)
        for each page (the run's Overview, Model metrics, Artifacts):
            Page.navigate → poll Runtime.evaluate(document.body.innerText, chart/img counts)
            until every expected string is on the page (or the timeout names what is missing)
            → Page.captureScreenshot → <out>/<page>.png
    ──► a JSON report: per page the strings found / missing, charts drawn, images loaded, screenshot

`--dump-dom` alone is not enough for this UI: with `--virtual-time-budget` the run's Overview
renders but the metric charts stay spinners (they load and draw after virtual time ran out), so
the check waits on the live page instead, up to a real-time limit.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlflowserver import healthy  # noqa: E402

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
GENAI_ONLY = ["Evaluation runs"]  # the sidebar of the UI's GenAI view: absent in the Model training one
PAGE_STATE_JS = """(() => ({
  text: document.body ? document.body.innerText : "",
  charts: document.querySelectorAll('.js-plotly-plot .main-svg, .js-plotly-plot svg').length,
  spinners: document.querySelectorAll('[role="progressbar"], .anticon-loading').length,
  images: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0)
               .map(i => ({src: i.getAttribute('src') || '', w: i.naturalWidth, h: i.naturalHeight}))
}))()"""


class UICheckError(RuntimeError):
    """The browser or the UI could not be started, or a page never showed what it must."""


def find_chromium() -> str | None:
    """The Chromium executable on PATH ($RATRAY_CHROMIUM first), or None."""
    env = os.environ.get("RATRAY_CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group `proc` leads (it was started in its own session), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class MlflowUI:
    """`mlflow ui` on a store, on 127.0.0.1 and a free port, for as long as the `with` lasts."""

    def __init__(self, store: str, python: str | None = None, port: int | None = None,
                 log: str | os.PathLike | None = None, timeout: float = 240.0):
        self.store, self.port, self.timeout = store, port or free_port(), timeout
        self.python = python or sys.executable
        self.log = Path(log or tempfile.mkstemp(prefix="ratray-mlflow-ui-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "MlflowUI":
        exe = Path(self.python).with_name("mlflow")
        cmd = [str(exe) if exe.exists() else "mlflow", "ui", "--backend-store-uri", self.store,
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.log, "w") as logf:
            self.proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        t0 = time.time()
        while not healthy(self.url):
            if self.proc.poll() is not None or time.time() - t0 > self.timeout:
                self.__exit__(None, None, None)
                raise UICheckError(f"mlflow ui did not answer /health in {self.timeout:.0f}s; log "
                                   f"{self.log}:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            _stop(self.proc)


class Page:
    """One browser tab over the DevTools protocol (a websocket of JSON commands and events)."""

    def __init__(self, ws):
        self.ws, self._id = ws, 0

    async def send(self, method: str, **params) -> dict:
        self._id += 1
        my_id = self._id
        await self.ws.send_json({"id": my_id, "method": method, "params": params})
        async for msg in self.ws:
            data = json.loads(msg.data)
            if data.get("id") == my_id:
                if "error" in data:
                    raise UICheckError(f"DevTools {method}: {data['error'].get('message')}")
                return data.get("result", {})
        raise UICheckError(f"DevTools connection closed during {method}")

    async def evaluate(self, expression: str):
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                            awaitPromise=True)
        if "exceptionDetails" in r:
            raise UICheckError(f"page script failed: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def state(self) -> dict:
        return await self.evaluate(PAGE_STATE_JS)

    async def wait_for(self, expect: list[str], charts: int = 0, images: int = 0,
                       timeout: float = 90.0, settle: float = 2.0) -> dict:
        """Poll the page until every string in `expect` is in its text, at least `charts` charts
        are drawn and `images` images loaded, and no spinner is left (then `settle` s more for the
        last paint). Returns the last state with `missing` (what never appeared) and `seconds`."""
        t0 = time.time()
        while True:
            st = await self.state()
            missing = [s for s in expect if s not in st["text"]]
            ok = not missing and st["charts"] >= charts and len(st["images"]) >= images
            if ok and st["spinners"] == 0:
                await asyncio.sleep(settle)
                st = await self.state()
                break
            if time.time() - t0 > timeout:
                break
            await asyncio.sleep(0.5)
        st["missing"] = [s for s in expect if s not in st["text"]]
        st["seconds"] = round(time.time() - t0, 1)
        return st

    async def screenshot(self, path: str | os.PathLike, full_page: bool = False) -> Path:
        params = {"format": "png"}
        if full_page:
            m = await self.send("Page.getLayoutMetrics")
            size = m.get("cssContentSize") or m["contentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        r = await self.send("Page.captureScreenshot", **params)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(r["data"]))
        return out


class Chromium:
    """Headless Chromium with its DevTools port on 127.0.0.1, a private profile, for a `with`."""

    def __init__(self, exe: str | None = None, width: int = 1400, height: int = 1000):
        self.exe = exe or find_chromium()
        if not self.exe:
            raise UICheckError("no Chromium on PATH (Debian: apt-get install -y chromium; "
                               "or set RATRAY_CHROMIUM)")
        self.width, self.height = width, height
        self.profile = Path(tempfile.mkdtemp(prefix="ratray-chromium-"))
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def __enter__(self) -> "Chromium":
        cmd = [self.exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-default-browser-check", "--remote-debugging-address=127.0.0.1",
               "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
               f"--window-size={self.width},{self.height}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        active = self.profile / "DevToolsActivePort"
        t0 = time.time()
        while not (active.is_file() and active.read_text().strip()):
            if self.proc.poll() is not None or time.time() - t0 > 60:
                self.__exit__(None, None, None)
                raise UICheckError(f"{self.exe} did not open its DevTools port in 60 s")
            time.sleep(0.2)
        self.port = int(active.read_text().split()[0])
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            _stop(self.proc, grace=5.0)
        shutil.rmtree(self.profile, ignore_errors=True)

    def version(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/version", timeout=10) as r:
            return json.loads(r.read())["Browser"]

    def new_tab(self) -> str:
        """A new tab's DevTools websocket URL."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["webSocketDebuggerUrl"]

    async def open(self, session):
        """A :class:`Page` on a new tab (page events on, the window's size as the viewport)."""
        ws = await session.ws_connect(self.new_tab(), max_msg_size=0)
        page = Page(ws)
        await page.send("Page.enable")
        await page.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                        deviceScaleFactor=1, mobile=False)
        return page


def _run_facts(store: str, experiment: str, run_name: str) -> dict:
    """What the run's pages must show, read from the store: ids, headline and bpb metric names,
    system metrics, dataset names, PNG artifacts."""
    from mlflow import MlflowClient

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ratray.mlflow_view import HEADLINE, png_artifacts
    from ratray.tracking import RUN_NAME_TAG

    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UICheckError(f"no experiment {experiment!r} in {store}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise UICheckError(f"no run {run_name!r} in experiment {experiment!r} of {store}")
    run = runs[0]
    keys = sorted(run.data.metrics)
    top = [a.path for a in client.list_artifacts(run.info.run_id)]
    return {"run_id": run.info.run_id, "experiment_id": exp.experiment_id, "run_name": run.info.run_name,
            "headline": [k for k in keys if k.startswith(HEADLINE)],
            "bpb": [k for k in keys if "bpb" in k and not k.startswith(HEADLINE)],
            "system": [k for k in keys if k.startswith("system/")],
            "datasets": [d.dataset.name for d in run.inputs.dataset_inputs],
            "plots": png_artifacts(client, run.info.run_id), "top_artifacts": top}


def _pages(base: str, f: dict) -> list[dict]:
    """The pages a person opens and what each must show (strings, charts drawn, images loaded)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ratray.mlflow_view import run_url

    url = lambda tab: run_url(base, f["experiment_id"], f["run_id"], tab)  # noqa: E731
    name = f["run_name"]
    shown = next((p for p in f["plots"] if "/" in p), f["plots"][0] if f["plots"] else None)
    return [
        # the first screen of the Model metrics tab: the headline section's charts, drawn (the UI
        # draws a chart only once it is on screen: its legend in the text means it was seen)
        {"page": "model-metrics", "url": url("model-metrics"), "charts": len(f["headline"]),
         "expect": [name, *[b for b in f["bpb"]], *[f"{name} ({k})" for k in f["headline"]]]},
        {"page": "overview", "url": url(""), "images": len(f["plots"]), "absent": GENAI_ONLY,
         "expect": [name, *f["datasets"]]},
        # the artifacts tab opened on the report's first plot (else the loss plot): previewed
        {"page": "artifacts", "url": url(f"artifacts/{shown}" if shown else "artifacts"),
         "images": 1 if shown else 0, "expect": [name, *f["top_artifacts"], *([shown] if shown else [])]},
        {"page": "system-metrics", "url": url("system-metrics"), "charts": 1 if f["system"] else 0,
         "expect": [name, *["cpu_utilization_percentage"][:len(f["system"])]]},
    ]


async def _visit(browser: Chromium, pages: list[dict], out: Path, timeout: float) -> list[dict]:
    import aiohttp

    results = []
    async with aiohttp.ClientSession() as session:
        tab = await browser.open(session)
        for p in pages:
            await tab.goto(p["url"])
            st = await tab.wait_for(p["expect"], charts=p.get("charts", 0), images=p.get("images", 0),
                                    timeout=timeout)
            shot = await tab.screenshot(out / f"{p['page']}.png")
            images = [i for i in st["images"] if "get-artifact" in i["src"] or i["src"].startswith("blob:")]
            unexpected = [s for s in p.get("absent", []) if s in st["text"]]
            ok = not st["missing"] and not unexpected and st["charts"] >= p.get("charts", 0) \
                and len(images) >= p.get("images", 0)
            results.append({"page": p["page"], "url": p["url"], "ok": ok, "missing": st["missing"],
                            "unexpected": unexpected,
                            "charts": st["charts"], "artifact_images": images, "seconds": st["seconds"],
                            "screenshot": str(shot), "text": st["text"][:4000]})
    return results


def check_run(store: str, experiment: str, run_name: str, out: str | os.PathLike,
              url: str | None = None, timeout: float = 120.0) -> dict:
    """Open the run's pages in headless Chromium (on `mlflow ui` over `store`, or the server at
    `url`) and report, per page, what was missing; screenshots in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    facts = _run_facts(url or store, experiment, run_name)
    if not facts["bpb"] and not facts["headline"]:
        raise UICheckError(f"run {run_name!r} has no bpb or headline metric to look for")
    t0 = time.time()
    with Chromium() as browser:
        if url:
            pages = asyncio.run(_visit(browser, _pages(url, facts), out, timeout))
        else:
            with MlflowUI(store, log=out / "mlflow_ui.log") as ui:
                pages = asyncio.run(_visit(browser, _pages(ui.url, facts), out, timeout))
        version = browser.version()
    report = {"ok": all(p["ok"] for p in pages), "browser": version, "facts": facts, "pages": pages,
              "seconds": round(time.time() - t0, 1)}
    (out / "uicheck.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cluster/uicheck.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="the run's tracking URI (sqlite:///... or http://...)")
    ap.add_argument("--url", default=None, help="a running MLflow UI/server to open (default: start "
                                                "`mlflow ui` on --store)")
    ap.add_argument("--experiment", default="ratray-retro")
    ap.add_argument("--run-name", required=True)
    ap.add_argument("--out", default="ui-check")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a page may take to show everything")
    args = ap.parse_args(argv)
    if not (args.store or args.url):
        ap.error("give --store (and/or --url)")
    try:
        r = check_run(args.store or args.url, args.experiment, args.run_name, args.out, args.url, args.timeout)
    except UICheckError as e:
        print(f"ratray: {e}", file=sys.stderr)
        return 2
    for p in r["pages"]:
        print(f"{'ok  ' if p['ok'] else 'FAIL'} {p['page']:15s} {p['seconds']:5.1f}s charts {p['charts']:2d} "
              f"images {len(p['artifact_images'])}  screenshot {p['screenshot']}"
              + (f"  missing {p['missing']}" if p["missing"] else "")
              + (f"  unexpected {p['unexpected']}" if p["unexpected"] else ""))
    print(f"report: {Path(args.out) / 'uicheck.json'} ({r['browser']}, {r['seconds']} s)")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The MLflow UI on a finished RETRO run, in a real browser (cluster/uicheck.py): `make ui-check`.

A real run (the session's small chunk store and index, one Ray Train worker, 6 steps, then
jobs/evaluate.py for the report's plots), `mlflow ui` on its sqlite store, headless Chromium over
DevTools on the run's pages. Minutes on 2 cores, so only with RATRAY_UI_CHECK=1 (make ui-check sets
it and installs Debian's chromium); without Chromium the check skips and says so. Screenshots go to
$RATRAY_UI_CHECK_OUT (make ui-check: ui-check/) and their paths are printed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.cluster_tools import load

uicheck = load("uicheck")
RUN = "ui-check"
SLOW = pytest.mark.timeout(1800)  # the index build, the run, its evaluation and the browser


def test_a_missing_chromium_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("RATRAY_CHROMIUM", str(tmp_path / "no-such-chromium"))
    assert uicheck.find_chromium() is None
    with pytest.raises(uicheck.UICheckError, match=r"no Chromium on PATH \(Debian: apt-get install -y chromium"):
        uicheck.Chromium()


@pytest.fixture(scope="module")
def checked(request, tmp_path_factory):
    if os.environ.get("RATRAY_UI_CHECK") != "1":
        pytest.skip("the browser check of the MLflow UI takes minutes: make ui-check (RATRAY_UI_CHECK=1)")
    if uicheck.find_chromium() is None:
        pytest.skip("no Chromium on PATH for the MLflow UI check: apt-get install -y chromium "
                    "(make ui-check installs it)")
    from jobs.evaluate import main as evaluate
    from ratray.config import load_config
    from ratray.retro.config import RetroJobConfig
    from ratray.retro.driver import run
    from tests.test_retro_train import TINY

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        wd, _, _ = request.getfixturevalue("small_workdir")  # after the skips: it builds an index
        job = load_config(RetroJobConfig, None, TINY + [f"workdir={wd}", "train.num_workers=1",
                                                        "train.steps=6", f"train.run_name={RUN}"])
        summary = run(job, progress=False)
        assert evaluate(["--workdir", str(wd), "--run-name", RUN, "--resamples", "200",
                         "--fractions", "0.5,1.0", "--sequences", "8", "--quiet"]) == 0
        out = Path(os.environ.get("RATRAY_UI_CHECK_OUT") or tmp_path_factory.mktemp("ui-check"))
        report = uicheck.check_run(summary["mlflow"]["tracking_uri"], "ratray-retro", RUN, out)
    print("\n" + "\n".join(f"MLflow UI check: {p['page']} {'ok' if p['ok'] else 'FAIL'} "
                           f"screenshot {p['screenshot']}" for p in report["pages"]))
    return {p["page"]: p for p in report["pages"]}, report


@SLOW
def test_the_run_page_opens_on_the_loss_and_bpb_charts(checked):
    pages, report = checked
    mm = pages["model-metrics"]
    assert mm["ok"], mm["missing"]
    assert {"val_bpb_retro_on", "val_bpb_retro_off"} <= set(report["facts"]["bpb"])
    text = mm["text"]
    for key in ("headline/loss", "headline/val_bpb_retro_on", "headline/val_bpb_retro_off"):
        assert f"{RUN} ({key})" in text  # the chart is drawn: it is on the first screen
    assert text.index("headline") < text.index("lr")  # the headline section above the others


@SLOW
def test_the_overview_shows_the_dataset_and_every_plot_as_an_image(checked):
    pages, report = checked
    ov = pages["overview"]
    assert ov["ok"], (ov["missing"], ov["unexpected"])
    plots = report["facts"]["plots"]
    assert "loss.png" in plots and {"eval/bpb_by_overlap.png", "eval/bpb_vs_params.png"} <= set(plots)
    loaded = {i["src"] for i in ov["artifact_images"] if i["w"] > 100 and i["h"] > 100}
    for p in plots:
        assert any(f"path={p.replace('/', '%2F')}&" in src for src in loaded), p
    assert report["facts"]["datasets"] == ["stdlib/bpe-32"] and "stdlib/bpe-32" in ov["text"]


@SLOW
def test_the_artifacts_and_system_metrics_pages_show_what_was_logged(checked):
    pages, report = checked
    art = pages["artifacts"]
    assert art["ok"] and art["url"].split("?")[0].endswith("/artifacts/eval/bpb_by_overlap.png")
    assert any(i["w"] > 100 for i in art["artifact_images"])  # the report's plot, previewed
    assert pages["system-metrics"]["ok"] and pages["system-metrics"]["charts"] >= 1


@SLOW
def test_every_page_leaves_a_screenshot(checked):
    pages, _ = checked
    for p in pages.values():
        data = Path(p["screenshot"]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, p["page"]
    assert json.loads((Path(pages["overview"]["screenshot"]).parent / "uicheck.json").read_text())["ok"]

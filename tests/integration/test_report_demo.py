"""`raydpo report` over the store `raydpo demo --quick` wrote (the shared `demo_run` fixture)."""

from __future__ import annotations

import argparse
import base64
import re

import pytest

from raydpo import report, tracking

pytestmark = [pytest.mark.integration]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(900)
def test_report_over_demo_store_compares_sft_and_dpo(demo_run, tmp_path, capsys):
    demo_run.check()
    parser = argparse.ArgumentParser(prog="raydpo")
    report.add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "demo.html"
    args = parser.parse_args(["report", "--experiment", "raydpo-demo", "--tracking-uri", demo_run.tracking_uri,
                              "--out", str(out)])
    assert args.fn(args) == 0, capsys.readouterr().err
    page = out.read_text(encoding="utf-8")

    client = tracking._client(demo_run.tracking_uri)
    exp_id = client.get_experiment_by_name("raydpo-demo").experiment_id
    runs = {r.data.tags[tracking.STAGE_TAG]: r for r in client.search_runs([exp_id])}
    assert set(runs) == {"sft", "dpo"}
    for stage, r in runs.items():
        row = re.search(rf'<tr id="run-{r.info.run_id}"[^>]*>(.*?)</tr>', page, re.S)
        assert row, f"{stage} run missing from the runs table"
        assert f"<td>{r.info.run_name}</td><td>{stage}</td>" in row.group(1)
        assert "FINISHED" in row.group(1)

    images = dict((alt, base64.b64decode(data)) for data, alt in
                  re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)"', page))
    for key in ("eval/rewards/margins", "eval/rewards/accuracies", "train/rewards/margins", "train/loss"):
        assert key in images and images[key].startswith(PNG_MAGIC), sorted(images)
    assert "<h2>Eval generations</h2>" in page  # the DPO run's latest table
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, re.I)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs), refs  # nothing external

"""The analysis report folder: results.json, CSV tables, report.md with markdown tables and figures."""

import json

import torch

from fusion.analysis.report import Report, heatmap, markdown_table


def test_report_writes_results_csv_and_markdown(tmp_path):
    report = Report(tmp_path, "Title")
    report.results["a"] = 1
    report.text("Some text.")
    report.table("t", ["name", "value"], [["x", 0.5]])
    report.write()
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
    assert (tmp_path / "t.csv").read_text() == "name,value\nx,0.5\n"
    assert (tmp_path / "report.md").read_text() == "# Title\n\nSome text.\n\n" + markdown_table(
        ["name", "value"], [["x", 0.5]]) + "\n"


def test_figure_is_saved_embedded_and_heatmap_is_labelled(tmp_path):
    fig = heatmap(torch.tensor([[0.1, 0.9], [0.5, 0.5]]), ["layer 0", "layer 1"], ["clip", "dino"],
                  title="Mass", xlabel="encoder", ylabel="layer", colorbar="share")
    ax = fig.axes[0]
    assert ax.get_title() == "Mass" and ax.get_xlabel() == "encoder" and ax.get_ylabel() == "layer"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["clip", "dino"]
    assert len(fig.axes) == 2  # the colour bar
    report = Report(tmp_path, "Title")
    path = report.figure("mass", fig, "Attention mass")
    report.write()
    assert path == tmp_path / "mass.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Attention mass](mass.png)" in (tmp_path / "report.md").read_text()

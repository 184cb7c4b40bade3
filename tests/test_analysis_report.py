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


def _refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


def test_heatmap_data_is_in_results_json_and_undefined_cells_are_null_empty_and_masked(tmp_path):
    nan = float("nan")
    report = Report(tmp_path, "Title")
    values = torch.tensor([[0.25, nan], [1.5, 0.0]])
    fig = report.heatmap("one", values, ["r0", "r1"], ["c0", "c1"], "One", title="t", xlabel="x", ylabel="y",
                         colorbar="v")
    panels = {"a": torch.tensor([[0.5, 0.25]]), "b": torch.tensor([[nan, 1.0]])}
    many = report.heatmaps("many", panels, ["layer 0"], ["c0", "c1"], "Many", title="t", xlabel="x", ylabel="y",
                           colorbar="v")
    report.results["score"] = nan
    report.table("t", ["name", "value"], [["x", nan], ["y", None], ["z", 0.5]])
    report.write()
    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=_refuse)
    assert results["score"] is None
    assert results["figures"]["one"] == {"rows": ["r0", "r1"], "columns": ["c0", "c1"],
                                         "values": [[0.25, None], [1.5, 0.0]]}
    assert results["figures"]["many"]["panels"] == {"a": [[0.5, 0.25]], "b": [[None, 1.0]]}
    # What each figure plots is the matrix results.json holds; an undefined cell is masked, not drawn as 0.
    plotted = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(plotted) == 1 and plotted[0].mask.tolist() == [[False, True], [False, False]]
    assert plotted[0].filled(-1).tolist() == [[0.25, -1], [1.5, 0.0]]
    plotted = {ax.get_title(): ax.images[0].get_array() for ax in many.axes if ax.images}
    assert {k: v.filled(-1).tolist() for k, v in plotted.items()} == {"a": [[0.5, 0.25]], "b": [[-1, 1.0]]}
    assert plotted["a"].mask.tolist() == [[False, False]]
    # One colour scale for every panel.
    assert {ax.images[0].get_clim() for ax in many.axes if ax.images} == {(0.0, 1.0)}
    assert (tmp_path / "t.csv").read_text() == "name,value\nx,\ny,\nz,0.5\n"
    assert "| x |  |" in (tmp_path / "report.md").read_text()

"""eval.py mode=attention on a tiny trained checkpoint: masses over a whole split, ranked heads, split by type."""


import pytest
import torch
from analysis_helpers import ENCODERS, check_wandb, run_mode, tiny_checkpoint

from fusion.analysis.attention import largest_parts, rank_heads

GROUPS = [*ENCODERS, "text", "cls"]


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    ckpt, workdir = tiny_checkpoint(tmp_path_factory)
    # With a wandb logger too: the tables and figures go there as well (offline run in the run folder).
    results = run_mode("attention", ckpt, workdir, "logger=wandb")
    return results, workdir / "eval_attention"


def test_masses_are_in_unit_range_and_sum_to_one(attention):
    results, _ = attention
    assert results["groups"] == GROUPS and results["num_layers"] == 2 and results["num_heads"] == 2
    assert results["tokens_per_image"] == {"clip_tiny": 17, "dino_tiny": 37}
    parts = [results] + list(results["by"].values())
    for part in parts:
        for query in ("cls", "text"):
            mass = torch.tensor(part[query])  # (L, H, G)
            assert mass.shape == (2, 2, len(GROUPS))
            assert bool(((mass >= 0) & (mass <= 1)).all())
            assert torch.allclose(mass.sum(-1), torch.ones(2, 2), atol=1e-5)


def test_split_by_answer_type_covers_every_example(attention):
    results, _ = attention
    assert results["split_by"] == "answer_type"
    assert set(results["by"]) == {"color", "shape", "count", "position"}
    assert sum(p["n"] for p in results["by"].values()) == results["metrics"]["n"] == 300
    # The split's overall [CLS] mass is the example-weighted mean of the per-type masses.
    overall = torch.tensor(results["cls"])
    weighted = sum(torch.tensor(p["cls"]) * p["n"] for p in results["by"].values()) / 300
    assert torch.allclose(overall, weighted, atol=1e-5)


def test_heads_are_ranked_by_the_text_queries_image_mass(attention):
    results, _ = attention
    heads = results["heads"]
    assert len(heads) == 4 and [h["rank"] for h in heads] == [1, 2, 3, 4]
    image = [h["text_to_image"] for h in heads]
    assert image == sorted(image, reverse=True)
    text = torch.tensor(results["text"])
    top = heads[0]
    assert top["text_to_image"] == pytest.approx(float(text[top["layer"], top["head"], :2].sum()), abs=1e-6)
    for h in heads:
        assert h["text_to_image"] + h["text_to_text"] + h["text_to_cls"] == pytest.approx(1, abs=1e-5)


def test_report_files_and_wandb(attention):
    _, run_dir = attention
    folder = run_dir / "attention"
    report = (folder / "report.md").read_text()
    for name in ("cls_layers", "text_heads", "heads_ranked", "cls_by_answer_type", "text_by_answer_type_layers"):
        assert (folder / f"{name}.png").stat().st_size > 5_000 and f"]({name}.png)" in report
    assert (folder / "heads.csv").read_text().count("\n") == 1 + 4
    summary = check_wandb(run_dir, "attention")
    assert summary["analysis/attention/table/heads"]["nrows"] == 4


def test_every_heatmap_is_the_json_statistics(attention):
    results, _ = attention
    figures = results["figures"]
    types = ["color", "count", "position", "shape"]
    for query in ("cls", "text"):
        mass = torch.tensor(results[query])  # (L, H, G)
        assert torch.tensor(figures[f"{query}_layers"]["values"]).allclose(mass.mean(1))
        assert torch.tensor(figures[f"{query}_heads"]["values"]).allclose(mass.flatten(0, 1))
        by_type = figures[f"{query}_by_answer_type"]
        assert by_type["rows"] == types and by_type["columns"] == GROUPS
        for row, name in zip(by_type["values"], types, strict=True):
            assert torch.tensor(row).allclose(torch.tensor(results["by"][name][query]).mean((0, 1)))
        # Per layer: one panel (layers x groups) per answer type, the type's masses averaged over heads.
        layers = figures[f"{query}_by_answer_type_layers"]
        assert layers["rows"] == ["layer 0", "layer 1"] and layers["columns"] == GROUPS
        assert list(layers["panels"]) == types
        for name, values in layers["panels"].items():
            assert torch.tensor(values).allclose(torch.tensor(results["by"][name][query]).mean(1))
    assert set(figures) == {f"{q}_{f}" for q in ("cls", "text")
                            for f in ("layers", "heads", "by_answer_type", "by_answer_type_layers")}


def test_largest_parts_keeps_the_most_frequent_values_in_order():
    by = {"a": {"n": 1}, "b": {"n": 5}, "c": {"n": 3}, "d": {"n": 4}}
    assert largest_parts(by, 2) == ["b", "d"] and largest_parts(by, 9) == ["a", "b", "c", "d"]


def test_rank_heads_counts_fused_tokens_as_image():
    stats = torch.zeros(2, 1, 2, 5)  # groups: a, b, fused, text, cls
    stats[:, 0, 0] = torch.tensor([0.1, 0.1, 0.5, 0.2, 0.1])
    stats[:, 0, 1] = torch.tensor([0.0, 0.0, 0.1, 0.8, 0.1])
    heads = rank_heads(stats, ["a", "b", "fused", "text", "cls"], ["a", "b"])
    assert (heads[0]["head"], heads[0]["text_to_image"]) == (0, pytest.approx(0.7))
    assert heads[1]["text_to_text"] == pytest.approx(0.8)



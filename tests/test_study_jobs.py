"""fusion.study.jobs: jobs found by their resolved configs and grouped by task and varying settings."""

import json

import pytest
import yaml

from fusion.study.jobs import collect, group_jobs, retrained_reference


def job(folder, subset, seed, acc, ve_dropout=0.0, task=None, fuser="fusion.fusers.TokenConcatFuser"):
    folder.mkdir(parents=True)
    config = {"encoder": {n: {"name": n} for n in subset}, "seed": seed,
              "task": task or {"_target_": "fusion.tasks.shapes.ShapesTask"},
              "training": {"ve_dropout": ve_dropout, "head": {"_target_": "fusion.model.heads.ClassifierHead"}},
              "fusion": {"fuser": {"_target_": fuser}}}
    (folder / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps({"test/acc": acc}))


def test_jobs_are_described_by_their_config_and_grouped_by_what_varies(tmp_path):
    job(tmp_path / "0", ["b"], 0, 0.5)
    job(tmp_path / "1", ["a", "b"], 0, 0.6, ve_dropout=0.5)
    job(tmp_path / "2", ["a"], 1, 0.4, ve_dropout=0.5)
    job(tmp_path / "nested" / "3", ["a"], 0, 0.7, task={"name": "vqav2", "_target_": "fusion.tasks.vqa.VQATask"})
    (tmp_path / "1" / "leaning").mkdir()  # the study's own analysis folders are no jobs
    (tmp_path / "1" / "leaning" / "metrics.json").write_text("{}")
    rows = collect(tmp_path)
    assert [(r["group"], r["subset"], r["seed"], r["job"]) for r in rows] == [
        ("shapes_ve_dropout=0.0", "b", 0, "0"),
        ("shapes_ve_dropout=0.5", "a", 1, "2"),
        ("shapes_ve_dropout=0.5", "a+b", 0, "1"),
        ("vqav2", "a", 0, "nested/3"),  # one job of its task: nothing varies, the task names the group
    ]
    assert rows[0]["fusion"] == "TokenConcatFuser" and rows[0]["head"] == "ClassifierHead"
    assert rows[0]["task"] == "shapes" and rows[2]["size"] == 2
    assert list(group_jobs(rows)) == ["shapes_ve_dropout=0.0", "shapes_ve_dropout=0.5", "vqav2"]


def test_bad_jobs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect(tmp_path / "nope")
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "metrics.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"'.*0' has metrics.json but no config_resolved.yaml"):
        collect(tmp_path)
    (tmp_path / "0" / "config_resolved.yaml").write_text("encoder: {}\n")
    with pytest.raises(ValueError, match="no encoder"):
        collect(tmp_path)
    (tmp_path / "0" / "metrics.json").write_text("[1]")
    with pytest.raises(ValueError, match="one object of metrics"):
        collect(tmp_path)


def test_a_group_with_only_the_all_encoder_model_borrows_the_retrained_subsets_of_its_fullest_group(tmp_path):
    # Every subset at VE-dropout 0.1, the all-encoder model alone at 0 and 0.3 (the study of docs/results).
    for seed in (0, 1):
        for subset, acc in ((["a"], 0.5), (["b"], 0.6), (["a", "b"], 0.7)):
            job(tmp_path / f"{'+'.join(subset)}-{seed}", subset, seed, acc, ve_dropout=0.1)
        for p in (0.0, 0.3):
            job(tmp_path / f"ve{p}-{seed}", ["a", "b"], seed, 0.65 + p, ve_dropout=p)
    job(tmp_path / "other-fuser", ["a"], 0, 0.9, ve_dropout=0.3, fuser="fusion.fusers.GatedFuser")
    groups = group_jobs(collect(tmp_path))
    default = "shapes_ve_dropout=0.1_fusion=TokenConcatFuser"
    rows, reference = retrained_reference(groups, "shapes_ve_dropout=0.3_fusion=TokenConcatFuser")
    assert reference == default
    # Its own all-encoder jobs (acc 0.95), then the reference's singles; never the reference's a+b.
    assert sorted((r["subset"], r["seed"], r["test/acc"]) for r in rows) == [
        ("a", 0, 0.5), ("a", 1, 0.5), ("a+b", 0, 0.95), ("a+b", 1, 0.95), ("b", 0, 0.6), ("b", 1, 0.6)]
    # The fullest group borrows nothing; a group of another fuser has no reference of its own kind.
    assert retrained_reference(groups, default) == (groups[default], None)
    gated = "shapes_ve_dropout=0.3_fusion=GatedFuser"
    assert retrained_reference(groups, gated) == (groups[gated], None)

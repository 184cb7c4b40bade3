"""fusion.study.report (through write_study without the analyses): study.md's subsets x tasks table, one folder
per group, summary.json, the agreement rows."""

import json

from test_study_jobs import job

from fusion.study import write_study
from fusion.study.report import agreement_rows


def test_two_groups_get_a_folder_each_and_one_paper_table(tmp_path):
    for i, (subset, seed, acc) in enumerate([(["a"], 0, 0.5), (["a"], 1, 0.7), (["a", "b"], 0, 0.6)]):
        job(tmp_path / str(i), subset, seed, acc)
        job(tmp_path / f"v{i}", subset, seed, acc - 0.1, task={"name": "vqav2"})
    top = write_study(tmp_path, leaning=False)
    assert top["folders"] == {"shapes": "shapes", "vqav2": "vqav2"} and "best_single" not in top
    for g in ("shapes", "vqav2"):
        assert (tmp_path / g / "subsets.png").is_file() and (tmp_path / g / "jobs.csv").is_file()
        assert json.loads((tmp_path / g / "summary.json").read_text())["group"] == g
    md = (tmp_path / "study.md").read_text().splitlines()
    # a: mean 0.6, sample std of (0.5, 0.7) = 0.141; one seed: no std.
    assert md[4:8] == ["| subset | shapes | vqav2 |", "|---|---|---|",
                       "| a | 0.600 ± 0.141 (n=2) | 0.500 ± 0.141 (n=2) |", "| a+b | 0.600 (n=1) | 0.500 (n=1) |"]
    assert top["groups"]["shapes"]["best_fused"]["subset"] == "a+b"


def test_agreement_rows_name_undefined_and_skipped():
    undefined = {"n": 2, "kendall_tau": None, "spearman_rho": None, "top1_retrained": ["a", "b"],
                 "top1_masked": ["a"], "top1_agree": True}
    columns, rows = agreement_rows({"t": {"per_seed": {"0": undefined}, "pooled": undefined},
                                    "u": {"skipped": "why"}})
    assert columns[:5] == ["group", "seed", "n subsets", "kendall_tau", "spearman_rho"]
    assert rows == [["t", "0", 2, None, None, "a, b", "a", True], ["t", "pooled (means)", 2, None, None, "a, b", "a",
                                                                  True], ["u", "", 0, None, None, "", "", "why"]]


def test_the_gains_line_pairs_by_seed_and_names_a_group_without_singles(tmp_path):
    # VE-dropout 0.1: every subset; 0.3: the all-encoder model alone (the study of docs/results).
    for seed, (a, b, ab) in enumerate([(0.5, 0.4, 0.6), (0.7, 0.5, 0.8)]):
        for subset, acc in ((["a"], a), (["b"], b), (["a", "b"], ab)):
            job(tmp_path / f"{'+'.join(subset)}-{seed}", subset, seed, acc, ve_dropout=0.1)
        job(tmp_path / f"ve-{seed}", ["a", "b"], seed, ab + 0.05, ve_dropout=0.3)
    write_study(tmp_path, leaning=False)
    md = (tmp_path / "study.md").read_text()
    # Best single a (0.6); a+b - a per seed: +0.1, +0.1 (std 0); seed noise: pooled std of every subset.
    assert ("Best single `a`, best fused `a+b`: gain paired by seed +0.100 ± 0.000 (2 of 2 seeds); all `a+b`: "
            "+0.100 ± 0.000 (2 of 2 seeds); seed noise (pooled std)") in md
    # a+b at 0.3: 0.65, 0.85: mean 0.750, sample std 0.141.
    assert "No single-encoder job in this group, so no gain over one: `a+b` 0.750 ± 0.141;" in md
    assert "gain paired by seed  (None)" not in md

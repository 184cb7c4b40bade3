"""fusion.study.leaning: which encoder the fused model leans on per answer type, from hand-made analyses."""

import math

import pytest

from fusion.study.leaning import leaning


def _analysed(job, seed, cls, acc_without):
    """One job's analyses as analyse_job returns them: encoders a, b; 1 layer x 2 heads.

    ``cls``: {type: (mass a, mass b)} (the two heads differ by +-0.1, so their mean is the value);
    ``acc_without``: {subset without one encoder: {type: acc}}; the full model has acc 0.9 on every type.
    """
    def heads(a, b):
        return [[[a + 0.1, b, 0.8 - a - b, 0.1], [a - 0.1, b, 1.0 - a - b, 0.1]]]

    by = {t: {"n": 5, "cls": heads(*m), "text": heads(0.3, 0.3)} for t, m in cls.items()}
    attention = {"encoders": ["a", "b"], "groups": ["a", "b", "text", "cls"], "split": "test",
                 "split_by": "answer_type", "metrics": {"n": 10.0}, "by": by, "cls": heads(0.3, 0.3),
                 "text": heads(0.3, 0.3), "tokens_per_image": {"a": 17, "b": 17}}
    full = {"acc": 0.9, "acc_color": 0.9, "acc_shape": 0.9}
    subsets = {"a+b": full, **{name: {"acc": 0.9, **{f"acc_{t}": v for t, v in accs.items()}}
                               for name, accs in acc_without.items()}}
    return {"job": job, "seed": seed, "checkpoint": "checkpoints/epoch_000.ckpt", "checkpoint_kind": "best",
            "attention": attention, "encoder_ablation": {"metric": "acc", "subsets": subsets}}


def test_leaning_aggregates_attention_and_dropout_per_answer_type_over_seeds():
    jobs = [
        _analysed("6", 0, {"color": (0.5, 0.2), "shape": (0.1, 0.6)}, {"b": {"color": 0.5, "shape": 0.9},
                                                                        "a": {"color": 0.9, "shape": 0.3}}),
        _analysed("s1_0", 1, {"color": (0.3, 0.2), "shape": (0.1, 0.4)}, {"b": {"color": 0.7, "shape": 0.9},
                                                                          "a": {"color": 0.9}}),
    ]
    result = leaning(jobs)
    assert result["answer_types"] == ["color", "shape"] and result["seeds"] == [0, 1]
    assert result["split"] == "test" and result["metric"] == "acc" and result["subset"] == "a+b"
    color, shape, everything = result["by_type"]["color"], result["by_type"]["shape"], result["by_type"]["all"]
    assert color["n"] == 5 and everything["n"] == 10
    cls_a = color["encoders"]["a"]["attention_cls"]
    assert cls_a["mean"] == pytest.approx(0.4) and cls_a["std"] == pytest.approx(math.sqrt(0.02))
    assert cls_a["per_seed"] == pytest.approx({"0": 0.5, "1": 0.3})
    assert shape["encoders"]["b"]["attention_cls"]["mean"] == pytest.approx(0.5)
    assert color["leans_on"]["attention_cls"] == "a" and shape["leans_on"]["attention_cls"] == "b"
    # Drop when removed: full (0.9) minus the model without the encoder, paired within the job.
    assert color["encoders"]["a"]["drop_when_removed"]["per_seed"] == pytest.approx({"0": 0.4, "1": 0.2})
    assert color["encoders"]["b"]["drop_when_removed"]["mean"] == pytest.approx(0.0)
    # Seed 1's model without b has no shape accuracy (no such example): only seed 0 counts.
    drop_b = shape["encoders"]["b"]["drop_when_removed"]
    assert drop_b["per_seed"] == pytest.approx({"0": 0.6}) and drop_b["n"] == 1 and drop_b["std"] is None
    assert color["leans_on"]["drop_when_removed"] == "a" and shape["leans_on"]["drop_when_removed"] == "b"
    assert everything["leans_on"]["drop_when_removed"] == "tie"  # no drop at all

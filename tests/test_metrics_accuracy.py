import torch

from fusion.metrics.accuracy import AccuracyByType


def test_accuracy_overall_and_per_type():
    metric = AccuracyByType(["color", "shape", "count"])
    metric.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 1, 1]))
    metric.update(torch.tensor([5]), torch.tensor([5]), torch.tensor([1]))
    out = metric.compute()
    assert abs(out[""].item() - 3 / 5) < 1e-6
    assert out["color"].item() == 1.0
    assert abs(out["shape"].item() - 1 / 3) < 1e-6
    assert "count" not in out  # no example of that type: not reported as 0


def test_reset_starts_over():
    metric = AccuracyByType(["a"])
    metric.update(torch.tensor([1]), torch.tensor([0]), torch.tensor([0]))
    metric.reset()
    metric.update(torch.tensor([1]), torch.tensor([1]), torch.tensor([0]))
    assert metric.compute()[""].item() == 1.0

"""fusion.data.samplers: a training order that is a function of (seed, epoch), and where a loader stands."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from fusion.data.samplers import ResumableSampler, data_position


@pytest.fixture
def data() -> TensorDataset:
    return TensorDataset(torch.arange(20))


def test_order_is_a_permutation_set_by_seed_and_epoch_only(data) -> None:
    torch.manual_seed(0)
    a = list(ResumableSampler(data, seed=3, epoch=1))
    torch.manual_seed(1)
    assert list(ResumableSampler(data, seed=3, epoch=1)) == a  # the global RNG plays no part
    assert sorted(a) == list(range(20))
    assert a != list(ResumableSampler(data, seed=3, epoch=2))
    assert a != list(ResumableSampler(data, seed=4, epoch=1))


def test_set_epoch_gives_that_epochs_order(data) -> None:
    sampler = ResumableSampler(data, seed=3, epoch=0)
    sampler.set_epoch(2)
    assert list(sampler) == list(ResumableSampler(data, seed=3, epoch=2))


def test_skip_applies_to_the_first_pass_only(data) -> None:
    full = list(ResumableSampler(data, seed=3, epoch=1))
    partway = ResumableSampler(data, seed=3, epoch=1, skip=8)
    assert len(partway) == 20  # the length stays the epoch's, as DistributedSampler reports it
    assert list(partway) == full[8:]
    assert list(partway) == full


def test_skip_past_the_end_yields_nothing_once(data) -> None:
    sampler = ResumableSampler(data, seed=0, skip=25)
    assert list(sampler) == []
    assert sorted(sampler) == list(range(20))


def test_without_shuffle_the_order_is_the_dataset_order(data) -> None:
    assert list(ResumableSampler(data, seed=5, epoch=3, skip=4, shuffle=False)) == list(range(4, 20))


@pytest.mark.parametrize("kwargs", [{"skip": -1}, {"epoch": -1}])
def test_negative_skip_or_epoch_is_refused(data, kwargs) -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        ResumableSampler(data, **kwargs)


def _trainer(*, training: bool, processed: int = 0, epoch: int = 0, batches: int = 10) -> SimpleNamespace:
    """The attributes of a ``pl.Trainer`` that :func:`data_position` reads."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    return SimpleNamespace(training=training, fit_loop=loop, current_epoch=epoch, num_training_batches=batches)


def test_data_position_without_a_training_trainer_is_empty() -> None:
    assert data_position(None) == {}
    assert data_position(_trainer(training=False, processed=4)) == {}


def test_data_position_mid_epoch_and_at_its_end() -> None:
    assert data_position(_trainer(training=True, processed=4, epoch=2)) == {"epoch": 2, "batches": 4}
    # A checkpoint at the end of an epoch points at the start of the next one.
    assert data_position(_trainer(training=True, processed=10, epoch=2)) == {"epoch": 3, "batches": 0}

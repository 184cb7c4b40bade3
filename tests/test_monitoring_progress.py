"""Training progress in batch logs: LogProgress's lines, and the bar chosen by whether stdout is a terminal.

A real train.py run with stdout redirected to a file is checked in tests/test_run_commands.py
(test_train_then_eval_end_to_end); here a tiny model trains in-process with a real Trainer.
"""

import logging
import re

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar
from torch.utils.data import DataLoader, TensorDataset

from fusion.monitoring.progress import LogProgress, progress_bar


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(callback: LogProgress, caplog: pytest.LogCaptureFixture, epochs: int = 2) -> list[str]:
    """Two epochs of 5 steps (batches of 4); the progress lines logged."""
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(20, 4), torch.randn(20, 1)), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[callback])
    with caplog.at_level(logging.INFO, logger="fusion.monitoring.progress"):
        trainer.fit(Regression(), data)
    return [r.getMessage() for r in caplog.records if r.name == "fusion.monitoring.progress"]


LINE = re.compile(
    r"train step (\d+)/10 \(\d+%\) \| epoch (\d)/2 batch (\d)/5 \| train/loss [\d.e+-]+ \| [\d.]+ samples/s \| "
    r"elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d"
)


def test_a_line_every_n_steps_with_step_epoch_loss_rate_and_eta(caplog):
    lines = _fit(LogProgress(every_n_steps=3, every_seconds=0), caplog)
    steps = [LINE.fullmatch(line) for line in lines if line.startswith("train step")]
    assert all(steps), lines
    assert [(int(m[1]), int(m[2]), int(m[3])) for m in steps] == [(3, 1, 3), (6, 2, 1), (9, 2, 4)]
    assert lines[0] == "training from step 0 of 10: a progress line every 3 steps"
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2 and re.match(r"epoch 2/2 done at step 10 in \d+:\d\d:\d\d \| train/loss [\d.]+$",
                                         epochs[1]), epochs


def test_a_line_every_t_seconds(caplog):
    # A moment's interval is due after every step; an hour's never within this run.
    every_step = _fit(LogProgress(every_n_steps=0, every_seconds=1e-9), caplog, epochs=1)
    assert sum(line.startswith("train step") for line in every_step) == 5
    caplog.clear()
    hourly = _fit(LogProgress(every_n_steps=0, every_seconds=3600), caplog, epochs=1)
    assert not any(line.startswith("train step") for line in hourly)
    assert hourly[0] == "training from step 0 of 5: a progress line every 3600 s"
    assert any(line.startswith("epoch 1/1 done at step 5") for line in hourly)


def test_the_rich_bar_on_a_terminal_log_lines_elsewhere():
    assert isinstance(progress_bar(terminal=True), RichProgressBar)
    bar = progress_bar(every_n_steps=7, every_seconds=30, terminal=False)
    assert isinstance(bar, LogProgress) and (bar.every_n_steps, bar.every_seconds) == (7, 30.0)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"every_n_steps": 2.5}, r"callbacks.progress.every_n_steps=2.5: expected a whole number >= 0"),
        ({"every_n_steps": -1}, r"callbacks.progress.every_n_steps=-1: expected a number >= 0"),
        ({"every_seconds": "soon"}, r"callbacks.progress.every_seconds='soon': expected a number >= 0"),
    ],
)
def test_bad_intervals_are_named(kwargs, says):
    with pytest.raises(ValueError, match=says):
        LogProgress(**kwargs)

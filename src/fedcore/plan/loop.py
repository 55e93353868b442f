"""LocalLoop: the epochs x batches of one round of local training, counted once.

The neural-network backends (torch, Keras, JAX) keep only their per-batch step; the loop
owns the epochs, the ``num_updates`` stop, progress reports and the step count that
SCAFFOLD's :class:`~fedcore.plan.LocalSteps` needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, SupportsFloat, TypeVar

from fedcore.plan.training import LocalTraining

__all__ = ["REPORT_EVERY_S", "LocalLoop", "LocalSteps"]

#: How often a plan's default :meth:`~fedcore.plan.TrainingPlan.report` is called at most
#: (seconds): it only forwards to the node, which sends one progress message a second.
REPORT_EVERY_S = 0.1

_Batch = TypeVar("_Batch")


@dataclass(frozen=True)
class LocalSteps:
    """What one round of local training did, as SCAFFOLD's control-variate update needs it.

    ``count`` is the number of optimizer steps (K); ``lr`` maps the name of each parameter
    the optimizer trained to the mean learning rate of those steps, so ``count * lr[name]``
    is the sum of the step sizes. Parameters absent from ``lr`` (buffers, frozen weights)
    were not trained by gradient.
    """

    count: int
    lr: Mapping[str, float]


class LocalLoop:
    """Counts one round of local training; a backend runs one step per batch it yields.

    ::

        loop = self.local_loop(batches_per_epoch=math.ceil(n / batch_size))
        for epoch in loop.epochs():
            for X, y in loop.batches(self._batches(data, batch_size, rng)):
                loss = step(X, y)
                loop.step(len(y), loss=loss.detach())
        self.local_steps = loop.local_steps(lr_by_parameter)
        return loop.stats(loop.mean_loss)

    The loop stops after ``training.num_updates`` steps without drawing another batch,
    so the batches (and the random numbers behind them) are those of a plain nested
    ``for`` loop with a ``break``. ``report`` (the plan's :meth:`~TrainingPlan.report`,
    or ``None`` for no progress) is called after a step at most every ``report_every_s``
    seconds (``0``: after every step), and by :meth:`stats` for the last step if the
    interval held it back, so the last report is always the round's last step.

    A step's ``loss`` may be anything ``float()`` reads, such as a 0-d tensor on the
    device: it is read only when a report or :attr:`mean_loss` needs it, so a backend
    need not wait for the device at every step.
    """

    def __init__(self, training: LocalTraining, *, report: Callable[..., None] | None = None,
                 batches_per_epoch: int | None = None, report_every_s: float = 0.0):
        self.training = training
        self._report = report
        planned = (training.epochs * batches_per_epoch if batches_per_epoch is not None
                   else None)
        if planned is not None and training.num_updates is not None:
            planned = min(planned, training.num_updates)
        #: The steps the round will take, when known (for the progress fraction).
        self.planned = planned
        #: Optimizer steps taken so far.
        self.steps = 0
        #: Samples seen so far (over every epoch).
        self.samples = 0
        #: The current epoch, from 1.
        self.epoch = 0
        self._loss_total = 0.0
        self._loss_count = 0
        self._unread: list[tuple[SupportsFloat, int]] = []  # losses not read yet, in order
        self._every = report_every_s
        self._next_report = time.monotonic() + report_every_s if report_every_s else 0.0
        self._reported = 0  # the step of the last report
        self._last_loss = False  # whether the last step came with a loss

    @property
    def done(self) -> bool:
        """Whether ``num_updates`` steps were taken."""
        limit = self.training.num_updates
        return limit is not None and self.steps >= limit

    def epochs(self) -> Iterator[int]:
        """The epochs to run (from 0), stopping early once :attr:`done`."""
        for epoch in range(self.training.epochs):
            if self.done:
                return
            self.epoch = epoch + 1
            yield epoch

    def batches(self, batches: Iterable[_Batch]) -> Iterator[_Batch]:
        """One epoch's ``batches``; after each, the caller calls :meth:`step`."""
        for batch in batches:
            yield batch
            if self.done:  # no further batch is drawn
                return

    def step(self, samples: int, loss: SupportsFloat | None = None) -> None:
        """Record one optimizer step on ``samples`` samples, and report progress when due.

        ``loss`` is the batch's mean loss, when the backend has it at every step (the
        progress then carries the running mean); it is read (``float``) only when needed.
        Backends that sum the loss on the device themselves pass ``None``.
        """
        self.steps += 1
        self.samples += samples
        self._last_loss = loss is not None
        if loss is not None:
            self._unread.append((loss, samples))
        if self._report is not None and (
                not self._every or time.monotonic() >= self._next_report):
            self._send_report()

    def _send_report(self) -> None:
        assert self._report is not None
        if self._every:
            self._next_report = time.monotonic() + self._every
        self._reported = self.steps
        self._report(step=self.steps, epoch=self.epoch, samples=self.samples,
                     loss=self.mean_loss if self._last_loss else None,
                     fraction=self.steps / self.planned if self.planned else None)

    @property
    def mean_loss(self) -> float:
        """The mean of the losses given to :meth:`step`, weighted by samples (0 if none)."""
        for loss, samples in self._unread:  # in order: the same sum as read at every step
            self._loss_total += float(loss) * samples
            self._loss_count += samples
        self._unread.clear()
        return self._loss_total / max(self._loss_count, 1)

    def local_steps(self, lr: Mapping[str, float]) -> LocalSteps:
        """SCAFFOLD's record of the round: the steps taken and each parameter's mean lr."""
        return LocalSteps(count=self.steps, lr=dict(lr))

    def stats(self, loss: float) -> dict[str, Any]:
        """The training statistics every backend returns: loss, steps, epochs asked for.

        Reports the last step first, if the reporting interval held it back.
        """
        if self._report is not None and self._reported != self.steps:
            self._send_report()
        return {"loss": loss, "steps": self.steps, "epochs": self.training.epochs}

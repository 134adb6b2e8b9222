"""The step plan of a run: how many optimizer steps, which examples each takes, its learning rate, and
when to log, evaluate and checkpoint. Pure functions of plain numbers (no config object, no state), so a
resumed run recomputes exactly the plan the interrupted one followed."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from tunelab.training.distributed import World, share
from tunelab.training.schedule import epoch_batches, mixture_batches, lr_at, steps_per_epoch, total_steps, warmup_steps


@dataclass(frozen=True)
class StepPlan:
    """Everything the loop needs to know about steps, from the run's numbers."""

    n_examples: int
    batch_size: int
    grad_accum: int
    seed: int
    total: int
    per_epoch: int
    warmup: int
    base_lr: float
    schedule: str
    save_every: int
    eval_every: int
    log_every: int
    max_seconds: float | None = None
    world: World = World()
    mixture: tuple[tuple[int, float], ...] | None = None  # (examples, weight) of each source; n_examples is the epoch size

    @classmethod
    def build(cls, n_examples: int, *, batch_size: int, grad_accum: int, epochs: float, max_steps: int | None,
              seed: int, lr: float, schedule: str, warmup_ratio: float, save_every: int | None = None,
              eval_every: int | None = None, log_every: int | None = None, on_gpu: bool = False,
              max_seconds: float | None = None, world: World = World(),
              mixture: tuple[tuple[int, float], ...] | None = None) -> StepPlan:
        """Defaults: checkpoint once an epoch, evaluate at each checkpoint, log every step on CPU and every
        10 on a GPU (a logged step reads the loss, which makes the host wait for the GPU). With several
        processes (``world``) a step holds ``grad_accum`` micro-batches per process (``grad_accum`` is then the
        global count ``grad_accum × world.size``). With a ``mixture``, ``n_examples`` is the epoch's size and
        each epoch draws from the sources by weight (``schedule.mixture_batches``)."""
        grad_accum *= world.size
        per_epoch = steps_per_epoch(n_examples, batch_size, grad_accum)
        total = total_steps(n_examples, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps)
        save = save_every or per_epoch
        return cls(n_examples, batch_size, grad_accum, seed, total, per_epoch, warmup_steps(total, warmup_ratio), lr,
                   schedule, save, eval_every or save, log_every or (10 if on_gpu else 1), max_seconds, world, mixture)

    def epoch_of(self, step: int) -> int:
        return step // self.per_epoch

    def global_micro_batches(self, step: int) -> list[list[int]]:
        """Example indices of each micro-batch of optimizer step ``step`` (0-based), over all processes."""
        epoch, index = divmod(step, self.per_epoch)
        order = _epoch_order(self.n_examples, self.batch_size, self.seed, epoch, self.mixture)
        return order[index * self.grad_accum : (index + 1) * self.grad_accum]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches of ``step``: all of them in one process; with several, its share, ending
        with :meth:`fillers` copies of the step's first micro-batch (``training.distributed``)."""
        return share(self.global_micro_batches(step), self.world)[0]

    def fillers(self, step: int) -> int:
        """How many of :meth:`micro_batches` are fillers (weighted 0, run so every rank makes as many passes)."""
        return share(self.global_micro_batches(step), self.world)[1]

    def lr(self, step: int, seconds_spent: float = 0.0) -> float:
        """The learning rate of ``step``; with a time budget the schedule follows whichever budget is further spent."""
        position: float = step
        if self.max_seconds is not None:
            position = max(step, min(1.0, seconds_spent / self.max_seconds) * self.total)
        return lr_at(position, base_lr=self.base_lr, total_steps=self.total, warmup=self.warmup, kind=self.schedule)

    def is_last(self, done: int, seconds_spent: float) -> bool:
        """True after the final step: all steps done, or the time budget spent."""
        return done >= self.total or (self.max_seconds is not None and seconds_spent >= self.max_seconds)

    def out_of_time(self, seconds_spent: float) -> bool:
        return self.max_seconds is not None and seconds_spent >= self.max_seconds

    def log_due(self, done: int, last: bool) -> bool:
        return last or done % self.log_every == 0

    def eval_due(self, done: int, last: bool) -> bool:
        return last or done % self.eval_every == 0

    def save_due(self, done: int, last: bool) -> bool:
        return last or done % self.save_every == 0


@lru_cache(maxsize=4)
def _epoch_order(n_examples: int, batch_size: int, seed: int, epoch: int, mixture) -> list[list[int]]:
    if mixture is None:
        return epoch_batches(n_examples, batch_size, seed, epoch)
    sizes, weights = tuple(size for size, _ in mixture), tuple(weight for _, weight in mixture)
    return mixture_batches(sizes, weights, n_examples, batch_size, seed, epoch)

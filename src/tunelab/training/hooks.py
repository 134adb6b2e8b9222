"""What every training loop shares: the clock that times optimizer steps, the end of a step, a deliberate crash.

``clock`` times optimizer steps for ``train.max_seconds`` (a test replaces ``hooks.clock``);
:func:`validated` records a validation and asks ``train.early_stopping`` whether to end (``training.best``);
:func:`finish_step` checkpoints the :class:`~tunelab.training.state.TrainingState` when the plan says so (never a
diverged model);
``TUNELAB_TEST_SIGKILL_AT_STEP=N`` kills the process with SIGKILL after step N (the resume tests);
``TUNELAB_TEST_FAIL_AT_STEP=R:N`` makes rank R fail with an error after step N (the distributed tests).
"""

from __future__ import annotations

import os
import signal
import time

from tunelab.errors import TunelabError
from tunelab.training.distributed import is_main
from tunelab.training.optim import StepOutcome
from tunelab.training.reporter import StepReporter
from tunelab.training.state import TrainingState

clock = time.monotonic


def crash_for_tests(step: int) -> None:
    if os.environ.get("TUNELAB_TEST_SIGKILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("TUNELAB_TEST_FAIL_AT_STEP") == f"{os.environ.get('RANK', 0)}:{step}":
        raise TunelabError(f"failing on purpose after step {step} (TUNELAB_TEST_FAIL_AT_STEP)")


def validated(state: TrainingState, reporter: StepReporter, done: int, metrics: dict[str, float]) -> bool:
    """Record step ``done``'s validation; True when early stopping (``state.best``) ends the loop at this step."""
    reporter.evaluation(done, metrics)
    keeper = state.best
    if keeper is None or not keeper.update(done, metrics, state.params, main=is_main()):
        return False
    step, loss = keeper.best
    reporter.progress.console.print(f"early stopping: {keeper.patience} validation(s) without a lower eval_loss than "
                                    f"{loss:.4f} (step {step})")
    return True


def finish_step(state: TrainingState, reporter: StepReporter, outcome: StepOutcome, done: int, last: bool, seconds: float) -> bool:
    """After optimizer step ``done`` (``seconds`` of optimizer steps spent so far): checkpoint if due (after checking
    the loss is finite); True when the loop ends."""
    if state.plan.save_due(done, last):
        reporter.require_finite(outcome, done)
        state.save(done, seconds)
    crash_for_tests(done)
    return last

"""What every training loop shares for tests: the clock that times optimizer steps, and a deliberate crash.

``clock`` times optimizer steps for ``train.max_seconds`` (a test replaces ``hooks.clock``);
``TUNELAB_TEST_SIGKILL_AT_STEP=N`` kills the process with SIGKILL after step N (the resume tests).
"""

from __future__ import annotations

import os
import signal
import time

clock = time.monotonic


def crash_for_tests(step: int) -> None:
    if os.environ.get("TUNELAB_TEST_SIGKILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)

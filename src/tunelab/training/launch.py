"""``tunelab train --nproc N``: the same command on N processes of this machine, started by torch's own
launcher (``python -m torch.distributed.run``, i.e. ``torchrun``).

Nothing is written here but the command line: torchrun picks a free rendezvous port (``--standalone``),
sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` for each process, and when one process fails it stops the
others, so a failing rank ends the job with its error instead of leaving the rest waiting at a collective.
Multi-node jobs call ``torchrun`` (or ``accelerate launch``) themselves: see the README.
"""

from __future__ import annotations

import os
import subprocess
import sys


def launch_command(nproc: int, train_args: list[str]) -> list[str]:
    """The torchrun command line that runs ``tunelab train TRAIN_ARGS`` on ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "tunelab", "train", *train_args]


def launch_env(nproc: int) -> dict[str, str]:
    """The environment of the processes: on a CPU, the cores shared out between them (torchrun's default is
    one thread each) unless ``OMP_NUM_THREADS`` is set already."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def launch(nproc: int, train_args: list[str]) -> int:
    """Run the job and return its exit status (0 when every process succeeded)."""
    return subprocess.call(launch_command(nproc, train_args), env=launch_env(nproc))

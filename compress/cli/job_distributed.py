"""The main job as a data-parallel run: this process launches the workers, or is one of them.

- ``--nproc N`` (N > 1) and no launcher around: this process is the **launcher**. It checks
  what it can without loading anything (inputs exist, ``--out`` is free), starts N workers with
  the same arguments (:mod:`compress.train.distributed.launch`) and ends as they end (one line
  when one fails).
- Started by a launcher (``--nproc`` or ``torchrun``; ``RANK``, ``WORLD_SIZE``... set): this
  process is a **worker**. It joins the process group; rank 0 takes ``--out``'s lock (tidying
  leftovers of killed runs), evaluates, writes and prints, the others are quiet. After a restart
  by the launcher (``--max-restarts``) the workers resume from the saved training state when
  there is one.
- Otherwise a **single** process, as always.

Imported by the main job only (it imports torch).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Literal

import click

from compress.errors import SettingError
from compress.train.distributed import context, worker
from compress.train.distributed.context import DistContext

Role = Literal["single", "launcher", "worker"]


def role(nproc: int, max_restarts: int) -> Role:
    """What this process is for ``--nproc nproc --max-restarts max_restarts`` (module docstring);
    a :class:`SettingError` for options that do not fit it."""
    if context.launched():
        if worker.launched_by_nproc():
            return "worker"
        if nproc != 1 or max_restarts:
            option = "--nproc" if nproc != 1 else "--max-restarts"
            raise SettingError(
                f"{option} is for starting workers; under torchrun leave it out (torchrun's "
                "--nproc-per-node and --max-restarts decide)"
            )
        return "worker"
    if nproc > 1:
        return "launcher"
    if max_restarts:
        raise SettingError("--max-restarts restarts the workers of --nproc N; give N > 1")
    return "single"


def check_device(role: Role, device: str, nproc: int) -> None:
    """Refuse ``--device cuda`` at once where this process sees too few GPUs (a worker checks its
    own when it starts)."""
    if device == "cpu" or role == "worker":
        return
    from compress.train.device import resolve_device

    resolve_device(device, local_rank=nproc - 1 if role == "launcher" else 0)


def check_trains(recipe: str) -> None:
    """Refuse to start workers for a recipe that does not fine-tune (nothing to share)."""
    from compress.recipe.parse import load_recipe

    loaded = load_recipe(recipe)
    if loaded.finetune is None:
        raise SettingError(
            f"recipe {loaded.name!r} does not fine-tune: --nproc has nothing to share between "
            "workers (run it without --nproc)"
        )


def launch(
    arguments: list[str], nproc: int, max_restarts: int, resume: bool, state_path: Path
) -> None:
    """Run the job on ``nproc`` workers with ``arguments`` (this command's own); returns when all
    succeeded. A failed worker is one :class:`DqrmError` line; SIGINT / SIGTERM end as they end a
    single process."""
    from compress.cli.main import Terminated
    from compress.train.distributed.failures import WorkerFailed
    from compress.train.distributed.launch import Interrupted, LaunchSettings, run_workers

    if max_restarts and not resume:  # a restart continues this run, never an older one's state
        state_path.unlink(missing_ok=True)
    try:
        run_workers(arguments, LaunchSettings(nproc, max_restarts))
    except WorkerFailed as e:
        if e.exit_code == 1 and state_path.exists():
            raise WorkerFailed(
                f"{e}; run the same command with --resume to continue from {state_path}", 1
            ) from None
        raise
    except Interrupted as e:
        raise (Terminated() if e.signum == signal.SIGTERM else KeyboardInterrupt()) from None


def start_worker(device: str, nproc: int) -> DistContext:
    """Join the launcher's process group on ``device``; quiet unless rank 0. The group is left
    when the command ends; the process stays a worker (its error line, reported after the
    command ends, goes to the launcher)."""
    ctx = context.start(device)
    if worker.launched_by_nproc() and ctx.world_size != nproc:
        raise SettingError(f"--nproc {nproc} but the launcher started {ctx.world_size} workers")
    worker.activate(ctx.rank)
    click.get_current_context().call_on_close(context.stop)
    return ctx


def hold_output(workers: DistContext | None, out_dir: Path, say) -> None:
    """Take ``--out``'s lock and tidy what killed runs left: a single process, or rank 0 (the one
    that writes; the lock is the writer's, and a killed rank 0 releases it)."""
    from compress.cli.job_output import hold_output as hold

    if workers is None or workers.is_main:
        hold(out_dir, say)


def loader_workers(workers: DistContext | None, requested: int | None) -> int | None:
    """``--loader-workers`` for this process: as given, else for a worker this machine's share
    of the default (every worker reads the whole stream in the same order, min(2, CPUs / workers
    here) reader processes each, at least one)."""
    if workers is None or requested is not None:
        return requested
    import os

    return max(1, min(2, (os.cpu_count() or 1) // workers.local_world_size))


def resumes(workers: DistContext | None, resume: bool, state_path: Path) -> bool:
    """``--resume``, or a restart by the launcher that finds a saved training state."""
    if resume:
        return True
    return workers is not None and workers.restart_count > 0 and state_path.exists()

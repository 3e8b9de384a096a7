"""Spread the independent fits of a protocol run over the processes torchrun starts (``trainer.spread_fits``).

::

    torchrun --nproc-per-node 4 -m endodistill run --config paper --out runs/paper --set trainer.spread_fits=true

The engine is torchrun: it launches one process per device (on one or several nodes), restarts nothing, and
serves the rendezvous store that the processes share. Rank 0 runs everything before the cross-validation fits
(teacher, MAE encoders) while the others wait; then the ``(fold, method)`` fits are dealt out in advance
(:func:`~endodistill.experiment.plan.fit_ranks`: round robin, the longer joint fits first), each in one
process on one device, into the same run directory; rank 0 waits for every rank and writes ``results.json``
and the report as in a one-process run.

No process group is created: a default process group would make Lightning's one-device fits believe they
are distributed. The processes only coordinate through torchrun's key-value store (``env://`` rendezvous), and
torchrun's per-process variables are removed from the environment afterwards, so every fit is an ordinary
one-process fit.

Why hand-written: what is needed is a few barriers on torch's own store (set a key, wait for the others' keys,
stop on an ``abort`` key), not a scheduler: the assignment is fixed in advance, and Lightning, torchrun and Ray
offer no "wait for rank 0, then split a list" primitive without a process group or a cluster service.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed import Store

from endodistill import rundir
from endodistill.config import Config, load_config
from endodistill.errors import ConfigError, EndodistillError, InputError
from endodistill.experiment import plan
from endodistill.experiment.provenance import load_or_make_splits, manifest_path
from endodistill.experiment.runner import FitProgress, cv_fit
from endodistill.train.baselines import run_baselines
from endodistill.train.data import load_cohort
from endodistill.train.seeding import configure_torch
from endodistill.train.teacher import load_teacher_outputs, train_teacher_share

T = TypeVar("T")

# What torchrun (and SLURM / Lightning's launcher) export per process. Lightning and `is_rank_zero` read them
# to decide that a process is one rank of a distributed fit; each spread fit is a one-process fit.
LAUNCHER_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",  # torch.distributed.is_torchelastic_launched() -> Lightning's TorchElasticEnvironment
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "NODE_RANK",
    "SLURM_NTASKS",  # Lightning's SLURMEnvironment (torchrun started by srun, one task per node)
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
)


class SpreadError(EndodistillError):
    """Another process of a spread run failed, stopped answering, or the shared store was lost."""

    exit_code = 1


def one_line(e: BaseException) -> str:
    """An exception as the one line the CLI would print for it (without the ``error:`` prefix)."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    text = str(e) if isinstance(e, EndodistillError) else f"unexpected {type(e).__name__}: {e}"
    return " ".join(text.split())[:500]


@contextmanager
def _raise_on_sigterm(err: BaseException) -> Iterator[None]:
    """Within the block, SIGTERM raises ``err`` in the main thread (elsewhere the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise err

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Spread:
    """This process's place in a spread run, and barriers on torchrun's store.

    Every wait polls with ``store.check`` (never a blocking ``get``), so it notices an ``abort`` key set by a
    failing rank, and a rank whose heartbeat stopped (killed without a chance to set ``abort``), instead of
    hanging. Waits have no time limit of their own: rank 0 may train the teacher for many hours.

    Args:
        store: torchrun's store (the keys used here are prefixed, see :func:`start_spread`).
        rank: this process's global rank.
        world: the number of processes.
        poll_s: seconds between two looks at the store while waiting.
        heartbeat_s: seconds between two heartbeats of this process (a background thread; 0: none).
        stale_s: a rank whose heartbeat has not moved for this long is taken as dead.
        grace_s: after setting ``abort``, how long a failing rank waits for the waiting ranks to read it (they
            print their own line then; torchrun stops the rest of the node when this process exits).
    """

    def __init__(
        self,
        store: Store,
        rank: int,
        world: int,
        poll_s: float = 0.5,
        heartbeat_s: float = 20.0,
        stale_s: float = 600.0,
        grace_s: float = 5.0,
    ) -> None:
        self.store = store
        self.rank = int(rank)
        self.world = int(world)
        self.poll_s = poll_s
        self.stale_s = stale_s
        self.grace_s = grace_s
        # The heartbeat thread and the main thread share one store client: one operation at a time.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        if heartbeat_s > 0:
            self._op(lambda s: s.add(f"beat/{self.rank}", 1))
            self._beat = threading.Thread(target=self._heartbeat, args=(heartbeat_s,), daemon=True)
            self._beat.start()

    # -- store access
    def _check(self, key: str) -> bool:
        """Whether ``key`` is set in the store."""
        return bool(self._op(lambda s: s.check([key])))

    def _add(self, key: str, n: int) -> int:
        """Add ``n`` to the counter ``key`` and return its new value."""
        return int(self._op(lambda s: s.add(key, n)))

    def _op(self, fn: Callable[[Store], T]) -> T:
        try:
            with self._lock:
                return fn(self.store)
        except EndodistillError:
            raise
        except Exception as e:  # the store's host (torchrun's agent on the first node) is gone
            raise SpreadError(
                f"rank {self.rank}: lost torchrun's store ({one_line(e)}): another node or its torchrun stopped"
            ) from None

    def _heartbeat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self._op(lambda s: s.add(f"beat/{self.rank}", 1))
            except SpreadError:
                return  # the main thread reports a lost store at its next wait

    def set(self, key: str, value: str) -> None:
        """Set ``key`` (prefixed) to ``value``."""
        self._op(lambda s: s.set(key, value))

    def get(self, key: str) -> str:
        """The value of ``key`` (which must exist)."""
        return self._op(lambda s: s.get(key)).decode("utf-8")

    def owns(self, index: int) -> bool:
        """Whether item ``index`` of a fixed list of equally long fits (the teacher's) is this process's: the
        round robin that :func:`~endodistill.experiment.plan.fit_ranks` also gives fits of equal cost."""
        return index % self.world == self.rank

    # -- failure
    def check_abort(self) -> None:
        """Raise if any rank has set ``abort`` (acknowledging it, so that the failing rank can exit).

        Raises:
            SpreadError: naming the failed rank and its error.
        """
        if not self._op(lambda s: s.check(["abort"])):
            return
        who, _, msg = self.get("abort").partition("\t")
        self.set(f"ack/{self.rank}", "1")
        err = SpreadError(f"stopping: rank {who} failed: {msg}")
        # The failing rank prints its own error once acknowledged; if this process ended first, torchrun
        # would stop that one before it says why (SIGTERM to the rest of the node). When that rank exits
        # first instead, torchrun's SIGTERM reaches this one during the wait: it then stops with its own
        # line at once rather than dying without one.
        with _raise_on_sigterm(err):
            time.sleep(min(1.0, self.grace_s))
        raise err

    def abort(self, message: str, grace: bool = True) -> None:
        """Tell every rank that this one failed (the first failure wins), then give the waiters a moment.

        Args:
            message: the one-line error.
            grace: wait up to ``grace_s`` for the waiting ranks to acknowledge it.
        """
        try:
            self._op(lambda s: s.compare_set("abort", "", f"{self.rank}\t{message}"))
            deadline = time.monotonic() + (self.grace_s if grace else 0.0)
            # Rank 0 waits to the end; the other ranks leave once they have arrived at "fits".
            waiting = [r for r in range(self.world) if r != self.rank]
            while waiting and time.monotonic() < deadline:
                waiting = [
                    r
                    for r in waiting
                    if not self._check(f"ack/{r}") and (r == 0 or not self._check(f"fits/{r}"))
                ]
                time.sleep(self.poll_s / 5)
        except SpreadError:
            pass  # the store is gone: nobody is left to tell

    # -- barriers
    def arrive(self, name: str) -> None:
        """Mark this rank as having reached point ``name``."""
        self.set(f"{name}/{self.rank}", "1")

    def wait(self, name: str, ranks: Iterable[int] | None = None, timeout_s: float | None = None) -> None:
        """Wait until ``ranks`` (default: all) have arrived at ``name``.

        Args:
            name: the barrier.
            ranks: the ranks to wait for.
            timeout_s: give up after this long (None: as long as they are alive).

        Raises:
            SpreadError: a rank failed (``abort``), stopped sending heartbeats, the store was lost, or the
                timeout passed.
        """
        pending = sorted(set(range(self.world) if ranks is None else ranks) - {self.rank})
        t0 = time.monotonic()
        beats: dict[int, tuple[int, float]] = {}
        while True:
            self.check_abort()
            pending = [r for r in pending if not self._check(f"{name}/{r}")]
            if not pending:
                return
            now = time.monotonic()
            if timeout_s is not None and now - t0 > timeout_s:
                raise SpreadError(
                    f"rank {self.rank}: ranks {pending} did not reach '{name}' in {timeout_s:.0f} s"
                )
            if self._beat is not None:
                for r in pending:
                    n = self._add(f"beat/{r}", 0)
                    if r not in beats or beats[r][0] != n:
                        beats[r] = (n, now)
                    elif now - beats[r][1] > self.stale_s:
                        raise SpreadError(
                            f"stopping: rank {r} stopped answering (no heartbeat for {self.stale_s:.0f} s): "
                            "killed, or its node was lost"
                        )
            time.sleep(self.poll_s)

    # -- life cycle
    def close(self) -> None:
        """Stop the heartbeat."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5.0)

    def __enter__(self) -> Spread:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            # A SpreadError is already the news of another rank's failure (or of a lost store).
            if exc is not None and not isinstance(exc, SpreadError):
                # Ctrl-C reaches every process of the node at once: nobody is left waiting to acknowledge.
                self.abort(one_line(exc), grace=not isinstance(exc, KeyboardInterrupt))
        finally:
            self.close()


def spread_conflict(cfg: Config) -> str | None:
    """Why the fits of ``cfg`` cannot be spread one per process (a data-parallel trainer), or None."""
    t = cfg.trainer
    if str(t.devices).strip() not in ("1", "auto"):
        return (
            f"runs each fit in one process on one device: it cannot be combined with trainer.devices={t.devices}"
            " (DDP); set trainer.devices=1, or trainer.spread_fits=false"
        )
    if t.num_nodes != 1 or t.strategy not in ("auto", "single_device"):
        return (
            f"runs each fit in one process: it cannot be combined with trainer.strategy={t.strategy} / "
            f"trainer.num_nodes={t.num_nodes}; torchrun's --nnodes spreads the fits over nodes"
        )
    return None


def check_spread_config(cfg: Config) -> None:
    """Refuse ``trainer.spread_fits`` with a data-parallel trainer (one fit per process, one device each).

    Raises:
        ConfigError: devices other than 1, several nodes, or a multi-process strategy.
    """
    conflict = spread_conflict(cfg) if cfg.trainer.spread_fits else None
    if conflict:
        raise ConfigError("trainer.spread_fits", conflict)


def _pin_device(cfg: Config, local_rank: int) -> None:
    """Give this process its own GPU (before CUDA starts), so that ``trainer.devices=1`` differs per process."""
    if cfg.trainer.accelerator in ("cpu", "mps"):
        return
    if torch.cuda.is_initialized():
        raise SpreadError(
            "trainer.spread_fits: CUDA was initialised before the fits were spread over devices"
        )
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    # Local rank k takes the k-th visible device; listing fewer devices than processes shares them
    # (CUDA_VISIBLE_DEVICES=0 with 2 processes: both fit on GPU 0).
    device = visible[local_rank % len(visible)] if visible else str(local_rank)
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    if (
        cfg.trainer.accelerator in ("gpu", "cuda") and torch.cuda.device_count() == 0
    ):  # reads the variable just set
        raise SpreadError(
            f"local rank {local_rank} has no GPU (CUDA_VISIBLE_DEVICES={device}): start at most one process "
            "per GPU, or list the GPUs to share, e.g. CUDA_VISIBLE_DEVICES=0 for all processes on GPU 0"
        )


def start_spread(cfg: Config) -> Spread | None:
    """Join the other processes of a spread run, when this process is one of several started by torchrun.

    Reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, pins a GPU per process (``CUDA_VISIBLE_DEVICES``,
    before CUDA starts), joins torchrun's store through the ``env://`` rendezvous, then removes the launcher's
    per-process variables (:data:`LAUNCHER_ENV`) from ``os.environ`` so that Lightning and ``is_rank_zero``
    see one process per fit.

    ``torch.distributed.rendezvous("env://")`` is used rather than a hand-built ``TCPStore``: under torchrun
    (``TORCHELASTIC_USE_AGENT_STORE=True``) it connects every rank as a client to the store that torchrun's
    agent on the first node already serves at ``MASTER_ADDR:MASTER_PORT``; under another launcher that sets
    the same variables, rank 0 serves it. Keys are prefixed with the run id and restart count, so nothing
    of another attempt on the same store is read.

    Args:
        cfg: the run configuration.

    Returns:
        None when ``trainer.spread_fits`` is off or the process runs alone (``WORLD_SIZE`` unset or 1):
        the run is then an ordinary one.

    Raises:
        ConfigError: ``spread_fits`` with several devices per fit.
        SpreadError: the rendezvous failed.
    """
    check_spread_config(cfg)
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if not cfg.trainer.spread_fits or world <= 1:
        return None
    rank = int(env.get("RANK", "0") or 0)
    # The ranks share torchrun's stdout: one write per line keeps their lines whole (a block-buffered pipe
    # flushes 8 KiB at a time, more than a pipe writes atomically, and two ranks' lines then cut into each other).
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)
    _pin_device(cfg, int(env.get("LOCAL_RANK", "0") or 0))
    try:
        store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(minutes=30)))
    except Exception as e:
        raise SpreadError(f"trainer.spread_fits: torchrun rendezvous failed ({one_line(e)})") from None
    prefix = f"endodistill/spread/{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    for name in LAUNCHER_ENV:
        env.pop(name, None)
    rz = sys.modules.get("lightning_utilities.core.rank_zero")
    if rz is not None:  # read from RANK when Lightning was imported: this process now logs as its own rank 0
        rz.rank_zero_only.rank = 0
    return Spread(dist.PrefixStore(prefix, store), rank, world)


# ------------------------------------------------------------------------------------- the fits of a rank
def run_share(
    cfg: Config,
    data: Any,
    teacher: Any,
    splits: list[dict[str, list[str]]],
    methods: list[str],
    run_dir: Path,
    resume: bool,
    encoder_of: Callable[[int], Path | None],
    spread: Spread,
) -> None:
    """Run this rank's share of the fits, then record what it trained and arrive at the ``fits`` barrier."""
    trained: list[str] = []
    skipped: list[str] = []
    fits = plan.cv_fits(len(splits), methods)
    mine = [
        fit for fit, r in zip(fits, plan.fit_ranks(cfg, fits, spread.world), strict=True) if r == spread.rank
    ]
    progress = FitProgress(len(mine), f"rank {spread.rank} fits")
    try:
        for fit in mine:
            spread.check_abort()  # another rank failed: stop at this fit boundary
            (skipped if resume and rundir.fit_reusable(fit.unit(run_dir)) else trained).append(fit.name)
            tag = f" (rank {spread.rank})"
            cv_fit(cfg, data, teacher, splits, fit, run_dir, resume, encoder_of(fit.fold), progress, tag)
    finally:
        progress.close()
    spread.set(f"trained/{spread.rank}", json.dumps({"trained": trained, "skipped": skipped}))
    spread.arrive("fits")


def run_teacher_share(cfg: Config, data: Any, run_dir: Path, resume: bool, spread: Spread) -> None:
    """Train this rank's share of the teacher's cross-validation fits (fit i on rank i % world), then arrive
    at the ``teacher`` barrier; rank 0 waits there and gathers them (:func:`train_teacher` ``reuse_fits``)."""
    units: list[str] = []
    if not (resume and rundir.is_done(run_dir / rundir.TEACHER)):
        spread.check_abort()
        units = train_teacher_share(cfg, data, run_dir, spread.owns, resume)
    spread.set(f"teacher_units/{spread.rank}", json.dumps(units))
    spread.arrive("teacher")


BASELINES_RANK = 1  # the rank that computes the reference baselines while rank 0 trains the MAE


def run_baselines_share(
    cfg: Config, data: Any, splits: list[dict[str, list[str]]], run_dir: Path, resume: bool, spread: Spread
) -> None:
    """On rank :data:`BASELINES_RANK`: the reference baselines (they need only the data and the folds), into
    ``RUN_DIR/baselines``, then the ``baselines`` barrier; rank 0 waits there and reloads them at the end."""
    if spread.rank != BASELINES_RANK:
        return
    if cfg.baselines.enabled:
        spread.check_abort()
        tag = f" (rank {spread.rank})"
        run_baselines(cfg, data, splits, run_dir, resume, (), lambda m: print(m + tag, flush=True))
    spread.arrive("baselines")


def run_worker(cfg: Config, run_dir: Path, resume: bool, spread: Spread) -> dict[str, Any]:
    """A rank other than 0: its share of the teacher's fits, then (once rank 0 has gathered the teacher and
    trained the MAE) it loads them from the run directory and runs its share of the fits."""
    plan.check_mae_config(cfg)
    configure_torch(cfg)
    spread.wait("data", ranks=[0])  # as long as rank 0 is alive: a cohort may take long to preprocess
    saved = load_config(run_dir / rundir.CONFIG)
    # Rank 0 resolved the manifest (possibly a cohort it generated into the run directory) and checked that a
    # resumed run has the same configuration; the fits read the manifest from config.yaml.
    cfg = cfg.model_copy(deep=True)
    cfg.data.manifest = saved.data.manifest
    data = load_cohort(cfg, manifest_path(cfg, run_dir))
    lab = data.labelled
    splits = load_or_make_splits(cfg, run_dir, lab.subjects, lab.labels.tolist())
    run_teacher_share(cfg, data, run_dir, resume, spread)
    run_baselines_share(cfg, data, splits, run_dir, resume, spread)
    spread.wait("ready", ranks=[0])  # rank 0 gathers the teacher and trains the MAE: that may take hours
    teacher = load_teacher_outputs(run_dir)
    methods = list(cfg.protocol.methods)

    def encoder_of(fold: int) -> Path | None:
        if not plan.needs_mae(cfg, methods):
            return None
        path = run_dir / plan.mae_unit(cfg, fold) / rundir.ENCODER
        if not path.is_file():
            raise InputError(path, "MAE encoder missing: rank 0 should have trained it before the fits")
        return path

    run_share(cfg, data, teacher, splits, methods, run_dir, resume, encoder_of, spread)
    done = json.loads(spread.get(f"trained/{spread.rank}"))
    print(
        f"[rank {spread.rank}/{spread.world}] trained {len(done['trained'])} fits, "
        f"{len(done['skipped'])} already done; rank 0 gathers the results",
        flush=True,
    )
    return {"rank": spread.rank, **done}


# ------------------------------------------------------------------------------- launching on one machine
def launched() -> bool:
    """Whether this process is one of several that a launcher (torchrun) started."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_processes(cfg: Config) -> int:
    """The demo's default process count: 2 for a one-device CPU run on 2 or more cores, else 1.

    The CPU fits use one thread each (``trainer.threads``), so a second process uses the second core: the
    demo's fits took 1.5-1.7x less wall time in 2 processes (``benchmarks/bench_spread.py``). Not more than
    2 by default: each process holds its own torch and cohort (a peak RSS of about 1.3 GiB at demo size).
    """
    plain = spread_conflict(cfg) is None
    return 2 if cfg.trainer.accelerator == "cpu" and plain and usable_cores() >= 2 else 1


def launch_local(processes: int, argv: list[str]) -> int:
    """Run the command line ``argv`` in ``processes`` processes on this machine with the fits spread over them.

    The same as ``torchrun --standalone --nproc-per-node N -m endodistill ARGV --set trainer.spread_fits=true``,
    started from Python: torchrun is the engine (rendezvous on a free local port, one process per rank). Every
    process prints its own one-line error; torchrun's own failure report (a traceback of its agent) is not
    shown, and this process exits with the failed rank's code.

    Args:
        processes: how many processes (at least 2).
        argv: the ``endodistill`` arguments (global options, command, its options).

    Returns:
        The exit code: 0, or the code of the first rank that failed.

    Raises:
        SpreadError: torchrun could not start the processes.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    # torchrun warns when it sets OMP_NUM_THREADS=1 itself; each fit sets its own threads (trainer.threads).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    launcher = ["--standalone", "--nproc-per-node", str(int(processes)), "-m", "endodistill"]
    args = get_args_parser().parse_args([*launcher, *argv, "--set", "trainer.spread_fits=true"])
    # The agent logs every start, stop and failure (with its traceback) at INFO / ERROR; the ranks say what
    # matters themselves.
    quiet = logging.getLogger("torch.distributed")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        torchrun(args)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items()) if f.exitcode]
        return int(codes[0]) if codes and codes[0] > 0 else 1
    except Exception as e:
        raise SpreadError(f"could not start {processes} processes with torchrun ({one_line(e)})") from None
    finally:
        quiet.setLevel(level)
    return 0

"""Two ways to run a list of client jobs: in this process, or on a pool of Ray actors.

Both implement :class:`Backend` and host the same :class:`ClientWorker`, so a
run gives the same numbers on either and with any number of actors: outcomes
come back in job order, and no client's result depends on where it ran.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import heapq
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simulator.config import ConfigError, ExperimentConfig
from simulator.protocol import TRAIN, ClientJob, ClientOutcome
from simulator.worker import ClientWorker, WorkerData, os_exit_guard

ADDRESS_TIMEOUT_S = 3.0  # how long engine.ray_address may take to accept a connection
CALL_GRACE_S = 30.0  # on top of the clients' time limits: what an actor call may take beyond them
log = logging.getLogger("fedstream")


class ClientFailure(RuntimeError):
    """A client (or the actor hosting it) failed; the run stops with its traceback."""


class Backend(ABC):
    """Runs client jobs and returns their outcomes in job order."""

    data: WorkerData  # the arrays as this backend holds them, for the driver to read too

    @abstractmethod
    def execute(self, jobs: list[ClientJob], weights: list[list[np.ndarray]]) -> list[ClientOutcome]:
        """Run ``jobs``; ``job.weights_index`` picks each job's weights from ``weights``."""

    def close(self, failed: bool = False) -> None:
        """Release what the backend holds (``failed``: the run ended with an error)."""


class LocalBackend(Backend):
    """One worker in the driver process: no Ray, same client code.

    A client's ``os._exit`` would end the driver with no message: while clients run it fails the
    client instead, naming it (:func:`~simulator.worker.os_exit_guard`).
    """

    def __init__(self, config: ExperimentConfig, data: WorkerData) -> None:
        self.data = data
        self.worker = ClientWorker(config, data)

    def execute(self, jobs: list[ClientJob], weights: list[list[np.ndarray]]) -> list[ClientOutcome]:
        with os_exit_guard(self.worker):
            return self.worker.execute(jobs, weights)


class WorkerHost:
    """A Ray actor hosting the worker of one job at a time, so a sweep's jobs reuse warm actors.

    Each call names its job's setup (a token, and the config and data in the
    object store); a host that holds another job's worker, or none (new, or
    restarted by Ray after a crash), builds the job's worker first. Building one
    is cheap next to what the host spares: a process start and torch's import.
    """

    def __init__(self) -> None:
        self.token: str | None = None
        self.worker: ClientWorker | None = None
        self.trained_samples, self.busy_s = 0, 0.0  # over the host's life: its throughput
        self.device, self.gpu_share = "none", None  # of the last job's worker (stats outlive a reset)

    def execute(
        self, token: str, setup: list, jobs: list[ClientJob], weights: list[list[np.ndarray]]
    ) -> list[ClientOutcome]:
        """``setup``: the job's config and data as object references, in a list so Ray passes them unresolved."""
        if token != self.token:
            import ray

            config, data = ray.get(setup)
            self.reset()  # the previous job's model and tensors go before the next's arrive
            self.worker = ClientWorker(config, data, gpu=config.engine.num_gpus_per_actor > 0)
            self.token, self.device, self.gpu_share = token, str(self.worker.device), self.worker.gpu_share
        assert self.worker is not None
        started = time.perf_counter()
        with os_exit_guard(self.worker, before_exit=lambda what: _note_exit(token, jobs[0].server_round, what)):
            outcomes = self.worker.execute(jobs, weights)
        self.busy_s += time.perf_counter() - started
        self.trained_samples += sum(len(job.indices) for job in jobs if job.kind == TRAIN)
        return outcomes

    def reset(self) -> None:
        """Drop the job's worker (its model, tensors and views of its data) and give cached GPU memory back."""
        self.worker, self.token = None, None
        gc.collect()
        release_gpu_cache()

    def stats(self) -> dict[str, Any]:
        """Where this actor trains, the GPU share it capped itself at, the most GPU memory it held, and its
        samples trained per second of its calls (evaluation and queries included in the time)."""
        import ray
        import torch

        on_gpu = self.device.startswith("cuda")
        return {
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "device": self.device,
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_gpu else 0.0,
            "gpu_memory_cap": self.gpu_share,
            "samples_per_s": round(self.trained_samples / self.busy_s, 1) if self.busy_s else 0.0,
        }


class RayBackend(Backend):
    """A pool of Ray actors, each hosting one worker; one call per actor per round.

    The data goes into the object store once; each round's weights go in once
    and every actor reads the same reference. Jobs are dealt so that every
    actor gets about the same number of samples (:func:`balanced_shares`).

    With ``keep_warm`` (the jobs of a ``--multirun`` sweep in one process), Ray
    and the actors outlive the run: the next run with the same actor resources
    reuses them, sending its own config and data (:class:`WorkerHost`); other
    resources get new actors. A failed run takes its actors and Ray down, so it
    cannot poison the next; the process's exit shuts down what is left.
    """

    def __init__(self, config: ExperimentConfig, data: WorkerData, keep_warm: bool = False) -> None:
        # A wait in ray.get runs Python's signal handlers each this often (Ray's default: 1000 ms): a Ctrl-C
        # acts within 0.1 s, and two Ctrl-Cs a second apart are two (within one interval they count once).
        # Read when Ray's library loads, so only where nothing imported Ray before.
        os.environ.setdefault("RAY_get_check_signal_interval_milliseconds", "100")
        import ray  # imported here so the local backend never pays for it

        self.ray = ray
        self.keep_warm = keep_warm
        engine = config.engine
        self.client_timeout_s = engine.client_timeout_s
        # Opt into Ray's coming default (and out of its warning about it): actors that ask
        # for no GPU leave CUDA_VISIBLE_DEVICES alone. A worker uses a GPU only if given one.
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        self.pool = _WARM.take(_pool_key(config)) or self._start(config)
        try:
            # Held for the run's life: a restarted actor is built again from this reference.
            self.data_ref = data_ref = ray.put(data)
            self.data = ray.get(data_ref)  # read-only views of the object store's copy
            self.setup = [ray.put(config), data_ref]
        except BaseException:
            self.pool.release()  # a pool taken or started and then lost would hold Ray's CPUs
            raise
        self.token = uuid.uuid4().hex  # names this run's setup to the hosts

    def _start(self, config: ExperimentConfig) -> _ActorPool:
        """Ray (unless one runs: a pool of another shape's, a test's, a cluster) and new actors."""
        ray, engine = self.ray, config.engine
        owns_ray = not ray.is_initialized()  # shut down only a Ray we started
        watchdog = None
        try:
            if owns_ray and not engine.ray_address:
                watchdog = RayWatchdog.start(os.path.dirname(ray.__file__))
            with _signals_kept():
                return self._start_ray(config, owns_ray, watchdog)
        except BaseException:  # a bad config, a signal: nothing of a Ray we started outlives this
            if owns_ray:
                ray.shutdown()
            if watchdog is not None:
                watchdog.stop()
            raise

    def _start_ray(self, config: ExperimentConfig, owns_ray: bool, watchdog: RayWatchdog | None) -> _ActorPool:
        ray, engine = self.ray, config.engine
        if owns_ray:
            if engine.ray_address:
                check_reachable(engine.ray_address)
                ray.init(address=engine.ray_address, logging_level=logging.WARNING)
            else:
                check_local_gpus(engine.num_actors, engine.num_gpus_per_actor)
                needed, cores = engine.num_actors * engine.num_cpus_per_actor, os.cpu_count() or 1
                if needed > cores:  # Ray is told there are enough: the actors then share the cores
                    log.warning(
                        "engine.num_actors = %d x engine.num_cpus_per_actor = %g needs %g CPUs and this machine "
                        "has %d: the actors share them, each training slower; engine.num_actors = %d would not",
                        engine.num_actors,
                        engine.num_cpus_per_actor,
                        needed,
                        cores,
                        max(1, int(cores // engine.num_cpus_per_actor)),
                    )
                ray.init(
                    address="local",  # a new instance, even where `ray start` runs one
                    num_cpus=max(cores, int(np.ceil(needed))),
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    configure_logging=True,
                )
        self._check_resources(config)
        # A dead actor comes back (a new host) and Ray reruns its call, which names the job:
        # where and how often a share runs never changes its outcomes.
        host = ray.remote(WorkerHost).options(
            num_cpus=engine.num_cpus_per_actor,
            num_gpus=engine.num_gpus_per_actor,
            max_restarts=engine.max_actor_restarts,
            max_task_retries=engine.max_actor_restarts,
        )
        return _ActorPool(_pool_key(config), [host.remote() for _ in range(engine.num_actors)], owns_ray, watchdog)

    @property
    def actors(self) -> list:
        return self.pool.actors

    def _check_resources(self, config: ExperimentConfig) -> None:
        """Fail now, naming the keys, where not every actor can be placed (it would wait forever)."""
        engine = config.engine
        available = self.ray.available_resources()
        if _WARM.freeing and _WARM.freeing[0] == self.ray.get_runtime_context().get_job_id():
            for resource, amount in _WARM.freeing[1].items():  # actors we killed hold them a moment longer
                available[resource] = available.get(resource, 0.0) + amount
        _WARM.freeing = None
        for key, per_actor, resource in (
            ("engine.num_cpus_per_actor", engine.num_cpus_per_actor, "CPU"),
            ("engine.num_gpus_per_actor", engine.num_gpus_per_actor, "GPU"),
        ):
            needed, have = engine.num_actors * per_actor, available.get(resource, 0.0)
            if needed > have:
                raise ConfigError(
                    f"engine.num_actors = {engine.num_actors} x {key} = {per_actor} needs "
                    f"{needed:g} {resource}; the Ray cluster has {have:g} free"
                )

    def execute(self, jobs: list[ClientJob], weights: list[list[np.ndarray]]) -> list[ClientOutcome]:
        weights_ref = self.ray.put(weights)
        shares = [[jobs[i] for i in share] for share in balanced_shares(jobs, len(self.actors))]
        calls = [
            (share, actor.execute.remote(self.token, self.setup, share, weights_ref))
            for actor, share in zip(self.actors, shares)
            if share
        ]
        outcomes: dict[int, ClientOutcome] = {}
        for share, call in calls:
            clients = [job.client_id for job in share]
            try:
                results = self.ray.get(call, timeout=self._call_timeout(len(share)))
            except self.ray.exceptions.GetTimeoutError as error:
                raise ClientFailure(
                    f"the actor running clients {clients} in round {share[0].server_round} ran past "
                    f"engine.client_timeout_s = {self.client_timeout_s} s per client"
                ) from error
            except self.ray.exceptions.RayError as error:
                server_round = share[0].server_round
                exited = _exit_noted(self.token, server_round, clients)
                if exited:
                    raise ClientFailure(f"{exited}, ending the actor that ran clients {clients}:\n{error}") from error
                raise ClientFailure(
                    f"the actor running clients {clients} in round {server_round} failed:\n{error}"
                ) from error
            outcomes.update((id(job), result) for job, result in zip(share, results))
        return [outcomes[id(job)] for job in jobs]

    def _call_timeout(self, clients: int) -> float | None:
        """The wait for one actor call: backstop to the worker's per-client timer (C code it cannot interrupt)."""
        if self.client_timeout_s is None:
            return None
        return self.client_timeout_s * clients + CALL_GRACE_S

    def close(self, failed: bool = False) -> None:
        """Keep the pool warm for the sweep's next run, or release it (always after a failure)."""
        for note in Path(tempfile.gettempdir()).glob(f"fedstream-{self.token}-round-*.exit"):
            note.unlink(missing_ok=True)
        if self.keep_warm and not failed:
            for actor in self.pool.actors:  # in call order, after this run's calls: no wait needed
                actor.reset.remote()
            _WARM.keep(self.pool)
        else:
            self.pool.release()


def _exit_note(token: str, server_round: int) -> Path:
    """Where an actor of run ``token`` notes a client's ``os._exit`` in ``server_round``: this machine's
    temporary folder, which the driver reads where it runs on the same machine (a local Ray)."""
    return Path(tempfile.gettempdir()) / f"fedstream-{token}-round-{server_round}.exit"


def _note_exit(token: str, server_round: int, what: str) -> None:
    """In an actor whose client calls ``os._exit``: say which client on the console (Ray forwards an
    actor's stderr to the driver's) and in a note for the driver, before the process ends."""
    print(f"error: {what}", file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):  # the note is a courtesy: the actor's death is reported anyway
        _exit_note(token, server_round).write_text(what)


def _exit_noted(token: str, server_round: int, clients: list[int]) -> str | None:
    """The note of an ``os._exit`` by one of ``clients`` in ``server_round`` of this run, if one is here."""
    try:
        note = _exit_note(token, server_round).read_text()  # "client 3 called os._exit(1) in round 2"
    except OSError:
        return None
    client = note.split()[1] if note.startswith("client ") else ""
    return note if client.isdigit() and int(client) in clients else None


@dataclass
class _ActorPool:
    """Actors of one shape (their number and resources), and whether their Ray is ours to shut down."""

    key: tuple
    actors: list
    owns_ray: bool
    watchdog: RayWatchdog | None = None  # of the Ray we started, if we did

    def release(self) -> None:
        """Kill the actors, and shut Ray down where it is ours."""
        import ray

        if not ray.is_initialized():  # at exit, Ray's own handler may have shut it down already
            if self.watchdog is not None:
                self.watchdog.stop()
            return
        for actor in self.actors:
            ray.kill(actor)
        if self.owns_ray:
            ray.shutdown()
            if self.watchdog is not None:
                self.watchdog.stop()
        else:  # Ray stays up and frees the actors' resources when they are gone, a moment later
            _WARM.freeing = (
                ray.get_runtime_context().get_job_id(),
                {"CPU": len(self.actors) * self.key[1], "GPU": len(self.actors) * self.key[2]},
            )


class _WarmPools:
    """The one warm pool of this process, kept between the runs of a sweep."""

    def __init__(self) -> None:
        self.pool: _ActorPool | None = None
        # What just-killed actors of a Ray we keep still hold, and in which connection to it (job id).
        self.freeing: tuple[str, dict[str, float]] | None = None
        atexit.register(self.release)

    def take(self, key: tuple) -> _ActorPool | None:
        """The warm pool if it has this shape; a pool of another shape is released, Ray with it."""
        pool, self.pool = self.pool, None
        if pool is None:
            return None
        import ray

        if pool.key == key and ray.is_initialized():
            return pool
        pool.release()
        return None

    def keep(self, pool: _ActorPool) -> None:
        """Keep ``pool`` warm for the next run (one pool at a time: a held one is released)."""
        if self.pool is not None and self.pool is not pool:
            self.pool.release()
        self.pool = pool

    def release(self) -> None:
        if self.pool is not None:
            self.pool.release()
            self.pool = None


_WARM = _WarmPools()


@contextlib.contextmanager
def _signals_kept() -> Iterator[None]:
    """``ray.init`` in the block with this process's SIGTERM handler kept (``simulator/interrupts.py``'s).

    ``ray.init`` replaces it with one that raises ``SystemExit(15)``: exit code 15, with no message. A
    SIGTERM that lands in Ray's handler meanwhile is handed to the handler it replaced.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit as exit_:
        if exit_.code == signal.SIGTERM and callable(handler) and signal.getsignal(signal.SIGTERM) is not handler:
            handler(signal.SIGTERM, None)
        raise
    finally:
        signal.signal(signal.SIGTERM, handler)


class RayWatchdog:
    """A small process that outlives this one to take down what is left of the Ray it started.

    Ray ties its head processes (GCS, raylet, dashboard) to the driver: they die
    with it, even on SIGKILL. The raylet's own children do not: its dashboard
    and runtime-env agents, once the raylet is gone, spend a minute trying to
    report its death to the dead GCS, deaf to SIGTERM meanwhile, and its
    workers a few seconds more. The watchdog (Python's standard library only,
    Linux's ``/proc``) follows the tree of this process's children that run
    Ray's code (``ray_dir`` in their command line), and their children, by pid
    and start time; when its end of the pipe closes, because :meth:`stop` was
    called after ``ray.shutdown`` or because this process died, however it
    died, it SIGKILLs those still alive, and ends. It kills nothing else: not
    another Ray, not a process that reused a pid. It ignores SIGINT, SIGTERM
    and SIGHUP, which stop the run (the run, not the watchdog, decides what
    happens then); SIGKILL of the whole process group takes Ray with it anyway.
    """

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    @classmethod
    def start(cls, ray_dir: str) -> RayWatchdog | None:
        """A watchdog of this process's Ray (None where there is no ``/proc`` to follow it by)."""
        if not os.path.exists(f"/proc/{os.getpid()}/stat"):
            return None
        command = [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(os.getpid()), ray_dir]
        return cls(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the pipe: the watchdog kills what is left of our Ray; wait for it to end."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()  # reaped: no zombie left behind


# The watchdog's code: argv[1] the driver's pid, argv[2] Ray's package folder; its stdin, the driver's pipe.
_WATCHDOG = r"""
import os, select, signal, sys, time

for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(number, signal.SIG_IGN)
driver, ray_dir = int(sys.argv[1]), sys.argv[2].encode()
ours = {}  # pid: start time, of the driver's Ray processes and their descendants


def processes():
    table = {}  # pid: (parent pid, start time), of the live processes
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as file:
                    stat = file.read()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            if fields[0] not in (b"Z", b"X"):
                table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def runs_ray(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return ray_dir in file.read()
    except OSError:
        return False


def follow(from_driver):
    table = processes()
    for pid in [pid for pid, start in ours.items() if table.get(pid, (0, None))[1] != start]:
        del ours[pid]  # ended (or its pid now another process's)
    children = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    roots = [pid for pid in children.get(driver, ()) if pid != os.getpid() and runs_ray(pid)] if from_driver else []
    todo = list(ours) + roots
    while todo:
        pid = todo.pop()
        if pid in table:
            ours.setdefault(pid, table[pid][1])
            todo += [child for child in children.get(pid, ()) if child not in ours]


while True:
    follow(from_driver=True)
    if select.select([0], [], [], 0.5)[0] and not os.read(0, 4096):
        break
for attempt in range(3):  # the driver has ended, or is done with this Ray: what is left of it goes
    follow(from_driver=False)
    for pid in ours:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if not ours:
        break
    time.sleep(0.2)
"""


def _pool_key(config: ExperimentConfig) -> tuple:
    engine = config.engine
    return (
        engine.num_actors,
        engine.num_cpus_per_actor,
        engine.num_gpus_per_actor,
        engine.max_actor_restarts,
        engine.ray_address,
    )


def release_gpu_cache() -> None:
    """Give the GPU memory torch caches back to the device (between a sweep's jobs on a shared GPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_reachable(address: str, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """A ConfigError naming ``engine.ray_address`` unless something listens there.

    ``ray.init`` retries an address with nothing behind it for half a minute,
    with warnings and then a traceback; a TCP connection to the GCS (or Ray
    client) port answers in ``timeout_s``. ``auto`` and ``local`` are left to Ray.
    """
    if address in ("auto", "local"):
        return
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]/]+?)\]?:(\d{1,5})", address)
    if match is None:
        raise ConfigError(
            f"engine.ray_address = {address!r}: expected host:port, ray://host:port, auto or null "
            "(start a new Ray instance)"
        )
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        if not address.startswith("ray://"):  # Ray client's port speaks another protocol
            _ask_gcs(f"{host}:{port}", timeout_s)
    except (OSError, RuntimeError) as error:
        reason = "no answer" if isinstance(error, TimeoutError) else getattr(error, "strerror", None) or str(error)
        raise ConfigError(
            f"engine.ray_address = {address!r}: cannot reach a Ray cluster at {host}:{port} "
            f"within {timeout_s:g} s ({reason}); start one with `ray start --head`, or set "
            "engine.ray_address=null to start a new instance"
        ) from None


def _ask_gcs(address: str, timeout_s: float) -> None:
    """Raise RuntimeError unless a Ray GCS answers at ``address`` (some other server may listen there)."""
    import threading

    from ray._raylet import GcsClient

    failure: list[str] = []

    def ask() -> None:
        try:
            GcsClient(address=address).cluster_id
        except Exception as error:
            failure.append(str(error).splitlines()[0] if str(error) else type(error).__name__)

    saved = os.dup(2)  # Ray's C++ client logs each failed try to fd 2: the ConfigError says it once
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            thread = threading.Thread(target=ask, daemon=True)
            thread.start()
            thread.join(timeout_s)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    if thread.is_alive():
        raise TimeoutError("no answer")
    if failure:
        raise RuntimeError(f"something listens there, but not a Ray GCS: {failure[0]}")


def check_local_gpus(num_actors: int, per_actor: float) -> None:
    """A ConfigError naming ``engine.num_gpus_per_actor`` where this machine has too few GPUs for a Ray we start."""
    needed = num_actors * per_actor
    if needed <= 0:
        return
    import torch

    have = torch.cuda.device_count() if torch.version.cuda else 0
    if needed > have:
        why = "this torch build has no CUDA" if torch.version.cuda is None else f"torch sees {have} CUDA devices"
        raise ConfigError(
            f"engine.num_actors = {num_actors} x engine.num_gpus_per_actor = {per_actor:g} needs "
            f"{needed:g} GPUs; {why}; lower engine.num_gpus_per_actor or set it to 0"
        )


def balanced_shares(jobs: list[ClientJob], num_actors: int) -> list[list[int]]:
    """Job positions per actor, each share in job order, with about equal samples per actor.

    A round ends when its slowest actor does, and client datasets differ in size
    by 10x and more (Dirichlet, lognormal), so dealing in turn left one actor with
    most of the work. Largest job first, each to the actor with the fewest samples
    so far (LPT scheduling). A job that starts a new task counts the samples of
    the task it left too: methods work on them there (EWC's Fisher, replay's
    reservoir). Where a job runs never changes its result.
    """
    sizes = [len(job.indices) + (len(job.previous.indices) if job.previous else 0) + 1 for job in jobs]
    loads = [(0, actor) for actor in range(num_actors)]
    shares: list[list[int]] = [[] for _ in range(num_actors)]
    for position in sorted(range(len(jobs)), key=lambda i: -sizes[i]):
        load, actor = heapq.heappop(loads)
        shares[actor].append(position)
        heapq.heappush(loads, (load + sizes[position], actor))
    return [sorted(share) for share in shares]


def make_backend(config: ExperimentConfig, data: WorkerData, keep_warm: bool = False) -> Backend:
    """The backend ``engine.backend`` names (validated in the config); ``keep_warm``: see :class:`RayBackend`."""
    if config.engine.backend == "ray":
        return RayBackend(config, data, keep_warm)
    return LocalBackend(config, data)

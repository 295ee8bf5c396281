"""Where each model's stage chain runs: here, one model after another (`Local`, the default),
or as one Ray task per model on an existing cluster (`RayCluster`), in parallel.

An executor gets the models' jobs and two functions from the pipeline: `analyse(job)` runs one
model's chain and returns its stage records; `lost(job, error)` records a chain that died with
its process (a cluster node lost) and returns the records it left. It returns the records in
the jobs' order. Every process writes to the same results tree, so on a cluster that tree must
lie on a filesystem all nodes share; sw_lib (same version) must be installed on every node.
Ray is an optional extra (`pip install 'sw-lib[ray]'`), imported only when it is chosen.
"""
from __future__ import annotations

import logging
import socket
import sys
from typing import Callable, Protocol, Sequence

log = logging.getLogger("sw_lib.executors")


class ExecutorError(ValueError):
    """The executor cannot be used (Ray missing, no cluster at the address); one line."""


class Executor(Protocol):
    def run(self, jobs: Sequence, analyse: Callable, lost: Callable) -> list[dict]: ...

    def close(self) -> None: ...


class Local:
    """One model after another, in this process (each notebook still runs in its own kernel)."""

    def run(self, jobs, analyse, lost):
        return [analyse(job) for job in jobs]

    def close(self):
        pass


def from_config(runtime: dict, infos: Sequence = ()) -> Executor:
    """The executor that `runtime` (the params file's runtime section) asks for; a Ray cluster
    is connected to here, before any work, so a wrong address fails at once."""
    if runtime.get("executor", "local") == "local":
        return Local()
    return RayCluster.connect(runtime.get("ray_address"), runtime.get("ray_num_cpus"),
                              runtime.get("ray_num_gpus"), runtime.get("device", "auto"))


# --- Ray ---------------------------------------------------------------------------------------


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError("executor 'ray' needs Ray: pip install 'sw-lib[ray]' (on every "
                            "node), or use --executor local") from None
    return ray


def _unreachable(address: str) -> str | None:
    """Why HOST:PORT takes no connection (Ray itself would retry for a minute), else None."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None  # 'auto', ray://...: Ray reports those itself
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


def gpus_per_model(device: str, num_gpus: float | None, cluster_gpus: float) -> float:
    """A model asks for one GPU when it will run on CUDA: device cuda[:N], or auto on a cluster
    that has GPUs; none otherwise. An explicit runtime.ray_num_gpus wins."""
    if num_gpus is not None:
        return num_gpus
    if device.startswith("cuda"):
        return 1
    return 1 if device == "auto" and cluster_gpus > 0 else 0


def _analyse_in_task(analyse: Callable, job):
    """Body of a Ray task: the model's progress lines go to the task's stdout, which Ray
    forwards to the driver's console (prefixed with the worker's pid and node address)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    library = logging.getLogger("sw_lib")
    library.addHandler(handler)
    try:
        return analyse(job)
    finally:
        library.removeHandler(handler)
        handler.flush()


class RayCluster:
    """One Ray task per model on an existing cluster (`ray start --head` and workers)."""

    def __init__(self, ray, num_cpus: float, num_gpus: float, owns_connection: bool):
        self.ray, self.num_cpus, self.num_gpus = ray, num_cpus, num_gpus
        self.owns_connection = owns_connection

    @classmethod
    def connect(cls, address: str | None, num_cpus: float | None, num_gpus: float | None,
                device: str) -> RayCluster:
        ray = _import_ray()
        address = address or "auto"
        owns_connection = not ray.is_initialized()
        if owns_connection:
            why = _unreachable(address)
            if why:
                raise ExecutorError(f"no Ray cluster at '{address}' ({why}); start one with "
                                    "`ray start --head` or give its address with "
                                    "--ray-address HOST:PORT")
            try:
                ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING,
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ExecutorError(f"no Ray cluster at '{address}' ({first}); start one with "
                                    "`ray start --head` or give its address with "
                                    "--ray-address HOST:PORT") from None
        resources = ray.cluster_resources()
        cpus = 1 if num_cpus is None else num_cpus
        gpus = gpus_per_model(device, num_gpus, resources.get("GPU", 0))
        log.info("Ray cluster %s: %d node(s), %g CPU(s), %g GPU(s); each model asks for %g "
                 "CPU(s) and %g GPU(s)", address, len([n for n in ray.nodes() if n["Alive"]]),
                 resources.get("CPU", 0), resources.get("GPU", 0), cpus, gpus)
        if cpus > resources.get("CPU", 0) or gpus > resources.get("GPU", 0):
            if owns_connection:
                ray.shutdown()
            raise ExecutorError(f"each model asks for {cpus:g} CPU(s) and {gpus:g} GPU(s) but "
                                f"the Ray cluster at '{address}' has {resources.get('CPU', 0):g} "
                                f"and {resources.get('GPU', 0):g}; set runtime.ray_num_cpus / "
                                "runtime.ray_num_gpus")
        return cls(ray, cpus, gpus, owns_connection)

    def run(self, jobs, analyse, lost):
        ray = self.ray
        task = ray.remote(_analyse_in_task)
        pending = {}
        for i, job in enumerate(jobs):
            # No retries: a rerun would race the lost attempt's files; --resume redoes it.
            ref = task.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0,
                               name=f"sw-analyze {job.paths.root.name}").remote(analyse, job)
            pending[ref] = i
        log.info("%d model(s) submitted to the Ray cluster", len(jobs))
        records: list[dict | None] = [None] * len(jobs)
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(done[0])
                records[i] = self._result(done[0], jobs[i], lost)
        except KeyboardInterrupt:
            for ref, i in pending.items():
                ray.cancel(ref, force=True)
                records[i] = lost(jobs[i], "interrupted")
            raise
        return records

    def close(self):
        if self.owns_connection:
            self.ray.shutdown()

    def _result(self, ref, job, lost) -> dict:
        slug = job.paths.root.name
        try:
            stages = self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            cause = getattr(err, "cause", None)  # a task that raised: the original error
            text = (f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException)
                    else f"{type(err).__name__}: {err}")
            error = "ray task lost: " + " ".join(text.split())[:300]
            log.warning("%s: %s", slug, error)
            return lost(job, error)
        failed = [name for name, s in stages.items() if s["status"] == "failed"]
        log.info("%-28s finished on the cluster%s", slug,
                 f" ({len(failed)} stage(s) failed)" if failed else "")
        return stages

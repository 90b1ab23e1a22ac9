"""Fan-out: one function over a list of jobs, here one after another, or as Ray tasks (`--ray`).

Without `ray`, nothing imports Ray. With it, every job is a Ray task that declares `cpus` CPUs, so Ray runs as
many at once as the cluster has room for; results come back in job order, exactly as the local path returns
them. `ray`: 'local' starts a Ray instance on this machine (workers import this checkout); 'auto' joins the
cluster this machine belongs to; 'ray://host:10001' connects as a Ray client. Every node of a cluster needs the
same slimformer installed, and run folders and the cache on storage the nodes share (docs/registry.md).
"""

from __future__ import annotations

import os
from pathlib import Path


def fan_out(fn, jobs: list[tuple], ray: str | None = None, cpus: float = 1, on_error=None) -> list:
    """[fn(*job) for job in jobs]. With `ray`, a task whose worker is lost gives on_error(job, error) (raised when
    on_error is None); an exception raised by fn itself is re-raised as it was."""
    if ray is None:
        return [fn(*job) for job in jobs]
    import ray as ray_lib

    started = _connect(ray_lib, ray)
    try:
        task = ray_lib.remote(num_cpus=cpus, max_retries=0)(fn)
        refs = [task.remote(*job) for job in jobs]
        results = []
        for job, ref in zip(jobs, refs):
            try:
                results.append(ray_lib.get(ref))
            except ray_lib.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None
            except ray_lib.exceptions.RayError as e:
                if on_error is None:
                    raise
                results.append(on_error(job, e))
        return results
    finally:
        if started:
            ray_lib.shutdown()


def _connect(ray_lib, address: str) -> bool:
    """Connect unless this process already is; True when we connected (and so disconnect after)."""
    if ray_lib.is_initialized():
        return False
    if address == "local":
        checkout = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH")) if p)
        ray_lib.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    else:
        ray_lib.init(address=address)
    return True

"""Running the self-contained runner on a target: this host, an emulated arm64 core, or a device over SSH.

`run_on_target` copies ort_runner.py with the model and its inputs to the target, runs it under a time limit
(killing the whole process group when it overruns), reads the JSON result and parity trace back, and always
removes what it copied. Judging the figures is `pipeline.measure.judge`'s job.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np

from ..config.targets import ROOT_MARKER, SSH_ENV, ArmEmulatedTarget, HostTarget, SshTarget
from ..errors import SlimformerError

RUNNER = Path(__file__).with_name("ort_runner.py")
ROOT_PYTHON = "/opt/venv/bin/python3"
ROOT_QEMU = "/usr/bin/qemu-aarch64-static"
EMULATED_TIMING = "emulated (not meaningful)"
# Printed by the target's python before any run: versions, and the CPU features QEMU or the board exposes
# (AT_HWCAP bits 9 fphp, 20 asimddp, 22 sve; AT_HWCAP2 bit 13 i8mm), read from the auxiliary vector.
PROBE = r"""
import json, platform, sys
try:
    import numpy, onnxruntime
except ImportError as e:
    print(json.dumps({"missing": str(e)}))
    sys.exit(0)
info = {"python": platform.python_version(), "machine": platform.machine(),
        "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}
if info["machine"] == "aarch64" and sys.platform.startswith("linux"):
    import ctypes
    aux = ctypes.CDLL(None).getauxval
    aux.restype, aux.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    hw, hw2 = aux(16), aux(26)
    bits = (("fphp", hw, 9), ("asimddp", hw, 20), ("sve", hw, 22), ("i8mm", hw2, 13))
    info["features"] = [name for name, word, bit in bits if word >> bit & 1]
print(json.dumps(info))
"""


class TargetError(SlimformerError):
    """A target could not run the model. `reason` is one of: config, unreachable, auth, missing-packages,
    not-built, wrong-cpu, timeout, runner-failed, copy-failed."""

    def __init__(self, target: str, reason: str, message: str):
        self.target, self.reason = target, reason
        super().__init__(f"target '{target}': {message}")


def resolve_ssh(target: SshTarget, environ=None) -> SshTarget:
    """A copy with unset connection fields taken from the SLIMFORMER_SSH_* environment variables."""
    env = os.environ if environ is None else environ
    update = {k: env[var] for k, var in SSH_ENV.items() if getattr(target, k) is None and env.get(var)}
    if "port" in update:
        if not update["port"].isdigit():
            raise TargetError(target.name, "config", f"{SSH_ENV['port']}={update['port']!r} is not a port number")
        update["port"] = int(update["port"])
    resolved = target.model_copy(update=update)
    if not resolved.host:
        raise TargetError(target.name, "config", f"no host; set `host:` in the recipe or {SSH_ENV['host']}")
    return resolved


def _exec(cmd: list[str], timeout: float, target: str, step: str, stdin: str | None = None):
    """Run `cmd` in its own process group; on time-out kill that group (never hang) and raise."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise TargetError(target, "timeout", f"{step} took over {timeout:g} s and was stopped; raise the "
                          "target's timeout_s or lower its perplexity_windows / the number of flags") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _model_files(onnx_path: Path) -> list[Path]:
    extra = [onnx_path.with_name(onnx_path.name + s) for s in ("_data", ".data")]
    return [onnx_path, *(p for p in extra if p.is_file())]


def _target_inputs(target, inputs_npz: Path, workdir: Path) -> Path:
    """The inputs cut to the target's perplexity slice (first windows, first tokens of each)."""
    with np.load(inputs_npz) as data:
        if "windows" not in data:
            return inputs_npz
        cut = data["windows"][:target.perplexity_windows, :target.perplexity_tokens]
        if cut.shape == data["windows"].shape:
            return inputs_npz
        arrays = {k: data[k] for k in data.files}
    arrays["windows"] = cut
    path = workdir / f"{target.name}.inputs.npz"
    np.savez(path, **arrays)
    return path


def _runner_args(model: str, out: str, inputs: str, threads: int, flags: list[str]) -> list[str]:
    return [model, "--out", out, "--inputs", inputs, "--threads", str(threads), *flags]


def _check_runner(proc, target: str, where: str) -> None:
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise TargetError(target, "runner-failed", f"ort_runner.py exited with {proc.returncode} {where}:\n{tail}")


def _probe_info(proc, target: str, python: str, where: str) -> dict:
    from importlib.metadata import version

    lines = proc.stdout.strip().splitlines()
    try:
        info = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise TargetError(target, "missing-packages", f"`{python}` did not run {where} (exit {proc.returncode}): "
                          f"{proc.stderr.strip()[-500:]}; install Python 3 there or point `python` at it") from None
    if "missing" in info:
        raise TargetError(target, "missing-packages", f"`{python}` {where} cannot import them ({info['missing']}); "
                          f"install onnxruntime=={version('onnxruntime')} numpy on the target "
                          f"(`{python} -m pip install onnxruntime=={version('onnxruntime')} numpy`)")
    return info


def _run_host(target: HostTarget, onnx_path: Path, inputs: Path, workdir: Path, threads: int, flags):
    out = workdir / f"{target.name}.json"
    cmd = [sys.executable, str(RUNNER), *_runner_args(str(onnx_path), str(out), str(inputs), threads, flags)]
    _check_runner(_exec(cmd, target.timeout_s, target.name, "the runner"), target.name, "on the host")
    return json.loads(out.read_text()), {"timing": "real"}


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)  # a 500 MB model: a hard link when the root shares the filesystem
    except OSError:
        shutil.copy2(src, dest)


def _run_emulated(target: ArmEmulatedTarget, onnx_path: Path, inputs: Path, workdir: Path, threads: int, flags):
    root = target.resolved_root()
    if not (root / ROOT_MARKER).is_file():
        raise TargetError(target.name, "not-built", f"no arm64 root at {root}; run `make arm-root` "
                          "(scripts/build_arm_root.sh: needs root, about 5 minutes and 450 MB)")
    if os.geteuid() != 0:
        raise TargetError(target.name, "config", "running in the arm64 root needs chroot; run as root")
    job = Path("/work") / f"job-{uuid.uuid4().hex[:12]}"
    inside = root / job.relative_to("/")
    inside.mkdir(parents=True)
    try:
        for f in [RUNNER, inputs, *_model_files(onnx_path)]:
            _link_or_copy(f, inside / f.name)
        # The core is chosen on qemu's command line, not through QEMU_CPU and binfmt, and checked below.
        qemu = ["chroot", str(root), ROOT_QEMU, "-cpu", target.cpu, ROOT_PYTHON]
        probe = _exec([*qemu, "-"], min(600, target.timeout_s), target.name, "the probe", stdin=PROBE)
        info = _probe_info(probe, target.name, ROOT_PYTHON, f"in {root}")
        want = {"asimddp": target.cpu != "cortex-a53", "sve": target.cpu == "max"}
        if any((f in info.get("features", [])) != on for f, on in want.items()):
            raise TargetError(target.name, "wrong-cpu", f"QEMU was asked for {target.cpu} but the guest sees "
                              f"features {info.get('features')}; check qemu-aarch64-static in {root}")
        args = _runner_args(str(job / onnx_path.name), str(job / "result.json"), str(job / inputs.name), threads, flags)
        proc = _exec([*qemu, str(job / RUNNER.name), *args], target.timeout_s, target.name, "the emulated runner")
        _check_runner(proc, target.name, f"under QEMU {target.cpu}")
        out = workdir / f"{target.name}.json"
        shutil.copy2(inside / "result.json", out)
        if (inside / "result.trace.npz").is_file():
            shutil.copy2(inside / "result.trace.npz", out.with_name(out.stem + ".trace.npz"))
    finally:
        shutil.rmtree(inside, ignore_errors=True)
    return json.loads(out.read_text()), {"timing": EMULATED_TIMING, "cpu": target.cpu, **info}


def _ssh_base(t: SshTarget, workdir: Path, port_flag: str) -> list[str]:
    opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={t.connect_timeout_s}", "-o", "ServerAliveInterval=15",
            "-o", "ServerAliveCountMax=3", "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={workdir / 'known_hosts'}", "-o", "LogLevel=ERROR", port_flag, str(t.port or 22)]
    if t.key_file is not None:
        opts += ["-i", str(Path(t.key_file).expanduser()), "-o", "IdentitiesOnly=yes"]
    return opts


def _ssh_failure(t: SshTarget, proc, step: str) -> TargetError:
    err = proc.stderr.strip()
    where = f"{t.user + '@' if t.user else ''}{t.host}:{t.port or 22}"
    if "Permission denied (" in err or "Too many authentication failures" in err:
        key = t.key_file or "ssh's default keys"
        return TargetError(t.name, "auth", f"{where} refused the login ({err[-300:]}); add the public half of "
                           f"{key} to ~/.ssh/authorized_keys of {t.user or 'the login user'} there, or set "
                           f"`key_file`/`user` ({SSH_ENV['key_file']}, {SSH_ENV['user']})")
    if proc.returncode == 255:
        return TargetError(t.name, "unreachable", f"cannot reach {where} ({err[-300:]}); check that the machine "
                           f"is on and runs sshd, and `host`/`port` ({SSH_ENV['host']}, {SSH_ENV['port']})")
    return TargetError(t.name, "copy-failed", f"{step} failed (exit {proc.returncode}): {err[-500:]}")


def _run_ssh(target: SshTarget, onnx_path: Path, inputs: Path, workdir: Path, threads: int, flags):
    t = resolve_ssh(target)
    dest = f"{t.user + '@' if t.user else ''}{t.host}"
    ssh = ["ssh", *_ssh_base(t, workdir, "-p"), dest]
    job = f"{t.remote_dir.rstrip('/')}/job-{uuid.uuid4().hex[:12]}"
    python = t.python or "python3"

    def remote(command: str, step: str, timeout: float, stdin: str | None = None):
        proc = _exec([*ssh, command], timeout, t.name, step, stdin)
        if proc.returncode == 255:  # ssh's own failure; the remote command's codes pass through
            raise _ssh_failure(t, proc, step)
        return proc

    def scp(sources: list[str], target_path: str, step: str):
        proc = _exec(["scp", "-q", *_ssh_base(t, workdir, "-P"), *sources, target_path], t.timeout_s, t.name, step)
        if proc.returncode != 0:
            raise _ssh_failure(t, proc, step)

    probe = remote(f"mkdir -p {shlex.quote(job)} && {python} -", "the probe", 3 * t.connect_timeout_s + 60, PROBE)
    try:  # from here on the job folder exists and is removed whatever happens
        info = _probe_info(probe, t.name, python, f"on {t.host}")
        scp([str(f) for f in [RUNNER, inputs, *_model_files(onnx_path)]], f"{dest}:{job}/", "copying the model")
        args = " ".join(map(shlex.quote, _runner_args(onnx_path.name, "result.json", inputs.name, threads, flags)))
        run = f"{python} {RUNNER.name} {args}"
        # The remote `timeout` ends the run if the connection dies (ssh gives no SIGHUP without a tty).
        limit = f"{int(t.timeout_s) + 1}"
        command = (f"cd {shlex.quote(job)} && if command -v timeout >/dev/null 2>&1; "
                   f"then exec timeout -k 10 {limit} {run}; else exec {run}; fi")
        proc = remote(command, "the remote runner", t.timeout_s + 30)
        if proc.returncode == 124:
            raise TargetError(t.name, "timeout", f"the remote runner took over {limit} s and was stopped; raise "
                              "the target's timeout_s or lower its perplexity_windows")
        _check_runner(proc, t.name, f"on {t.host}")
        wanted = ["result.json", *(["result.trace.npz"] if "--trace" in flags else [])]
        scp([f"{dest}:{job}/{name}" for name in wanted], str(workdir) + "/", "copying the results back")
    finally:
        try:
            remote(f"rm -rf {shlex.quote(job)}", "clean-up", 3 * t.connect_timeout_s)
        except TargetError:
            pass  # best effort: the result (or the error being raised) matters more
    out = workdir / f"{t.name}.json"
    os.replace(workdir / "result.json", out)
    if (workdir / "result.trace.npz").is_file():
        os.replace(workdir / "result.trace.npz", out.with_name(out.stem + ".trace.npz"))
    return json.loads(out.read_text()), {"timing": "real", **info}


_RUNNERS = {"host": _run_host, "arm64-emulated": _run_emulated, "ssh": _run_ssh}


def run_on_target(target, onnx_path: Path, inputs_npz: Path, workdir: Path, threads: int,
                  flags: list[str]) -> dict:
    """Run ort_runner.py on `target`; return its JSON result plus `target` (name, kind, timing, versions,
    CPU features) and, with --trace, trace.logits [steps + 1, batch, vocab] and trace.tokens as arrays.
    Files written to `workdir`: <name>.json, <name>.trace.npz (and known_hosts for ssh)."""
    onnx_path, workdir = Path(onnx_path).resolve(), Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = _target_inputs(target, Path(inputs_npz), workdir)
    result, info = _RUNNERS[target.kind](target, onnx_path, inputs, workdir, threads, list(flags))
    result["target"] = {"name": target.name, "kind": target.kind, **info}
    result["timing"] = info["timing"]
    if "latency" in result:
        result["latency"]["timing"] = info["timing"]
    if "trace" in result:
        npz = workdir / f"{target.name}.trace.npz"
        with np.load(npz) as data:
            result["trace"].update(npz=str(npz), logits=data["logits"], tokens=data["tokens"])
    return result

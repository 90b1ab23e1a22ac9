"""Validation targets: config blocks, judge() gates, the host run, SSH against a real loopback sshd, and
(slow, when the arm64 root is built) emulated cortex-a53 / cortex-a76 runs, all compared with the host."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from conftest import left_padded_batch, tiny_model
from pipeline.config.targets import ROOT_MARKER, ArmEmulatedTarget, HostTarget, SshTarget, Target, host_counterpart
from pipeline.config.checks import target_problems
from pipeline.measure.judge import judge
from pipeline.measure.transports import TargetError, resolve_ssh, run_on_target

TARGETS = TypeAdapter(list[Target])
FLAGS = ["--perplexity", "--trace", "--latency", "--prefill-tokens", "8", "--decode-context", "16",
         "--decode-steps", "4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(onnx path, inputs.npz, PyTorch reference trace) for a tiny llama with attention layer 1 dropped."""
    from pipeline.export.onnx import export_onnx
    from pipeline.measure.ort_runner import save_inputs
    from pipeline.model.prune import drop_sublayers
    from pipeline.measure.reference import torch_greedy_trace

    root = tmp_path_factory.mktemp("tiny")
    model = drop_sublayers(tiny_model("llama"), attention=[1], mlp=[])
    export = export_onnx(model, root / "onnx")
    ids, mask = left_padded_batch(lengths=(9, 5, 7))
    windows = np.random.default_rng(0).integers(3, 256, (3, 32))
    inputs = root / "inputs.npz"
    save_inputs(inputs, windows=windows, trace_input_ids=ids.numpy(), trace_attention_mask=mask.numpy(),
                trace_steps=4)
    reference, _ = torch_greedy_trace(model, ids, mask, steps=4)
    return export.path, inputs, reference


@pytest.fixture(scope="module")
def host_run(tiny, tmp_path_factory):
    onnx, inputs, _ = tiny
    return run_on_target(HostTarget(kind="host"), onnx, inputs, tmp_path_factory.mktemp("host"), 1, FLAGS)


# --- config --------------------------------------------------------------------------------------------


def test_targets_parse_by_kind_and_round_trip():
    data = [{"kind": "host"},
            {"kind": "arm64-emulated", "cpu": "cortex-a53",
             "variant_tolerances": {"int4": {"max_abs_logit_error": 2.0}}},
            {"kind": "ssh", "name": "pixel", "host": "10.0.0.7", "user": "u0", "key_file": "~/.ssh/id_ed25519"}]
    targets = TARGETS.validate_python(data)
    assert [type(t) for t in targets] == [HostTarget, ArmEmulatedTarget, SshTarget]
    assert targets[1].name == "arm64-cortex-a53" and targets[1].perplexity_windows == 2
    assert TARGETS.validate_python(TARGETS.dump_python(targets, mode="json")) == targets
    assert target_problems(targets) == []
    assert "name 'host' is used 2 times" in target_problems([targets[0], targets[0]])[0]


def test_unknown_key_and_unknown_cpu_are_rejected():
    with pytest.raises(ValidationError, match="hots"):
        TARGETS.validate_python([{"kind": "ssh", "hots": "x"}])
    with pytest.raises(ValidationError, match="cortex-a76"):
        TARGETS.validate_python([{"kind": "arm64-emulated", "cpu": "cortex-a55"}])


def test_variant_override_changes_only_what_it_names():
    t = ArmEmulatedTarget(kind="arm64-emulated", tolerances={"min_top1_agreement": 0.9},
                          variant_tolerances={"int4": {"max_abs_logit_error": 2.0}})
    assert t.tolerances_for("fp32") == t.tolerances
    int4 = t.tolerances_for("int4")
    assert (int4.max_abs_logit_error, int4.min_top1_agreement) == (2.0, 0.9)


def test_ssh_fields_come_from_the_environment_when_unset():
    env = {"SLIMFORMER_SSH_HOST": "board", "SLIMFORMER_SSH_PORT": "2222", "SLIMFORMER_SSH_USER": "me",
           "SLIMFORMER_SSH_KEY": "/k", "SLIMFORMER_SSH_PYTHON": "/opt/py"}
    t = resolve_ssh(SshTarget(kind="ssh", user="recipe-user"), env)
    assert (t.host, t.port, t.user, str(t.key_file), t.python) == ("board", 2222, "recipe-user", "/k", "/opt/py")
    with pytest.raises(TargetError, match="SLIMFORMER_SSH_HOST") as e:
        resolve_ssh(SshTarget(kind="ssh"), {})
    assert e.value.reason == "config"


# --- judge -----------------------------------------------------------------------------------------------


def _fake(reference, shift=0.0, ppl=20.0, tokens=100):
    return {"trace": {"logits": np.stack(reference) + shift}, "perplexity": {"perplexity": ppl, "tokens": tokens}}


def test_judge_passes_within_tolerance_and_fails_beyond(tiny):
    reference = tiny[2]
    t = HostTarget(kind="host", tolerances={"max_abs_logit_error": 0.1, "max_perplexity_diff_pct": 1.0,
                                            "max_rel_diff_vs_host": None})
    ok = judge(t, "fp32", _fake(reference), _fake(reference, 0.05, ppl=20.1), reference)
    assert [g.name for g in ok] == ["max_abs_logit_error", "min_top1_agreement", "max_perplexity_diff_pct"]
    assert all(g.passed for g in ok) and {g.target for g in ok} == {"host"}
    bad = {g.name: g for g in judge(t, "fp32", _fake(reference), _fake(reference, 0.5, ppl=19.0), reference)}
    assert not bad["max_abs_logit_error"].passed and bad["max_abs_logit_error"].value == pytest.approx(0.5)
    assert not bad["max_perplexity_diff_pct"].passed and bad["max_perplexity_diff_pct"].value == pytest.approx(5)
    assert bad["min_top1_agreement"].passed  # a uniform shift keeps every argmax


def test_judge_gates_logits_against_the_host_running_the_same_file(tiny):
    """A kernel that computes differently on the target's core fails even where PyTorch parity is loose."""
    reference = tiny[2]
    scale = float(np.abs(np.stack(reference) + 1.0).max())  # the host's largest logit
    t = HostTarget(kind="host", tolerances={"max_abs_logit_error": None, "min_top1_agreement": None,
                                            "max_perplexity_diff_pct": None, "max_rel_diff_vs_host": 0.01})
    host = _fake(reference, 1.0)  # both far from PyTorch (a quantised file): that is not this gate's business
    [same] = judge(t, "int4", host, _fake(reference, 1.0 + 0.001 * scale), reference)
    assert same.name == "max_rel_diff_vs_host" and same.passed and same.value == pytest.approx(0.001, rel=0.01)
    [off] = judge(t, "int4", host, _fake(reference, 1.0 + 0.05 * scale), reference)
    assert not off.passed and off.value == pytest.approx(0.05, rel=0.01)
    loose = HostTarget.model_validate({**t.model_dump(), "variant_tolerances": {"int4": {"max_rel_diff_vs_host": 0.1}}})
    assert judge(loose, "int4", host, _fake(reference, 1.0 + 0.05 * scale), reference)[0].passed


def test_judge_top1_gate_and_variant_override(tiny):
    reference = tiny[2]
    flipped = _fake(reference)
    logits = flipped["trace"]["logits"]
    logits[0, 0, (logits[0, 0].argmax() + 1) % logits.shape[-1]] += 100.0  # one position picks another token
    t = HostTarget(kind="host", tolerances={"max_abs_logit_error": None, "max_perplexity_diff_pct": None,
                                            "max_rel_diff_vs_host": None},
                   variant_tolerances={"int4": {"min_top1_agreement": 0.9}})
    [fp32] = judge(t, "fp32", _fake(reference), flipped, reference)
    assert fp32.name == "min_top1_agreement" and not fp32.passed and fp32.value < 1
    assert judge(t, "int4", _fake(reference), flipped, reference)[0].passed


def test_judge_refuses_perplexities_over_different_windows(tiny):
    reference = tiny[2]
    with pytest.raises(ValueError, match="same windows"):
        judge(HostTarget(kind="host"), "fp32", _fake(reference, tokens=300), _fake(reference, tokens=62), reference)


# --- host and emulated arm64 ---------------------------------------------------------------------------


def test_host_run_matches_pytorch(host_run, tiny):
    assert host_run["timing"] == host_run["latency"]["timing"] == "real"
    assert host_run["trace"]["logits"].shape == (5, 3, 256) and host_run["kv_layers"] == 3
    gates = judge(HostTarget(kind="host"), "fp32", host_run, host_run, tiny[2])
    assert len(gates) == 4 and all(g.passed for g in gates), gates


def test_missing_arm_root_says_how_to_build_it(tiny, tmp_path):
    t = ArmEmulatedTarget(kind="arm64-emulated", root=tmp_path / "nowhere")
    with pytest.raises(TargetError, match="make arm-root") as e:
        run_on_target(t, tiny[0], tiny[1], tmp_path, 1, ["--trace"])
    assert e.value.reason == "not-built" and "arm64-cortex-a76" in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ["cortex-a53", "cortex-a76"])
def test_emulated_arm64_matches_host(cpu, tiny, tmp_path):
    target = ArmEmulatedTarget(kind="arm64-emulated", cpu=cpu, timeout_s=900)
    if not (target.resolved_root() / ROOT_MARKER).is_file() or os.geteuid() != 0:
        pytest.skip(f"no arm64 root at {target.resolved_root()} (build it with `make arm-root`, as root)")
    onnx, inputs, reference = tiny
    arm = run_on_target(target, onnx, inputs, tmp_path / "arm", 1, FLAGS)
    host = run_on_target(host_counterpart(target), onnx, inputs, tmp_path / "host", 1, FLAGS)
    assert arm["machine"] == "aarch64" and arm["timing"] == arm["latency"]["timing"] == "emulated (not meaningful)"
    assert ("asimddp" in arm["target"]["features"]) == (cpu == "cortex-a76")
    assert arm["perplexity"]["tokens"] == host["perplexity"]["tokens"] == 2 * 31
    gates = judge(target, "fp32", host, arm, reference)
    assert len(gates) == 4 and all(g.passed for g in gates), gates
    np.testing.assert_array_equal(arm["trace"]["tokens"], host["trace"]["tokens"])


# --- ssh against a real OpenSSH server on loopback -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An sshd on 127.0.0.1 accepting one generated key for the current user; stopped at teardown."""
    exe = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/sbin/sshd") if os.path.exists(p)), None)
    if exe is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH server or client not installed (apt-get install -y openssh-server openssh-client)")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir, made at boot
    d = tmp_path_factory.mktemp("sshd")
    key = _keygen(d / "client_key")
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {_keygen(d / 'host_key')}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "StrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\n")
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([exe, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip(f"sshd did not start: {(d / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.2)
    yield {"port": port, "key": key, "dir": d, "user": getpass.getuser()}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def _ssh_target(sshd, **fields) -> SshTarget:
    base = dict(kind="ssh", host="127.0.0.1", port=sshd["port"], user=sshd["user"], key_file=sshd["key"],
                python=sys.executable, remote_dir=str(sshd["dir"] / "remote"), timeout_s=120)
    return SshTarget(**{**base, **fields})


def test_ssh_run_matches_host(sshd, tiny, host_run, tmp_path, monkeypatch):
    for field, value in (("HOST", "127.0.0.1"), ("PORT", str(sshd["port"])), ("USER", sshd["user"]),
                         ("KEY", str(sshd["key"])), ("PYTHON", sys.executable)):
        monkeypatch.setenv(f"SLIMFORMER_SSH_{field}", value)
    target = SshTarget(kind="ssh", name="loopback", remote_dir=str(sshd["dir"] / "remote"), timeout_s=120)
    result = run_on_target(target, tiny[0], tiny[1], tmp_path, 1, FLAGS)
    assert result["target"]["name"] == "loopback" and result["timing"] == "real"
    np.testing.assert_array_equal(result["trace"]["logits"], host_run["trace"]["logits"])
    assert result["perplexity"] == host_run["perplexity"]
    assert all(g.passed for g in judge(target, "fp32", host_run, result, tiny[2]))
    assert list((sshd["dir"] / "remote").iterdir()) == []  # the remote job folder was removed
    assert "ssh-ed25519" in (tmp_path / "known_hosts").read_text()  # accept-new wrote it, not ~/.ssh


def test_ssh_unreachable_port_fails_fast(tiny, tmp_path):
    target = SshTarget(kind="ssh", host="127.0.0.1", port=_free_port(), connect_timeout_s=5)
    start = time.monotonic()
    with pytest.raises(TargetError, match="cannot reach 127.0.0.1") as e:
        run_on_target(target, tiny[0], tiny[1], tmp_path, 1, ["--trace"])
    assert e.value.reason == "unreachable" and time.monotonic() - start < 5


def test_ssh_wrong_key_is_an_auth_error(sshd, tiny, tmp_path):
    target = _ssh_target(sshd, key_file=_keygen(tmp_path / "other_key"))
    with pytest.raises(TargetError, match="refused the login") as e:
        run_on_target(target, tiny[0], tiny[1], tmp_path, 1, ["--trace"])
    assert e.value.reason == "auth"


def test_ssh_python_without_onnxruntime_says_what_to_install(sshd, tiny, tmp_path):
    # -S: no site-packages, so the venv's onnxruntime and numpy are out of reach, like a bare system python.
    target = _ssh_target(sshd, python=f"{sys.executable} -S")
    with pytest.raises(TargetError, match=r"install onnxruntime==1\.32\.0 numpy on the target") as e:
        run_on_target(target, tiny[0], tiny[1], tmp_path, 1, ["--trace"])
    assert e.value.reason == "missing-packages"


def test_ssh_missing_python_is_named(sshd, tiny, tmp_path):
    target = _ssh_target(sshd, python="/nonexistent/python3")
    with pytest.raises(TargetError, match="`/nonexistent/python3` did not run on 127.0.0.1") as e:
        run_on_target(target, tiny[0], tiny[1], tmp_path, 1, ["--trace"])
    assert e.value.reason == "missing-packages"


def test_ssh_runner_time_out_names_the_target(sshd, tiny, tmp_path):
    slow = tmp_path / "slow-python"  # passes the probe, then hangs in place of the runner
    slow.write_text(f'#!/bin/sh\nif [ "$1" = "-" ]; then exec {sys.executable} "$@"; fi\nexec sleep 300\n')
    slow.chmod(0o755)
    target = _ssh_target(sshd, name="slowboard", python=str(slow), timeout_s=3)
    start = time.monotonic()
    with pytest.raises(TargetError, match="target 'slowboard'.*took over") as e:
        run_on_target(target, tiny[0], tiny[1], tmp_path, 1, ["--trace"])
    assert e.value.reason == "timeout" and time.monotonic() - start < 60
    assert list((sshd["dir"] / "remote").iterdir()) == []

"""The peers' own environments, made once under home()/peers and kept: never installed into slimformer's venv.

llama.cpp: the tools (`llama-bench`, `llama-perplexity`, `llama-quantize`) built from the sources vendored in
the pinned `llama-cpp-python` sdist, static and for this CPU (`GGML_NATIVE`), only the binaries kept. The
onnxruntime-genai model builder: a venv of its own, every package pinned (it needs transformers 5; slimformer
pins 4.57). Each entry is keyed by what makes it and written through `staged_folder`, so it is whole or absent.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ..config.paths import home
from ..errors import SlimformerError
from ..model.assets import PackagedAsset, pip_download, verify_sha256
from ..rundir import sha256_json, staged_folder

LLAMA_SDIST = PackagedAsset(
    name="llama-cpp-python-0.3.36", requirement="llama-cpp-python==0.3.36",
    sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    pip_args=("--no-binary", ":all:"), error=SlimformerError,
)
LLAMA_TOOLS = ("llama-bench", "llama-perplexity", "llama-quantize")
# No AMX even where the CPU has it: ggml's AMX matmul crashed (SIGSEGV) in the VMs these benches run in, and
# phones have none; the AVX-512 / AVX2 kernels and weight repacking stay.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
LLAMA_CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                     "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={NO_AMX}",
                     f"-DCMAKE_CXX_FLAGS={NO_AMX}")
BUILD_JOBS = 2


def peers_home() -> Path:
    return home() / "peers"


def cpu_key() -> str:
    """A short hash of this CPU's feature flags: GGML_NATIVE binaries run only where these flags are."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def _run_logged(cmd: list[str], log: Path, cwd: Path | None = None, what: str = "") -> None:
    """Run `cmd` at the lowest CPU priority (the machine is shared) with its output appended to `log`."""
    with open(log, "a") as sink:
        sink.write(f"$ {' '.join(cmd)}\n")
        sink.flush()
        proc = subprocess.run(["nice", "-n", "19", *cmd], cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2500:]
        raise SlimformerError(f"{what or cmd[0]} failed (exit {proc.returncode}); the end of {log}:\n{tail}")


def llama_cpp_dir() -> Path:
    key = sha256_json({"sdist": LLAMA_SDIST.sha256, "flags": LLAMA_CMAKE_FLAGS, "tools": LLAMA_TOOLS,
                       "cpu": cpu_key()})
    return peers_home() / f"llama.cpp-{LLAMA_SDIST.name}-{key[:12]}"


def ensure_llama_cpp() -> Path:
    """Folder holding bin/<tool> for LLAMA_TOOLS and build.json; built on first use (about 21 min on 2 cores)."""
    final = llama_cpp_dir()
    if (final / "build.json").is_file():
        return final
    peers_home().mkdir(parents=True, exist_ok=True)
    with staged_folder(final) as work, tempfile.TemporaryDirectory(dir=peers_home(), prefix=".llama-build-") as tmp:
        tmp, start = Path(tmp), time.time()
        sdist = pip_download(LLAMA_SDIST, tmp)
        verify_sha256(sdist, LLAMA_SDIST.sha256, SlimformerError)
        source = _extract_vendored(sdist, tmp / "src")
        log = tmp / "build.log"  # only the binaries are kept; a failure shows the end of the log
        _run_logged(["cmake", "-S", str(source), "-B", str(tmp / "build"), *LLAMA_CMAKE_FLAGS], log,
                    what="cmake configure of llama.cpp")
        _run_logged(["cmake", "--build", str(tmp / "build"), f"-j{BUILD_JOBS}", "--target", *LLAMA_TOOLS], log,
                    what="cmake build of llama.cpp")
        (work / "bin").mkdir()
        for tool in LLAMA_TOOLS:
            shutil.copy2(tmp / "build" / "bin" / tool, work / "bin" / tool)
        (work / "build.json").write_text(json.dumps({
            "sdist": sdist.name, "sha256": LLAMA_SDIST.sha256, "cmake_flags": LLAMA_CMAKE_FLAGS,
            "tools": LLAMA_TOOLS, "build_seconds": round(time.time() - start), "cpu_key": cpu_key()}, indent=2))
    return final


def _extract_vendored(sdist: Path, dest: Path) -> Path:
    """Extract only `vendor/llama.cpp` from the sdist; return its folder."""
    with tarfile.open(sdist, "r:gz") as tf:
        members = [m for m in tf.getmembers() if m.name.split("/", 1)[-1].startswith("vendor/llama.cpp/")]
        if not members:
            raise SlimformerError(f"{sdist.name} has no vendor/llama.cpp folder; the pinned sdist changed?")
        tf.extractall(dest, members=members, filter="data")
    return dest / members[0].name.split("/", 1)[0] / "vendor" / "llama.cpp"


def llama_tool(name: str) -> Path:
    return ensure_llama_cpp() / "bin" / name


# Everything `pip install` put into the builder's venv (Python 3.11, x86_64), pinned, so the venv is the same
# wherever it is made; the first four are what the builder needs, the rest their dependencies.
BUILDER_PINS = (
    "onnxruntime-genai==0.18.0", "onnxruntime==1.32.0", "transformers==5.24.0", "torch==2.13.0",
    "onnx==1.23.2", "onnx-ir==1.1.0", "numpy==2.4.6", "protobuf==7.36.2", "flatbuffers==25.12.19",
    "sympy==1.14.0", "mpmath==1.3.0", "networkx==3.6.1", "filelock==4.3.1", "fsspec==2026.9.0", "Jinja2==3.1.6",
    "MarkupSafe==3.0.4", "typing_extensions==4.16.0", "huggingface_hub==2.4.0", "hf-xet==1.8.0",
    "tokenizers==0.23.3", "safetensors==0.8.0", "regex==2026.11.19", "PyYAML==6.0.4", "packaging==26.4",
    "tqdm==4.70.1", "httpx2==2.16.2", "httpcore2==2.16.2", "h11==0.16.0", "anyio==4.16.0", "idna==3.20",
    "truststore==0.10.5", "typer==0.29.2", "click==8.5.1", "rich==15.0.0", "markdown-it-py==4.3.0",
    "mdurl==0.1.2", "Pygments==2.21.0", "shellingham==1.5.4", "annotated-doc==0.0.7", "pydantic==2.14.4",
    "pydantic_core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5", "ml_dtypes==0.6.0",
    "setuptools==84.2.1",
)


def builder_env_dir() -> Path:
    key = sha256_json({"pins": BUILDER_PINS, "python": platform.python_version(), "machine": platform.machine()})
    return peers_home() / f"genai-builder-0.18.0-{key[:12]}"


def ensure_builder_env() -> Path:
    """The builder venv's python, made on first use (about 3 minutes). It is always run as `python -m ...`:
    the venv is made under a temporary name and renamed, which breaks its scripts' shebang lines only."""
    final = builder_env_dir()
    python = final / "bin" / "python"
    if (final / "pins.txt").is_file():
        return python
    with staged_folder(final) as work:
        start = time.time()
        # sys.executable may itself be a venv's python: venv then uses the base interpreter, without our packages.
        _run_logged([sys.executable, "-m", "venv", str(work)], work / "install.log", what="making the builder venv")
        _run_logged([str(work / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                     *BUILDER_PINS], work / "install.log", what="installing onnxruntime-genai's model builder")
        (work / "build.json").write_text(json.dumps({"seconds": round(time.time() - start)}))
        (work / "pins.txt").write_text("\n".join(BUILDER_PINS) + "\n")
    return python

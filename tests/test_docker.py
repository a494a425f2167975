"""The container recipe agrees with the project: same pinned requirements, upstream's mounts.

``launch_container.sh`` is run for real with a stub ``docker`` on PATH that records its
arguments, so the mounts checked are the ones the script would pass.
"""
from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MOUNTS = {"/src": "repo", "/storage": "OUTPUT", "/pretrain": "PRETRAIN", "/txt": "TXT",
          "/video": "VIDEO"}


def pins(path: Path) -> dict:
    """package -> full requirement line, comments and blanks skipped."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out[re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower()] = line
    return out


def test_dockerfile_installs_the_pinned_requirements():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^COPY requirements\.txt (\S+)$", dockerfile, re.M)
    dest = re.search(r"^COPY requirements\.txt (\S+)$", dockerfile, re.M).group(1)
    assert re.search(rf"pip install .*-r {re.escape(dest)}", dockerfile)
    torch_pin = pins(REPO / "requirements.txt")["torch"]
    version = torch_pin.split("==", 1)[1]
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and version in base, (base, torch_pin)
    assert "openjdk" in dockerfile                      # METEOR / PTB tokenizer need Java
    dev = (REPO / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in dev                 # `make` installs the same pins


def run_launcher(tmp_path: Path, *extra: str) -> list:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "docker_args"
    stub = bin_dir / "docker"
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{log}"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    dirs = [str(tmp_path / d) for d in ("TXT", "VIDEO", "OUTPUT", "PRETRAIN")]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    subprocess.run(["bash", str(REPO / "launch_container.sh"), *dirs, *extra], cwd=REPO,
                   env=env, check=True, timeout=30)
    return log.read_text().splitlines()


def mounts(args: list, tmp_path: Path) -> dict:
    """container path -> (host folder name, read-only?)."""
    out = {}
    for i, arg in enumerate(args):
        if arg == "--mount":
            fields = dict(f.split("=", 1) if "=" in f else (f, "") for f in args[i + 1].split(","))
            host = Path(fields["src"])
            name = "repo" if host == REPO else host.relative_to(tmp_path).as_posix()
            out[fields["dst"]] = (name, "readonly" in fields)
    return out


def test_launch_container_passes_bash_n():
    subprocess.run(["bash", "-n", str(REPO / "launch_container.sh")], check=True)


def test_launch_container_mounts_upstream_layout(tmp_path):
    args = run_launcher(tmp_path)
    got = mounts(args, tmp_path)
    assert {dst: name for dst, (name, _) in got.items()} == MOUNTS
    assert {dst for dst, (_, ro) in got.items() if ro} == {"/pretrain", "/txt", "/video"}
    assert '"device=all"' in args and "--ipc=host" in args and "-w" in args


def test_launch_container_prepro_makes_txt_writable(tmp_path):
    assert mounts(run_launcher(tmp_path, "--prepro"), tmp_path)["/txt"] == ("TXT", False)


def test_readme_names_the_mounted_folders():
    readme = (REPO / "README.md").read_text()
    launch = re.search(r"source launch_container\.sh (.+?)\n(?!\s{4,}\S)", readme, re.S)
    assert launch, "README lacks the `source launch_container.sh ...` command"
    for folder in ("txt_db", "video_db", "finetune", "pretrained"):
        assert f"/{folder}" in launch.group(1)
    used = set(re.findall(r"(?<![\w.$/])/(txt|video|storage|pretrain|src)/", readme))
    assert used and used <= {p.strip("/") for p in MOUNTS}, used

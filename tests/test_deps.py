"""`make test` on a fresh machine: tests/deps.sh checks for the system tools the
suite talks to (swaks, Postfix's smtp-sink/smtp-source) before pytest runs.

As root on Debian it installs what is missing; these tests only run it where
nothing needs installing, or as an unprivileged user (through setpriv when the
suite runs as root), where it must stop with one line saying what to install.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "deps.sh"


def run_deps(path: str, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    command = ["bash", str(SCRIPT)]
    if as_nobody and os.geteuid() == 0:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    env = {"PATH": path, "VENV": str(ROOT / ".venv"), "LANG": "C"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_nothing_missing_is_silent():
    result = run_deps(os.environ["PATH"])
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_a_missing_tool_stops_with_one_line_naming_the_package_and_the_command():
    # The machine's /usr/bin without swaks (smtp-sink stays: /usr/sbin is appended),
    # in a folder the unprivileged user can read (pytest's tmp_path is root's own).
    with tempfile.TemporaryDirectory() as folder:
        bin_dir = Path(folder)
        bin_dir.chmod(0o755)
        for tool in Path("/usr/bin").iterdir():
            if tool.name != "swaks":
                (bin_dir / tool.name).symlink_to(tool)
        result = run_deps(str(bin_dir), as_nobody=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        "make test needs swaks: install them with "
        "'sudo apt-get install --no-install-recommends swaks', or run make test as root on Debian\n")


def test_make_test_runs_the_check_before_the_suite():
    result = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    lines = result.stdout.splitlines()
    check = next(i for i, line in enumerate(lines) if "tests/deps.sh" in line)
    suite = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert check < suite
    assert 'PATH="$PATH:/usr/sbin:/sbin"' in lines[suite]  # smtp-sink for a normal user too

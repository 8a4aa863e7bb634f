"""Installing a system package that a group of tests needs (Debian/Ubuntu, as root): SLURM for the requeue
tests, bubblewrap for the sandbox's second backend.  CI's clean machines run as root with Debian's packages
reachable, so these tests run there rather than skip; elsewhere the caller turns the error into a skip."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Sequence


class NotInstallable(RuntimeError):
    """Not root, or no apt-get."""


class InstallFailed(RuntimeError):
    """apt-get ran and failed."""


def apt_install(packages: Sequence[str], missing: str, timeout: float = 600) -> None:
    """``apt-get install -y packages`` (after ``apt-get update`` when the package lists lack them); ``missing``
    says what is missing, for the errors."""
    pkgs = " ".join(packages)
    if os.geteuid() != 0:
        raise NotInstallable(f"{missing} and not root, so cannot apt-get install {pkgs}")
    if shutil.which("apt-get") is None:
        raise NotInstallable(f"{missing} and no apt-get to install {pkgs}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", *packages]

    def run(cmd):
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)

    if run(install).returncode == 0:
        return
    for cmd in (["apt-get", "update", "-qq"], install):
        r = run(cmd)
        if r.returncode != 0:
            raise InstallFailed(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout)[-2000:]}")

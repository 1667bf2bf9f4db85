"""Class-data sharing (AppCDS) for the local Kafka JVM: start it on ~40% less CPU.

A JVM spends most of the broker's start parsing and verifying classes from 46 jars. Java 17 can
dump the classes a run loaded into an archive (``-XX:ArchiveClassesAtExit``) and map that archive
into later runs (``-XX:SharedArchiveFile``). On our shared 2-core machines this took the broker's
CPU time until serving from about 5 s to about 3 s.

A damaged archive crashes the JVM (SIGBUS) instead of being ignored, so an archive is only taken
into use after the dumping JVM exited by itself and a probe JVM mapped it with ``-Xshare:on``;
it is renamed into place, so readers never see a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path


class ClassDataArchive:
    """The archive for one JDK and one jar directory, kept next to the jars."""

    def __init__(self, java: str, libs: Path) -> None:
        self.java = java
        self.classpath = str(libs / "*")
        # The archive is only valid for the exact JDK build that wrote it.
        real = Path(java).resolve()
        stat = real.stat()
        key = hashlib.sha256(f"{real}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        self.path = libs.parent / "cds" / f"classes-{key[:16]}.jsa"

    def jvm_options(self, pending: Path) -> list[str]:
        """Use the archive if there is one, else record this run's classes into ``pending``."""
        if self.path.exists():
            return [f"-XX:SharedArchiveFile={self.path}"]
        pending.unlink(missing_ok=True)
        return [f"-XX:ArchiveClassesAtExit={pending}"]

    def reader_options(self) -> list[str]:
        """For short-lived tools: use an existing archive, never dump one."""
        return [f"-XX:SharedArchiveFile={self.path}"] if self.path.exists() else []

    def adopt(self, pending: Path) -> bool:
        """After the dumping JVM exited cleanly: keep ``pending`` as the archive if it maps."""
        if not pending.exists():
            return False
        if self.path.exists():
            pending.unlink()
            return False
        probe = subprocess.run(
            [self.java, "-Xshare:on", f"-XX:SharedArchiveFile={pending}",
             "-XX:ErrorFile=/dev/null", "-cp", self.classpath, "-version"],
            capture_output=True, check=False, timeout=60,
        )
        if probe.returncode != 0:
            pending.unlink(missing_ok=True)
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Copy next to the target first: the data dir may be on another file system.
        staging = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        shutil.copyfile(pending, staging)
        os.replace(staging, self.path)
        pending.unlink()
        return True

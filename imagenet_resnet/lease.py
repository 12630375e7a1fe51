"""One training job per run folder: rank 0 holds `<run.out_dir>/lease.json`, renewed by a heartbeat.

A second job on the same folder (a double submission, a requeued Slurm job whose previous
allocation still runs) stops before touching anything, naming the holder. A holder that died
(SIGKILL, a lost node) stops renewing, and the next job takes over once the heartbeat has
not moved for `timeout_s`. That is judged by watching the file, not by comparing clocks, so
it holds on a filesystem shared by nodes whose clocks differ. On the holder's own host (same
hostname and PID namespace) a process that is gone is recognised at once: a restart under
torchrun or after a kill continues without waiting. A lease file that holds no lease record
(garbled, truncated, hand-edited) counts as stale: it is taken over once it has not changed for
`timeout_s`. One that cannot be read or replaced (a folder, a dangling link) stops the job with
one line. Where the filesystem has no hard links (vfat, some FUSE stores) the lease is created
with O_CREAT|O_EXCL instead.

    with hold_lease(Path("runs/x"), timeout_s=60) as lease:   # UserError if a live job holds it
        ...
        lease.check()          # before writing a checkpoint: is the folder still ours?
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from imagenet_resnet.errors import UserError
from imagenet_resnet.files import write_atomic, write_synced

LEASE = "lease.json"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _process_gone(pid: int) -> bool:
    """True if no process `pid` runs on this host (a zombie, killed but not yet reaped, is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


PID_MAX = 2**22  # Linux's largest PID


def parse_record(raw: bytes) -> dict[str, Any] | None:
    """A lease record from the file's bytes; None for anything else (not JSON, not UTF-8, not an
    object, no sensible PID)."""
    try:
        record = json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        return None
    if not isinstance(record, dict):
        return None
    pid = record.get("pid")
    return record if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < PID_MAX else None


def describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "a lease file that holds no lease record"
    job = f", Slurm job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')} PID {holder.get('pid')}{job}, since {holder.get('since')}"


class Lease:
    """The held lease: a daemon thread rewrites the file every timeout_s / 4 (atomically)."""

    def __init__(self, path: Path, timeout_s: float, created_folder: bool) -> None:
        self.path, self.timeout_s, self.created_folder = path, timeout_s, created_folder
        self.record = {
            "token": uuid.uuid4().hex, "host": socket.gethostname(), "pid_namespace": _pid_namespace(),
            "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID", ""),
            "since": datetime.now().astimezone().isoformat(timespec="seconds"), "beat": 0,
        }
        self.renewed = time.monotonic()  # last successful heartbeat
        self.renew_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-folder-lease", daemon=True)

    # --- the file ---------------------------------------------------------------------------

    def _read(self) -> tuple[bytes | None, dict[str, Any] | None]:
        """(raw bytes or None if absent, the record or None if it holds none); OSError if unreadable."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            if os.path.lexists(self.path):
                raise OSError(errno.ENOENT, "a symbolic link to nothing") from None
            return None, None
        return raw, parse_record(raw)

    def _tmp(self) -> Path:
        return self.path.with_name(f".{LEASE}.{self.record['token']}.tmp")

    def _create(self) -> bool:
        """Create the lease file with our record, complete, if none exists (link is atomic, also on NFS)."""
        tmp = self._tmp()
        write_synced(tmp, json.dumps(self.record))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return self._create_exclusive()  # no hard links on this filesystem
        finally:
            tmp.unlink(missing_ok=True)

    def _create_exclusive(self) -> bool:
        """O_CREAT|O_EXCL is atomic too, but a reader may see the file empty for a moment: that
        reads as no record, and the file changes well within the timeout, so the reader waits."""
        try:
            write_synced(self.path, json.dumps(self.record), 0o644)
        except FileExistsError:
            return False
        return True

    def _replace(self) -> None:
        write_atomic(self.path, json.dumps(self.record), tmp=self._tmp())

    # --- taking and keeping it --------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease, waiting out a stale one; UserError naming a live holder, or saying why
        the lease file cannot be used."""
        try:
            self._acquire()
        except OSError as err:
            raise UserError(f"{self.path}: cannot use this run folder's lease file ({err.strerror or err}). "
                            f"Nothing was changed. If no job runs in {self.path.parent}, remove it") from err
        self.renewed = time.monotonic()
        self._thread.start()

    def _acquire(self) -> None:
        while not self._create():
            text, holder = self._read()
            if text is None:
                continue  # released meanwhile
            same_host = holder is not None and (holder.get("host"), holder.get("pid_namespace")) == (
                self.record["host"], self.record["pid_namespace"])
            if same_host and _process_gone(holder["pid"]):
                reason = f"its process {holder.get('pid')} is gone"
            else:
                now = self._changed_within(text)
                if now is not None:
                    if now[0] is None:
                        continue  # released meanwhile
                    raise UserError(
                        f"{self.path.parent}: run folder in use by {describe(now[1])} (its lease {self.path} "
                        f"is renewed). Nothing was changed. Wait for that job to end or stop it, or use another "
                        f"run.out_dir; a job that died frees the folder {self.timeout_s:g} s after its last heartbeat")
                reason = f"no heartbeat for {self.timeout_s:g} s" if holder else f"unchanged for {self.timeout_s:g} s"
            if self._read()[0] != text:
                continue  # someone else moved first: look again
            self._replace()
            print(f"run folder lease: taken over from {describe(holder)} ({reason})", file=sys.stderr, flush=True)
            break

    def _changed_within(self, text: bytes) -> tuple[bytes | None, dict[str, Any] | None] | None:
        """Watch the file for timeout_s: its new (text, record) as soon as it changes, None if it does not."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.timeout_s / 20))
            now = self._read()
            if now[0] != text:
                return now
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                _, holder = self._read()
                if holder is None or holder.get("token") != self.record["token"]:
                    return  # not ours any more: check() says so
                self.record["beat"] += 1
                self._replace()
                self.renewed = time.monotonic()
            except OSError as err:  # folder gone, disk full: keep trying; check() reports a long failure
                self.renew_error = err.strerror or str(err)

    def check(self) -> None:
        """UserError if the lease may no longer be this job's: another job must not find our writes."""
        try:
            _, holder = self._read()
        except OSError:
            holder = None
        if holder is None or holder.get("token") != self.record["token"]:
            lost = f"taken by {describe(holder)}" if holder else f"{self.path} was removed or replaced"
        elif time.monotonic() - self.renewed > self.timeout_s:
            lost = f"not renewed for {self.timeout_s:g} s: {self.renew_error}"
        else:
            return
        raise UserError(f"{self.path.parent}: this job no longer holds the run folder ({lost}); stopped "
                        f"without writing, so the folder keeps what the job holding it writes")

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(OSError):
            _, holder = self._read()
            if holder is not None and holder.get("token") == self.record["token"]:
                self.path.unlink(missing_ok=True)
        if self.created_folder:
            with contextlib.suppress(OSError):  # only if nothing else was written there
                self.path.parent.rmdir()


@contextlib.contextmanager
def hold_lease(folder: Path, timeout_s: float) -> Iterator[Lease]:
    """Hold `folder`'s lease for the duration of the block (created if absent; left empty removed)."""
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"config key run.out_dir={str(folder)!r}: cannot create the folder ({err.strerror})") from err
    lease = Lease(folder / LEASE, timeout_s, created)
    try:
        lease.acquire()
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    try:
        yield lease
    finally:
        lease.release()

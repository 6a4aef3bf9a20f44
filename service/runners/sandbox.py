"""The local runner's sandbox: bubblewrap (``bwrap``), one per run.

What a run sees: ``/usr`` and ``/etc`` read-only (``/bin``, ``/lib`` ... as the host's
symlinks into them), a private ``/dev``, ``/proc`` of its own pid namespace (it sees no other
process: not the service, not another run), a private ``/tmp`` (a size-capped tmpfs), its own
run directory read-write at ``/tfdeploy/run``, the terraform binary at ``/tfdeploy/bin``, and
the provider mounts read-only under ``/tfdeploy/providers``. Nothing else of the host: not the
data dir (keys, tokens, other runs' records), not the database's socket directory, not the
service's own files, not other runs' temporary directories. Paths that must stay hidden but lie
under ``/usr`` or ``/etc`` are covered by an empty tmpfs. ``TFDEPLOY_RUNNER_NETWORK=none``
adds ``--unshare-net`` (only a loopback of its own: the database's TCP port is out of reach).

Who runs it: a worker that is not root runs bwrap as itself (unprivileged, in a user namespace
of its own, with further user namespaces disabled). A worker running as root runs bwrap as root
-- so it can bind provider directories that only root can reach -- and the sandboxed script
drops to ``nobody`` (65534) with ``setpriv`` before anything of the run starts: no capabilities,
an empty bounding set, ``no_new_privs``; a root-owned file under the read-only mounts
(``/etc/shadow``) stays unreadable, and the run directory is handed to that user. (A user
namespace of root's own would map the sandbox user onto root, the owner of those files.) The
environment is what the runner builds (nothing of the service's own): bwrap passes it on. No ``--die-with-parent``: terraform must outlive a worker that dies, so that another
worker's recovery can interrupt it gracefully and collect its state.

The sandboxed script runs as pid 1 of its namespace (``--as-pid-1``): a SIGINT sent to it
(its host pid comes from ``--info-fd``) is passed on to every process in the namespace, and
when it exits the kernel ends whatever it left running.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("tfdeploy.runner.sandbox")

RUN_ROOT = "/tfdeploy/run"
BIN_DIR = "/tfdeploy/bin"
SANDBOX_UID = 65534
TMP_SIZE = 64 * 1024 * 1024
PATH = f"{BIN_DIR}:/usr/local/bin:/usr/bin:/bin"
READ_ONLY_ROOTS = ("/usr", "/etc")
# Merged-/usr systems link these into /usr; elsewhere they are bound read-only.
TOP_LINKS = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
# Where PostgreSQL puts its sockets by default (hidden if they lie under a bound root).
DEFAULT_SOCKET_DIRS = ("/var/run/postgresql", "/run/postgresql", "/tmp")


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def sandbox_user() -> tuple[int, int] | None:
    """(uid, gid) the sandboxed script drops to: nobody when the worker is root, else None
    (it runs as the worker's user, in its own user namespace)."""
    return (SANDBOX_UID, SANDBOX_UID) if os.geteuid() == 0 else None


SETPRIV = "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"


def drop_privileges(uid: int, gid: int, max_processes: int | None = None) -> list[str]:
    """Become ``uid``/``gid`` with no capability, through setpriv; with ``max_processes``, first
    cap the processes (and threads) that user may have at once (RLIMIT_NPROC, through prlimit):
    a fork bomb in a run then stops at that number instead of the host's processes
    (PostgreSQL, the API, other users' runs). The count is the sandbox user's on the whole
    host, every run's together: give it room for TFDEPLOY_MAX_CONCURRENCY runs."""
    limit = [PRLIMIT, f"--nproc={max_processes}:{max_processes}", "--"] if max_processes else []
    return [*limit, SETPRIV, "--reuid", str(uid), "--regid", str(gid), "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


def under(path: str, roots: Iterable[str]) -> bool:
    p = os.path.realpath(path)
    return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)


def command(
    *,
    bwrap: str,
    run_dir: str,
    terraform: str,
    script: str,
    info_fd: int,
    network_none: bool,
    mounts: dict[str, str],
    extra_files: Iterable[str] = (),
    hidden: Iterable[str] = (),
    drop_to: tuple[int, int] | None = None,
    max_processes: int | None = None,
) -> list[str]:
    """The bwrap command line for one run. ``run_dir`` (host) appears at RUN_ROOT; ``mounts``
    are in-run path -> host path, bound read-only; ``extra_files`` are host files bound
    read-only at their own path (certificates, a CLI config); ``hidden`` are host paths
    covered by an empty tmpfs if they lie under a bound root."""
    args = [bwrap]
    for root in READ_ONLY_ROOTS:
        args += ["--ro-bind", root, root]
    for top in TOP_LINKS:
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    resolv = "/etc/resolv.conf"
    if os.path.islink(resolv) and not under(resolv, READ_ONLY_ROOTS):
        args += ["--ro-bind-try", os.path.realpath(resolv), os.path.realpath(resolv)]
    for path in extra_files:
        if os.path.exists(path) and not under(path, READ_ONLY_ROOTS):
            args += ["--ro-bind", path, path]
    for path in sorted({os.path.realpath(h) for h in hidden}):
        if under(path, READ_ONLY_ROOTS) and os.path.isdir(path):
            args += ["--tmpfs", path]
    args += [
        "--dev", "/dev",
        "--proc", "/proc",
        "--perms", "1777", "--size", str(TMP_SIZE), "--tmpfs", "/tmp",
    ]
    # Directories bwrap makes are root's, mode 0700, when it runs as root: open them up.
    made: set[str] = set()
    for target in (RUN_ROOT, f"{BIN_DIR}/terraform", *mounts):
        parts = target.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/" + "/".join(parts[:i])
            if parent not in made:
                made.add(parent)
                args += ["--perms", "0755", "--dir", parent]
    args += [
        "--bind", run_dir, RUN_ROOT,
        "--ro-bind", terraform, f"{BIN_DIR}/terraform",
    ]
    for in_run, host in sorted(mounts.items()):
        args += ["--ro-bind", host, in_run]
    if drop_to is None:
        args += ["--unshare-user", "--disable-userns"]
    args += [
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", "tfdeploy-run",
        "--as-pid-1",
        "--info-fd", str(info_fd),
        "--chdir", RUN_ROOT,
    ]
    if network_none:
        args.append("--unshare-net")
    if drop_to is not None:
        args += drop_privileges(*drop_to, max_processes=max_processes)
    args += ["/bin/sh", "-c", script, "tfdeploy-run"]
    return args


# The holder: keeps the place's lock (its stdin) for as long as the sandbox runs, while the
# sandbox itself gets /dev/null -- code in the sandbox never holds the lock's descriptor, so it
# cannot release the place early (flock's LOCK_UN acts on every holder of a description).
# It traps (does not ignore: the sandbox would inherit that) SIGINT and SIGTERM, so that a signal
# to the process group never ends it before the sandbox has ended.
HOLDER = ["/bin/sh", "-c", 'trap : INT TERM; "$@" </dev/null; exit $?', "tfdeploy-hold"]


def prepare_run_dir(path: Path) -> None:
    """Hand the run's directory over to the sandbox's user."""
    user = sandbox_user()
    if user is None:
        return
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, *user, follow_symlinks=False)
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), *user, follow_symlinks=False)


@functools.lru_cache(maxsize=4)
def probe(bwrap: str, network_none: bool) -> str | None:
    """Whether a sandbox can be made here (None) or why not. Runs one real, empty sandbox with
    the options runs use, as the user runs use."""
    user = sandbox_user()
    if user is not None and not os.access(SETPRIV, os.X_OK):
        return f"{SETPRIV} (util-linux) is needed to drop root in the sandbox"
    if user is not None and not os.access(PRLIMIT, os.X_OK):
        return f"{PRLIMIT} (util-linux) is needed to bound a run's processes"
    parent = Path(tempfile.mkdtemp(prefix="tfdeploy-probe-"))
    try:
        run_dir = parent / "sandbox"
        run_dir.mkdir(mode=0o700)
        prepare_run_dir(run_dir)
        true = shutil.which("true") or "/bin/true"
        r, w = os.pipe()
        try:
            args = command(
                bwrap=bwrap, run_dir=str(run_dir), terraform=true,
                script=f"test -w {RUN_ROOT} && test -w /tmp && {BIN_DIR}/terraform", info_fd=w,
                network_none=network_none, mounts={}, drop_to=user, max_processes=64,
            )
            proc = subprocess.run(
                args, pass_fds=(w,), capture_output=True, timeout=30, env={"PATH": PATH}
            )
        finally:
            os.close(r)
            os.close(w)
        if proc.returncode != 0:
            return (proc.stderr.decode(errors="replace").strip() or f"exit {proc.returncode}")
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        shutil.rmtree(parent, ignore_errors=True)

"""Linux Landlock for the plan worker: the files a process may still open, chosen by itself.

A small ctypes binding of the three Landlock system calls (Linux 5.13+). A process calls
:func:`restrict` once with the folders and files it may read and the ones it may write;
from then on the kernel refuses every other open, listing, creation or removal with
``EACCES`` (Python: ``PermissionError``), for it and every process it starts, and no call
can lift it. Landlock also stops the process from tracing or reading the memory and
environment (``/proc/PID/mem``, ``environ``) of processes outside its domain, such as the
node, and (ABI 6+) from signalling them. From ABI 4 on, the same rules also refuse every TCP
``connect`` and ``bind`` (no port is allowed): the process cannot reach a host on the
network over TCP, nor listen.

There is no maintained PyPI binding yet (``landlock`` is a 1.0 development release), and the
interface is three calls and two structs, so it lives here.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterable

# System call numbers: the same in the generic table (aarch64...) and on x86_64.
_CREATE, _ADD_RULE, _RESTRICT = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38
_RULE_PATH_BENEATH = 1
_VERSION_FLAG = 1  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)

# File-system access rights (include/uapi/linux/landlock.h).
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_WRITE_TREE = sum(1 << bit for bit in range(4, 13))  # remove, make dir/file/sock/fifo/...
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FILE_ONLY = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1, 2
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4+
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is off or not Linux."""
    if platform.system() != "Linux":
        return 0
    libc = _libc()
    version = libc.syscall(_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(_VERSION_FLAG))
    return max(int(version), 0)


def _handled(abi: int) -> int:
    rights = _EXECUTE | _WRITE_FILE | _READ_FILE | _READ_DIR | _WRITE_TREE
    if abi >= 2:
        rights |= _REFER
    if abi >= 3:
        rights |= _TRUNCATE
    if abi >= 5:
        rights |= _IOCTL_DEV
    return rights


def restrict(read: Iterable[str], write: Iterable[str]) -> int:
    """Allow this process only ``read`` (read, list, execute) and ``write`` (everything).

    Paths that do not exist are skipped. From ABI 4 on, TCP connect and bind are refused
    too. Returns the Landlock ABI version applied, or 0 (nothing restricted) where the
    kernel has no Landlock; ``OSError`` when it has Landlock but a call fails. Only the
    calling thread and the threads and processes it starts afterwards are restricted:
    call it before any other thread exists.
    """
    abi = abi_version()
    if abi <= 0:
        return 0
    libc = _libc()
    handled = _handled(abi)
    net = (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0
    attr = _RulesetAttr(handled, net, (_SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL) if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8  # older kernels refuse unknown fields
    ruleset = libc.syscall(_CREATE, ctypes.byref(attr), ctypes.c_size_t(size),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        raise _error("landlock_create_ruleset")
    try:
        reading = _EXECUTE | _READ_FILE | _READ_DIR
        for paths, access in ((read, reading), (write, handled)):
            for path in paths:
                _add(libc, ruleset, path, access & handled)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise _error("prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(_RESTRICT, ruleset, ctypes.c_uint32(0)) != 0:
            raise _error("landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


def _add(libc: ctypes.CDLL, ruleset: int, path: str, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # gone or unreadable: nothing to allow
    try:
        if not os.path.isdir(path):
            access &= _FILE_ONLY
        rule = _PathBeneath(access, fd)
        if libc.syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule),
                        ctypes.c_uint32(0)) != 0:
            raise _error(f"landlock_add_rule({path})")
    finally:
        os.close(fd)


def _error(call: str) -> OSError:
    errno = ctypes.get_errno()
    return OSError(errno, f"{call} failed: {os.strerror(errno)}")


def leave_network() -> bool:
    """Move this process into a network namespace of its own, with no interface up.

    Unprivileged Linux allows it inside a new user namespace (``unshare(CLONE_NEWUSER |
    CLONE_NEWNET)``), whose user and group map to the process's own so that files keep
    their owners. Afterwards no connection of any kind (TCP, UDP, DNS) leaves the process;
    it shares no network with the host. Returns whether it worked: not where the kernel or
    its policy forbids unprivileged user namespaces, nor once the process has threads.
    """
    if platform.system() != "Linux":
        return False
    uid, gid = os.getuid(), os.getgid()
    if _libc().unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        return False
    try:  # map our own ids, so that owners and permissions read as before
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        pass  # still outside the host's network; ids read as the overflow id
    return True


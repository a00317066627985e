"""
The sandbox train.py runs in on Linux: Landlock (files, TCP, signals) and a seccomp filter (no new Unix socket)
inside user, PID, mount and network namespaces.

- `probe()` says what this machine offers; `describe()` says it in words, including what is missing.
- `wrap(argv, policy)` returns the command that runs argv inside: `unshare` makes the namespaces (no network; train.py
  is PID 1 of its own PID namespace, so whatever it leaves is killed when it ends; a /proc of its own), then this
  file, run as a script, applies the Landlock policy to itself and execs argv.
- The policy (`policy()`): read everything but the validation data; write only the run's folder, its private temp
  folder and a /dev/shm of its own; no TCP; no signal to, nor ptrace of, a process outside the sandbox (the scorer,
  the driver); no new Unix socket, since a socket file of the user's tmux, systemd, D-Bus or Docker would run
  commands outside the sandbox (socketpair, which multiprocessing uses, still works).
Where a layer is missing (macOS, Windows, an old kernel, a container without user namespaces) the run goes on with
what there is, and its record says which protections it lacked.
"""

import ctypes
import errno
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

# -----------------------------------------------------------------------------
# Landlock, through its three system calls (x86-64 and arm64 share the numbers)

CREATE_RULESET, ADD_RULE, RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ACCESS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}  # by ABI
TRUNCATE, IOCTL_DEV = 1 << 14, 1 << 15
FILE_ACCESS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # the rights a rule on a file may grant
READ = EXECUTE | READ_FILE | READ_DIR
NET_TCP = 3  # bind and connect (ABI 4)
SCOPES = 3  # abstract Unix sockets and signals (ABI 6)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi():
    """The kernel's Landlock ABI version, 0 when there is none."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return 0
    abi = _libc().syscall(CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(0, abi)


def _rules(policy, abi):
    """[(path, rights)]: read beneath every top-level entry but the denied paths (their siblings granted one by
    one, down to them), write beneath the writable folders, the devices train.py may use."""
    denied = {os.path.realpath(p) for p in policy["deny_read"]}
    rules = []

    def grant_beneath(folder):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            path = entry.path
            if path in denied or entry.is_symlink():  # a link's target is reached through its own rule
                continue
            if any(d.startswith(path + os.sep) for d in denied):
                grant_beneath(path)
            else:
                rules.append((path, READ if entry.is_dir(follow_symlinks=False) else READ & FILE_ACCESS))

    grant_beneath("/")
    everything = FS_ACCESS[min(abi, 5)]
    rules += [(path, everything) for path in policy["writable"]]
    drive = READ_FILE | WRITE_FILE | (IOCTL_DEV if abi >= 5 else 0)
    rules += [(path, drive) for path in device_paths(_listdir("/dev"), _listdir("/dev/dri")) if os.path.exists(path)]
    return rules


def device_paths(names, render_nodes):
    """The devices train.py may open and drive, of the names in /dev and /dev/dri: the plain ones, and the GPUs'
    (NVIDIA's /dev/nvidia*; with ROCm's /dev/kfd, its render nodes /dev/dri/renderD*, not the display's cards)."""
    gpus = [f"/dev/{name}" for name in sorted(names) if name.startswith("nvidia") or name == "kfd"]
    if "kfd" in names:
        gpus += [f"/dev/dri/{name}" for name in sorted(render_nodes) if name.startswith("renderD")]
    return [f"/dev/{name}" for name in DEVICES] + gpus


def _listdir(folder):
    try:
        return os.listdir(folder)
    except OSError:
        return []


def restrict(policy):
    """Apply the policy to this process and its future children, for good."""
    libc, abi = _libc(), landlock_abi()
    if policy.get("private_shm") and _private_shm(libc):
        policy = {**policy, "writable": [*policy["writable"], "/dev/shm"]}
    attr = (ctypes.c_uint64 * 3)(FS_ACCESS[min(abi, 5)], NET_TCP if abi >= 4 else 0, SCOPES if abi >= 6 else 0)
    size = 8 * (3 if abi >= 6 else 2 if abi >= 4 else 1)
    ruleset = libc.syscall(CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    for path, rights in _rules(policy, abi):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        is_dir = os.path.isdir(path)
        rule = PathBeneath(rights if is_dir else rights & FILE_ACCESS, fd)
        if libc.syscall(ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0)) < 0:
            error = ctypes.get_errno()
            os.close(fd)
            raise OSError(error, f"landlock_add_rule failed for {path}")
        os.close(fd)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.syscall(RESTRICT_SELF, ruleset, 0) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)
    _deny_unix_sockets(libc)


def _private_shm(libc):
    """A /dev/shm of this mount namespace's own (multiprocessing's semaphores live there): gone with the run."""
    return libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", 0, b"mode=1777") == 0


# seccomp: socket(AF_UNIX, ...) fails with EACCES; so does any system call of another ABI (x32, i386), whose numbers
# the filter does not know. By machine: the audit architecture and the number of socket().
SECCOMP_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
PR_SET_SECCOMP, SECCOMP_MODE_FILTER, AF_UNIX, X32_SYSCALL_BIT = 22, 2, 1, 0x40000000
LOAD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
ALLOW, DENY = 0x7FFF0000, 0x00050000 | errno.EACCES  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EACCES


def _deny_unix_sockets(libc):
    arch, socket_call = SECCOMP_ARCH[platform.machine()]
    program = [  # (code, jump if true, jump if false, k); seccomp_data: nr at 0, arch at 4, args[0] at 16
        (LOAD, 0, 0, 4), (JEQ, 0, 6, arch),  # another ABI: deny
        (LOAD, 0, 0, 0), (JGE, 4, 0, X32_SYSCALL_BIT), (JEQ, 0, 2, socket_call),
        (LOAD, 0, 0, 16), (JEQ, 1, 0, AF_UNIX),
        (RET, 0, 0, ALLOW), (RET, 0, 0, DENY)]

    class Instruction(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]

    filters = (Instruction * len(program))(*[Instruction(*step) for step in program])
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(Program(len(program), filters)), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter failed")


# -----------------------------------------------------------------------------
# Namespaces, through util-linux's unshare

NAMESPACES = ["--user", "--map-current-user", "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]


@functools.cache
def probe():
    """{"landlock": ABI or 0, "namespaces": bool, "missing": [what is missing, and why]}, on this machine."""
    abi = landlock_abi()
    missing = [] if abi else ["Landlock (not in this kernel, or not Linux): train.py can read the validation data, "
                              "write anywhere your user can, keep state between runs (also for its probe run, which "
                              "can then replay what the run was shown), and ask your user's services (tmux, "
                              "systemd, D-Bus) to run commands"]
    if abi and abi < 6:
        missing.append(f"Landlock scopes (ABI {abi} < 6): train.py can signal other processes of your user")
    unshare = shutil.which("unshare")
    namespaces = False
    if unshare:
        try:
            namespaces = subprocess.run([unshare, *NAMESPACES, "true"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            pass
    if not namespaces:
        missing.append("user namespaces (`unshare --user` " + ("failed" if unshare else "is not installed") + "): "
                       "train.py has the network, what it starts in a new session can outlive it, and /dev/shm, "
                       "which it may write, is shared from run to run (also with its probe run, which can then "
                       "replay what the run was shown)")
    return {"landlock": abi, "namespaces": namespaces, "missing": missing}


def describe(found, caveats=()):
    """One line: the protections a run has, then what it lacks (caveats: what no sandbox protects here)."""
    have = ([f"Landlock ABI {found['landlock']}", "seccomp"] if found["landlock"] else []) + (
        ["user, PID, mount and network namespaces"] if found["namespaces"] else [])
    return (" + ".join(have) or "none") + "".join(f"; missing: {m}" for m in [*found["missing"], *caveats])


ALSO_WRITABLE = "AUTORESEARCH_SANDBOX_WRITABLE"  # the driver's: folders the user lets train.py write too


def also_writable(env):
    return [p for p in env.get(ALSO_WRITABLE, "").split(os.pathsep) if p]


# Credentials under your home that train.py has no use for, and could print into the log the agent reads:
# ssh keys, Ray's cluster token, the claude CLI's login, cloud and registry logins, the Hugging Face token.
CREDENTIALS = (".ssh", ".ray", ".claude", ".claude.json", ".aws", ".azure", ".config/gcloud", ".kube", ".docker",
               ".netrc", ".git-credentials", ".cache/huggingface/token", ".config/gh")
# ...and where the variables that move them point: a file, or a folder of the tool's own
CREDENTIAL_VARIABLES = ("RAY_AUTH_TOKEN_PATH", "HF_TOKEN_PATH", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
                        "KUBECONFIG", "DOCKER_CONFIG", "CLAUDE_CONFIG_DIR", "GH_CONFIG_DIR", "CLOUDSDK_CONFIG",
                        "AZURE_CONFIG_DIR")


def credentials(env):
    """The credential files and folders of this machine train.py must not read: CREDENTIALS under your home,
    the Hugging Face token under $HF_HOME, gh and gcloud under $XDG_CONFIG_HOME, and what CREDENTIAL_VARIABLES
    name."""
    paths = [Path.home() / name for name in CREDENTIALS]
    paths += [Path(env["HF_HOME"]) / "token"] if env.get("HF_HOME") else []
    paths += [Path(env["XDG_CACHE_HOME"]) / "huggingface" / "token"] if env.get("XDG_CACHE_HOME") else []
    paths += [Path(env["XDG_CONFIG_HOME"]) / name for name in ("gh", "gcloud")] if env.get("XDG_CONFIG_HOME") else []
    paths += [Path(part) for name in CREDENTIAL_VARIABLES for part in env.get(name, "").split(os.pathsep) if part]
    # absolute: train.py's sandbox resolves them from its own folder; os.path.exists: an unreadable one is False
    return sorted({path.expanduser().absolute() for path in paths if os.path.exists(path.expanduser())})


def policy(work, private_tmp, deny_read, env):
    """What train.py may read and write: its folders, and those the user named in $ALSO_WRITABLE."""
    return {"writable": [str(work), str(private_tmp), *also_writable(env)], "deny_read": [str(p) for p in deny_read]}


def caveats(env, deny_read=()):
    """What the user's settings open up (state that can pass from run to run, and denied paths beneath a folder
    train.py may write, which Landlock's rules then grant), for the run's record."""
    also = also_writable(env)
    opened = [str(path) for path in deny_read
              if any(os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep) for folder in also)]
    return ([f"train.py may also write {', '.join(also)} (${ALSO_WRITABLE}): state can pass from run to run, and "
             "to its probe run, which can then replay what the run was shown"] if also else []) + (
        [f"so it can also read {', '.join(opened)}"] if opened else [])


def wrap(argv, run_policy, found=None):
    """The command that runs argv in the sandbox this machine offers."""
    found = found or probe()
    command = list(argv)
    if found["landlock"]:
        # a /dev/shm of its own in its mount namespace; without one, the shared one (multiprocessing needs it)
        run_policy = {**run_policy, "private_shm": found["namespaces"],
                      "writable": run_policy["writable"] + ([] if found["namespaces"] else ["/dev/shm"])}
        command = [sys.executable, os.path.abspath(__file__), json.dumps(run_policy), "--", *command]
    if found["namespaces"]:
        command = [shutil.which("unshare"), *NAMESPACES, *command]
    return command


if __name__ == "__main__":  # python sandbox.py POLICY -- argv...: restrict this process, then become argv
    restrict(json.loads(sys.argv[1]))
    os.execvp(sys.argv[3], sys.argv[3:])

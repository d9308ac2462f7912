#!/usr/bin/env python3
"""kiln side-by-side benchmark (issue 7).

Runs the same generated Dockerfiles and contexts through kiln and every peer
builder present on the machine (docker's BuildKit via a dockerd the bench
starts itself, Debian's buildah, a buildctl+buildkitd pair named by BUILDCTL
and BUILDKIT_HOST), in the same run, interleaved rep by rep, and prints per
scenario each builder's median/min/max and kiln's ratio to each peer, marked
against the issue's targets. Writes the same markdown to bench/results/<date>.md.

Not a test: figures are wall-clock times on a shared machine.
"""

import argparse
import datetime
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

# no single command may take longer (a hung build becomes a failed cell)
BUILD_TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", "0") or 0) or (150 if os.environ.get("QUICK") else 900)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ratio kiln / BuildKit targets from issue 7 (scenario key -> max ratio)
TARGETS = {
    "1 cold build": 0.8,
    "2 no-op rebuild": 0.5,
    "3 one-file-change rebuild": 0.3,
    "4 8 parallel 1 s stages": 0.7,
    "5a 50 chained RUN, cold": 0.6,
    "5b 50 chained RUN, cached": 0.5,
    "6a export ~1 GiB to OCI tarball (gzip)": 0.6,
    "6b push ~1 GiB to local registry": 0.6,
    "7a 16 concurrent distinct builds, cold": 0.6,
    "7b 64 concurrent distinct builds, cold": 0.6,
    "8a daemon peak RSS over 2 (MiB)": 0.3,
    "8b daemon peak RSS over 7a (MiB)": 0.3,
    "8c daemon idle RSS before 2 (MiB)": 0.3,
    "8d daemon idle RSS after 7a (MiB)": 0.3,
    "9a 20 steps on a wiped daemon, cache imported": 0.5,
}

# scenario 9's Dockerfile has this many steps after FROM, each checked CACHED on import
RC_STEPS = 20
CACHED_LINE = re.compile(rb"^#\d+ CACHED$", re.M)
VERTEX_LINE = re.compile(rb"^#(\d+) (.*)$", re.M)


def cached_steps(out):
    """The steps a BuildKit-style plain progress shows CACHED, leaving out FROM and
    [internal] vertices (the base image is shared by concurrent builds)."""
    names, cached = {}, []
    for m in VERTEX_LINE.finditer(out or b""):
        n, rest = m.group(1), m.group(2).strip()
        if n not in names:
            names[n] = rest
        elif rest == b"CACHED":
            cached.append(names[n])
    return [c.decode(errors="replace") for c in cached
            if b" FROM " not in b" " + c and not c.startswith(b"[internal]")]


def check_ran(who, out):
    """A cold build's progress must show no step CACHED: its steps really ran."""
    steps = cached_steps(out)
    if steps:
        raise RuntimeError(f"{who}: cold build found {len(steps)} step(s) CACHED, e.g. {steps[0][:60]}")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, env=None, check=True, timeout=1800, quiet=True):
    """Runs cmd (list); returns (seconds, CompletedProcess). Raises on failure if check."""
    timeout = min(timeout, BUILD_TIMEOUT)
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd)}\ntimed out after {timeout:.0f} s (hung)") from None
    dt = time.monotonic() - t0
    if check and p.returncode != 0:
        tail = (p.stderr or b"").decode(errors="replace")[-1500:]
        out = (p.stdout or b"").decode(errors="replace")[-500:]
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{tail}\n{out}\nexit {p.returncode}")
    return dt, p


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(pred, secs, what):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def umount_under(path):
    """Lazily unmounts every mount under path (deepest first)."""
    try:
        with open("/proc/mounts") as f:
            mps = [line.split()[1] for line in f]
    except OSError:
        return
    for mp in sorted((m for m in mps if m.startswith(path.rstrip("/") + "/") or m == path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)


def terminate(proc, secs):
    """SIGTERM, then SIGKILL after `secs`; waits for the exit."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(secs)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rm_tree(path):
    umount_under(path)
    shutil.rmtree(path, ignore_errors=True)


def _cpu_busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v) - idle, sum(v)


def _dirty_kib():
    with open("/proc/meminfo") as f:
        m = dict((ln.split(":")[0], int(ln.split()[1])) for ln in f if ln.split()[1:2])
    return m.get("Dirty", 0) + m.get("Writeback", 0)


SETTLE_LOG = []

# KEEP_OLD_STORES: a cold rep gets a fresh daemon on a fresh store, for every
# builder, and the stores of earlier reps are deleted only when the bench ends.
# Deleting a store right before a timed build charges the build for the delete:
# on an ext4 without a journal (this VM's root) the inode allocator skips every
# inode freed in the last 60 s (360 s while its table block is dirty) and scans
# past them on each create, so each file or directory made in the following
# minutes costs up to ~0.4 ms more, and the more reps have run, the more it costs.


def settle(who=""):
    """After a reset: the freed space and any dirty pages reach the disk, and what
    the builder left running in the background (a daemon's GC, deferred deletes)
    has finished, so a cold build does not pay for the cleanup before it (every
    builder alike). Waits until the machine has been quiet for 0.5 s: under 10%
    CPU and under 1 MiB dirty, at most 15 s."""
    t0 = time.time()
    os.sync()
    quiet = 0
    busy0, tot0 = _cpu_busy()
    while quiet < 5 and time.time() - t0 < 15:
        time.sleep(0.1)
        busy1, tot1 = _cpu_busy()
        frac = (busy1 - busy0) / max(1, tot1 - tot0)
        busy0, tot0 = busy1, tot1
        quiet = quiet + 1 if frac < 0.10 and _dirty_kib() < 1024 else 0
        if quiet == 0 and _dirty_kib() >= 1024:
            os.sync()
    SETTLE_LOG.append((who, time.time() - t0))
    log(f"settle after {who} reset: {time.time() - t0:.1f}s")


# scenario 6b pushes here: one loopback port for the whole run (so kilnd's config
# can name it), its storage emptied between pushes so no builder finds blobs there.
PUSH_REG = f"127.0.0.1:{free_port()}"


class PushRegistry:
    def __init__(self, tmp):
        self.dir = os.path.join(tmp, "pushreg")
        self.proc = None

    def start(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(os.path.join(self.dir, "data"))
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                    f"    rootdirectory: {self.dir}/data\nhttp:\n  addr: {PUSH_REG}\n")
        self.log = open(os.path.join(self.dir, "registry.log"), "ab")
        self.proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", cfg], stdout=self.log, stderr=self.log)

        def up():
            return subprocess.run(["curl", "-fsS", f"http://{PUSH_REG}/v2/"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL).returncode == 0
        wait_for(up, 20, "push registry")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def proc_mem(pid):
    """(VmHWM, VmRSS) in KiB of one process, or (0, 0) when gone."""
    hwm = rss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return hwm, rss


def reset_hwm(pid):
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def children(pid):
    """pids of direct children of pid."""
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            out = [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


# ---------------------------------------------------------------- builders


class Builder:
    name = "?"
    is_buildkit = False
    note = ""

    def build(self, d, tag, args=None, timeout=1800, cold=False):
        """Builds d/Dockerfile with context d; returns seconds. cold: the cache was just
        emptied, so the build's progress is checked to show no step CACHED."""
        raise NotImplementedError

    def reset(self):
        """Empties every cache (cold start)."""
        raise NotImplementedError

    def daemon_pids(self):
        return []

    def export_oci(self, d, tag, dest):
        raise NotImplementedError

    def push(self, d, tag, ref):
        raise NotImplementedError

    def stop(self):
        pass

    def mem_reset(self):
        for p in self.daemon_pids():
            reset_hwm(p)

    def mem_read(self):
        hwm = rss = 0
        for p in self.daemon_pids():
            h, r = proc_mem(p)
            hwm += h
            rss += r
        return hwm, rss


def kiln_output():
    """BENCH_KILN_OUTPUT: uncompressed (default), gzip, zstd or none."""
    out = os.environ.get("BENCH_KILN_OUTPUT", "") or "uncompressed"
    if out not in ("uncompressed", "gzip", "zstd", "none"):
        raise SystemExit(f"BENCH_KILN_OUTPUT={out}: expected uncompressed, gzip, zstd or none")
    return out


class Kiln(Builder):
    name = "kiln"

    def __init__(self, tmp, reg):
        self.tmp = os.path.join(tmp, "kiln")
        os.makedirs(self.tmp, exist_ok=True)
        self.reg = reg
        bindir = os.environ.get("BENCH_KILN_BIN_DIR", os.path.join(REPO, "target/release"))
        self.kiln = os.path.join(bindir, "kiln")
        self.kilnd = os.path.join(bindir, "kilnd")
        self.gen = 0
        self.proc = None
        self.logf = None
        self.start()

    def start(self):
        self.gen += 1
        self.root = os.path.join(self.tmp, f"root{self.gen}")
        self.sock = os.path.join(self.tmp, f"kilnd{self.gen}.sock")
        cfg = os.path.join(self.tmp, "kilnd.toml")
        with open(cfg, "w") as f:
            f.write(
                f'root = "{self.root}"\n[grpc]\naddress = ["unix://{self.sock}"]\n'
                f'[registry."docker.io"]\nmirrors = ["{self.reg}"]\n'
                f'[registry."{self.reg}"]\nhttp = true\n'
                f'[registry."{PUSH_REG}"]\nhttp = true\n'
            )
        self.logf = open(os.path.join(self.tmp, "kilnd.log"), "ab")
        # docker builds with --network host (its daemon has no bridge here), so kiln's
        # steps share the host's network too unless BENCH_KILN_NETWORK says otherwise
        net = os.environ.get("BENCH_KILN_NETWORK", "") or "host"
        # BENCH_KILN_RUNTIME: what starts steps (auto, native or runc; kilnd's default: auto)
        runtime = os.environ.get("BENCH_KILN_RUNTIME", "") or "auto"
        self.proc = subprocess.Popen([self.kilnd, "--config", cfg, "--network-mode", net,
                                      "--oci-worker-runtime", runtime],
                                     stdout=self.logf, stderr=self.logf)
        wait_for(lambda: os.path.exists(self.sock), 30, "kilnd socket")

    def stop_daemon(self):
        terminate(self.proc, 10)
        if self.logf:
            self.logf.close()
        umount_under(self.root)

    def stop(self):
        self.stop_daemon()
        for gen in range(1, self.gen + 1):
            rm_tree(os.path.join(self.tmp, f"root{gen}"))

    def reset(self):
        # A fresh kilnd on a fresh root; the old root is deleted when the bench
        # ends (KEEP_OLD_STORES).
        self.stop_daemon()
        settle(self.name)
        self.start()

    def daemon_pids(self):
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def _build(self, d, outputs, args=None, timeout=1800, cold=False):
        cmd = [self.kiln, "--addr", f"unix://{self.sock}", "build", "--progress", "plain" if cold else "quiet",
               "--frontend", "dockerfile.v0", "--local", f"context={d}", "--local", f"dockerfile={d}"]
        for k, v in (args or {}).items():
            cmd += ["--opt", f"build-arg:{k}={v}"]
        for o in outputs:
            cmd += ["--output", o]
        t, p = run(cmd, timeout=timeout)
        if cold:
            check_ran(self.name, p.stderr)
        return t

    def build(self, d, tag, args=None, timeout=1800, cold=False):
        # type=image without push: the image (layer blobs, config, manifest) is
        # assembled, as docker/buildah commit to their image store. docker -t
        # keeps its layers uncompressed (it tars each new layer once to get its
        # diffID and never compresses it until a push), so kiln's layers are
        # uncompressed here too (compression=uncompressed: each new layer is
        # tarred once, hashed and stored as a blob). BENCH_KILN_OUTPUT=gzip|zstd
        # compresses them instead; =none solves without an exporter.
        out = kiln_output()
        if out == "none":
            return self._build(d, [], args, timeout, cold)
        return self._build(d, [f"type=image,name={tag},compression={out}"], args, timeout, cold)

    def export_oci(self, d, tag, dest):
        return self._build(d, [f"type=oci,dest={dest},name={tag}"])

    def push(self, d, tag, ref):
        return self._build(d, [f"type=image,name={ref},push=true"])

    def _plain(self, d, extra):
        cmd = [self.kiln, "--addr", f"unix://{self.sock}", "build", "--progress", "plain",
               "--frontend", "dockerfile.v0", "--local", f"context={d}", "--local", f"dockerfile={d}", *extra]
        t, p = run(cmd)
        return t, p.stderr

    def cache_export(self, d, repo):
        """Builds d and writes its cache (mode=max) to repo; returns the ref to import."""
        ref = f"{repo}:cache"
        self._plain(d, ["--export-cache", f"type=registry,ref={ref},mode=max"])
        return ref

    def cache_import(self, d, ref):
        """Builds d importing ref; returns (seconds, steps shown CACHED)."""
        out = kiln_output()
        outputs = [] if out == "none" else ["--output", f"type=image,name=bench/rc,compression={out}"]
        t, err = self._plain(d, ["--import-cache", f"type=registry,ref={ref}", *outputs])
        return t, len(CACHED_LINE.findall(err))

    def cached_export_max(self, d, ref):
        """The cached build of d, its cache written (mode=max) to ref: seconds."""
        return self._plain(d, ["--export-cache", f"type=registry,ref={ref},mode=max"])[0]


class Docker(Builder):
    name = "docker"
    is_buildkit = True

    def __init__(self, tmp, reg):
        self.dir = os.path.join(tmp, "docker")
        os.makedirs(self.dir, exist_ok=True)
        self.sock = os.path.join(self.dir, "docker.sock")
        self.docker = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker")
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.sock}", DOCKER_BUILDKIT="1",
                        DOCKER_CONFIG=os.path.join(self.dir, "config"))
        self.reg = reg
        self.gen = 0
        self.logf = open(os.path.join(self.dir, "dockerd.log"), "ab")
        self.start()

    def start(self):
        self.gen += 1
        # its own (empty) daemon.json: the machine's may set data-root too
        cfg = os.path.join(self.dir, "daemon.json")
        write(cfg, "{}\n")
        self.proc = subprocess.Popen(
            ["dockerd", "--config-file", cfg, "--data-root", os.path.join(self.dir, f"data{self.gen}"),
             "--exec-root", os.path.join(self.dir, "exec"), "-H", f"unix://{self.sock}",
             "--pidfile", os.path.join(self.dir, "dockerd.pid"),
             "--bridge=none", "--iptables=false", "--ip6tables=false",
             "--registry-mirror", f"http://{self.reg}", "--insecure-registry", self.reg],
            stdout=self.logf, stderr=self.logf, start_new_session=True)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.proc.returncode}; log {self.dir}/dockerd.log")
            return run([self.docker, "info"], env=self.env, check=False, timeout=30)[1].returncode == 0

        wait_for(up, 60, "dockerd")
        out = run([self.docker, "version", "--format", "{{.Server.Version}}"], env=self.env)[1]
        self.note = f"dockerd {out.stdout.decode().strip()} (BuildKit built in), --bridge=none, builds with --network host"

    def stop_daemon(self):
        terminate(self.proc, 30)
        umount_under(self.dir)

    def _docker(self, *a, timeout=1800):
        return run([self.docker, *a], env=self.env, timeout=timeout)

    def build(self, d, tag, args=None, timeout=1800, cold=False):
        cmd = ["build", "--network", "host", *(["--progress", "plain"] if cold else ["-q"]), "-t", tag]
        for k, v in (args or {}).items():
            cmd += ["--build-arg", f"{k}={v}"]
        t, p = self._docker(*cmd, d, timeout=timeout)
        if cold:
            check_ran(self.name, p.stderr)
        return t

    def reset(self):
        # A fresh daemon on a fresh data root, as kiln gets a fresh kilnd and
        # root: the old one is deleted when the bench ends (KEEP_OLD_STORES).
        self.stop_daemon()
        settle(self.name)
        self.start()
        settle(self.name + " start")

    def daemon_pids(self):
        # BuildKit runs inside dockerd; containerd is dockerd's child (managed).
        if self.proc.poll() is not None:
            return []
        return [self.proc.pid] + [c for c in children(self.proc.pid) if _comm(c) == "containerd"]

    def export_oci(self, d, tag, dest):
        # docker 20.10's built-in BuildKit has no oci exporter (only local/tar
        # and its image store), so: cached build to the store + `docker save | gzip`.
        t = self.build(d, tag)
        t0 = time.monotonic()
        with open(dest, "wb") as out:
            save = subprocess.Popen([self.docker, "save", tag], env=self.env, stdout=subprocess.PIPE)
            gz = subprocess.run(["gzip", "-c"], stdin=save.stdout, stdout=out)
            save.stdout.close()
            if save.wait() != 0 or gz.returncode != 0:
                raise RuntimeError("docker save | gzip failed")
        return t + time.monotonic() - t0

    def push(self, d, tag, ref):
        t = self.build(d, ref)
        return t + self._docker("push", "-q", ref)[0]

    def cache_export(self, d, repo):
        """Builds d with an inline cache (docker 20.10 writes no other) and pushes it."""
        ref = f"{repo}:inline"
        self._docker("build", "--network", "host", "-q", "--build-arg", "BUILDKIT_INLINE_CACHE=1", "-t", ref, d)
        self._docker("push", "-q", ref)
        return ref

    def cache_import(self, d, ref):
        t, p = self._docker("build", "--network", "host", "--progress", "plain", "--cache-from", ref,
                            "-t", "bench/rc", d)
        return t, len(CACHED_LINE.findall(p.stderr))

    def stop(self):
        self.stop_daemon()
        self.logf.close()
        rm_tree(self.dir)


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


class Buildah(Builder):
    name = "buildah"

    def __init__(self, tmp, reg):
        self.dir = os.path.join(tmp, "buildah")
        os.makedirs(self.dir, exist_ok=True)
        conf = os.path.join(self.dir, "registries.conf")
        with open(conf, "w") as f:
            f.write('unqualified-search-registries = ["docker.io"]\n'
                    '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n'
                    f'[[registry.mirror]]\nlocation = "{reg}"\ninsecure = true\n'
                    f'[[registry]]\nlocation = "{reg}"\ninsecure = true\n')
        self.env = dict(os.environ, CONTAINERS_REGISTRIES_CONF=conf)
        self.base = ["buildah", "--root", os.path.join(self.dir, "root"), "--runroot",
                     os.path.join(self.dir, "run"), "--storage-driver", os.environ.get("BUILDAH_STORAGE", "overlay")]
        v = run(["buildah", "--version"])[1].stdout.decode().strip()
        self.note = f"{v}, --storage-driver {self.base[-1]}, bud --layers --isolation chroot --network host (daemonless: no RSS)"

    def build(self, d, tag, args=None, timeout=1800, cold=False):
        cmd = self.base + ["bud", "--layers", "--isolation", "chroot", "--network", "host",
                           *([] if cold else ["-q"]), "-t", tag]
        for k, v in (args or {}).items():
            cmd += ["--build-arg", f"{k}={v}"]
        t, p = run(cmd + ["-f", os.path.join(d, "Dockerfile"), d], env=self.env, timeout=timeout)
        if cold and b"Using cache" in p.stdout + p.stderr:
            raise RuntimeError("buildah: cold build used its cache")
        return t

    def reset(self):
        run(self.base + ["rm", "-a"], env=self.env, check=False)
        run(self.base + ["rmi", "-af"], env=self.env, check=False)
        settle(self.name)

    def export_oci(self, d, tag, dest):
        t = self.build(d, tag)
        return t + run(self.base + ["push", "--compression-format", "gzip", tag, f"oci-archive:{dest}"], env=self.env)[0]

    def push(self, d, tag, ref):
        t = self.build(d, ref)
        return t + run(self.base + ["push", "--tls-verify=false", ref, f"docker://{ref}"], env=self.env)[0]

    def stop(self):
        self.reset()
        rm_tree(self.dir)


class Buildctl(Builder):
    name = "buildctl"
    is_buildkit = True

    def __init__(self, tmp, reg):
        self.bin = os.environ["BUILDCTL"]
        self.addr = os.environ["BUILDKIT_HOST"]
        self.pid = int(os.environ.get("BUILDKITD_PID", "0") or 0)
        self.note = (f"{self.bin} --addr {self.addr} (buildkitd is yours; its config must mirror docker.io "
                     f"to {reg}; set BUILDKITD_PID for RSS)")

    def _build(self, d, outputs, args=None, timeout=1800, cold=False):
        cmd = [self.bin, "--addr", self.addr, "build", "--progress", "plain" if cold else "quiet",
               "--frontend", "dockerfile.v0", "--local", f"context={d}", "--local", f"dockerfile={d}"]
        for k, v in (args or {}).items():
            cmd += ["--opt", f"build-arg:{k}={v}"]
        for o in outputs:
            cmd += ["--output", o]
        t, p = run(cmd, timeout=timeout)
        if cold:
            check_ran(self.name, p.stderr)
        return t

    def build(self, d, tag, args=None, timeout=1800, cold=False):
        return self._build(d, [f"type=image,name={tag}"], args, timeout, cold)

    def export_oci(self, d, tag, dest):
        return self._build(d, [f"type=oci,dest={dest},name={tag}"])

    def push(self, d, tag, ref):
        return self._build(d, [f"type=image,name={ref},push=true,registry.insecure=true"])

    def reset(self):
        run([self.bin, "--addr", self.addr, "prune", "--all"], check=False)
        settle(self.name)

    def daemon_pids(self):
        return [self.pid] if self.pid else []


# ---------------------------------------------------------------- inputs


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def gen_inputs(tmp, q):
    """Generates every scenario's Dockerfile and context; returns {name: dir}."""
    rnd = random.Random(7)
    d = {}
    # 1 cold: a few RUN and COPY steps
    c = d["cold"] = os.path.join(tmp, "in/cold")
    for i in range(20):
        write(f"{c}/src/f{i}.txt", f"file {i}\n" * 200)
    write(f"{c}/app.sh", "#!/bin/sh\necho app\n")
    write(f"{c}/Dockerfile",
          "FROM busybox\nRUN mkdir -p /app && echo one > /app/one\nCOPY src/ /app/src/\n"
          "RUN cat /app/src/* | wc -l > /app/lines\nCOPY app.sh /app/\n"
          "RUN chmod +x /app/app.sh && /app/app.sh > /app/out\nRUN ls -la /app > /app/listing\n")
    # 2/3 big context: 10,000 files ~200 MB (quick: 1,000 files ~20 MB)
    nfiles, total = (1000, 20 << 20) if q else (10000, 200 << 20)
    c = d["big"] = os.path.join(tmp, "in/big")
    per = total // nfiles
    chunk = os.urandom(per * 64)  # sliced so files differ but generation is fast
    for i in range(nfiles):
        p = f"{c}/ctx/d{i % 100:02d}/f{i:05d}.bin"
        if i < 100:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        off = rnd.randrange(0, len(chunk) - per)
        with open(p, "wb") as f:
            f.write(i.to_bytes(4, "little") + chunk[off:off + per - 4])
    write(f"{c}/Dockerfile", "FROM busybox\nCOPY ctx/ /ctx/\nRUN find /ctx -type f | wc -l > /count && du -sk /ctx > /size\n")
    # 4 parallel stages
    c = d["par"] = os.path.join(tmp, "in/par")
    df = ""
    for i in range(8):
        df += f"FROM busybox AS s{i}\nARG BUST\nRUN echo $BUST > /dev/null && sleep 1 && echo {i} > /out{i}\n\n"
    df += "FROM busybox\n" + "".join(f"COPY --from=s{i} /out{i} /out/{i}\n" for i in range(8))
    write(f"{c}/Dockerfile", df)
    # 5 fifty chained RUN echo
    d["chain"] = write_chain(os.path.join(tmp, "in/chain"), 50)
    # 6 ~1 GiB image (quick: ~64 MiB): half random, half compressible, 4 layers
    d["big-image"] = write_big_image(os.path.join(tmp, "in/big-image"), 64 if q else 1024)
    # 9 remote cache: 20 steps (RUNs writing ~256 KiB each, and COPYs)
    c = d["rc"] = os.path.join(tmp, "in/rc")
    for i in range(5):
        write(f"{c}/src/f{i}.txt", f"remote cache file {i}\n" * 500)
    steps = []
    for i in range(RC_STEPS):
        if i % 4 == 3:
            steps.append(f"COPY src/f{i // 4}.txt /copied/f{i}.txt\n")
        else:
            steps.append(f"RUN head -c 262144 /dev/urandom > /r{i} && echo {i} >> /steps\n")
    write(f"{c}/Dockerfile", "FROM busybox\n" + "".join(steps))
    # 7 concurrency: N distinct builds at once
    d["conc"] = write_conc(os.path.join(tmp, "in/conc"))
    return d


def write_chain(c, n):
    """n chained RUN echo steps; returns c."""
    write(f"{c}/Dockerfile", "FROM busybox\n" + "".join(f"RUN echo step {i} >> /steps\n" for i in range(n)))
    return c


def write_big_image(c, mib):
    """An image of ~mib MiB in 4 RUN layers: half random, half compressible; returns c."""
    q4 = mib // 4
    write(f"{c}/Dockerfile",
          "FROM busybox\n"
          f"RUN head -c {q4}m /dev/urandom > /r1\n"
          f"RUN head -c {q4}m /dev/urandom > /r2\n"
          f"RUN yes 'kiln bench compressible line 0123456789' | head -c {q4}m > /t1\n"
          f"RUN seq 1 100000000 | head -c {q4}m > /t2\n")
    return c


def write_conc(c):
    """The concurrent builds' input: the ID build arg makes every step after FROM differ
    between builds; returns c."""
    for i in range(50):
        write(f"{c}/src/f{i}.txt", f"line {i}\n" * 100)
    write(f"{c}/Dockerfile",
          "FROM busybox\nARG ID\nRUN echo \"$ID\" > /id\nCOPY src/ /src/\nRUN cat /src/* /id | sort > /sorted\n"
          "RUN sleep 0.5 && md5sum /sorted > /sum\nRUN for i in $(seq 1 200); do echo $i; done > /n\n")
    return c


# ---------------------------------------------------------------- scenarios


class Bench:
    def __init__(self, builders, inputs, reps, quick, tmp, reg):
        self.b = builders
        self.inp = inputs
        self.reps = reps
        self.quick = quick
        self.tmp = tmp
        self.reg = reg
        self.results = {}  # scenario -> builder -> [values] or error str
        self.units = {}
        self.extra = []  # markdown sections appended verbatim

    def record(self, scen, b, val, unit="s"):
        self.units[scen] = unit
        r = self.results.setdefault(scen, {}).setdefault(b.name, [])
        if isinstance(r, list):
            r.append(val)

    def fail(self, scen, b, err):
        log(f"{scen}: {b.name} failed: {err}")
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith("exit ")]
        reason = lines[-1] if len(lines) > 1 else str(err).strip().splitlines()[-1]
        reason = re.sub(r"/tmp/kiln-bench-[^ ]*/", "…/", reason).replace("|", "/")
        self.results.setdefault(scen, {})[b.name] = "**failed**: " + reason[:100]

    def each(self, scen, fn):
        """fn(builder, rep) -> value or None; interleaved rep by rep."""
        for rep in range(self.reps):
            for b in self.b:
                if isinstance(self.results.get(scen, {}).get(b.name), str):
                    continue
                try:
                    v = fn(b, rep)
                    if v is not None:
                        self.record(scen, b, v)
                        log(f"{scen} rep {rep + 1}: {b.name} {v:.2f}s")
                except Exception as e:  # noqa: BLE001 - a builder failing is a result
                    self.fail(scen, b, e)

    def s1_cold(self):
        d = self.inp["cold"]

        def f(b, rep):
            b.reset()
            return b.build(d, "bench/cold", cold=True)
        self.each("1 cold build", f)

    def s2_s3_big(self):
        d = self.inp["big"]
        changed = os.path.join(d, "ctx/d00/f00000.bin")
        for b in self.b:  # prime (not timed), from a cold cache
            try:
                b.reset()
                b.build(d, "bench/big")
            except Exception as e:  # noqa: BLE001
                self.fail("2 no-op rebuild", b, e)
        for b in self.b:
            time.sleep(2)
            b.mem_reset()
        self.idle_after("8c daemon idle RSS before 2 (MiB)")
        self.each("2 no-op rebuild", lambda b, rep: b.build(d, "bench/big"))
        self.peak("8a daemon peak RSS over 2 (MiB)")

        def f(b, rep):
            return b.build(d, "bench/big")
        for rep in range(self.reps):
            with open(changed, "ab") as fh:  # same change for every builder
                fh.write(f"change {rep} {time.time_ns()}\n".encode())
            saved, self.reps = self.reps, 1
            try:
                self.each("3 one-file-change rebuild", f)
            finally:
                self.reps = saved

    def s4_par(self):
        d = self.inp["par"]
        for b in self.b:
            try:
                b.build(d, "bench/par", {"BUST": "prime"})
            except Exception as e:  # noqa: BLE001
                self.fail("4 8 parallel 1 s stages", b, e)
        self.each("4 8 parallel 1 s stages",
                  lambda b, rep: b.build(d, "bench/par", {"BUST": f"r{rep}-{time.time_ns()}"}))

    def s5_chain(self):
        d = self.inp["chain"]

        def cold(b, rep):
            b.reset()
            return b.build(d, "bench/chain", cold=True)
        self.each("5a 50 chained RUN, cold", cold)
        self.each("5b 50 chained RUN, cached", lambda b, rep: b.build(d, "bench/chain"))

    def s6_export(self):
        self.s6_side_by_side()
        script = os.path.join(REPO, "bench/export/run.sh")
        if os.path.exists(script):
            log("scenario 6: also bench/export/run.sh (kiln's export throughput)")
            env = dict(os.environ, BENCH_TMP=self.tmp, BENCH_REGISTRY=self.reg, BENCH_REPS=str(self.reps),
                       QUICK="1" if self.quick else "", BENCH_BUILDERS=" ".join(b.name for b in self.b))
            for b in self.b:
                if isinstance(b, Kiln):
                    env.update(KILN=b.kiln, KILN_HOST=f"unix://{b.sock}")
                if isinstance(b, Docker):
                    env.update(DOCKER=b.docker, DOCKER_HOST=f"unix://{b.sock}")
            size = "64" if self.quick else "1024"
            p = subprocess.run(["sh", script, size], env=env, stdout=subprocess.PIPE, stderr=sys.stderr)
            self.extra.append(f"### 6 export throughput, kiln only (bench/export/run.sh {size})\n\n"
                              + p.stdout.decode(errors="replace")
                              + ("" if p.returncode == 0 else f"\n(bench/export/run.sh exited {p.returncode})\n"))

    def s6_side_by_side(self):
        d = self.inp["big-image"]
        out = os.path.join(self.tmp, "export")
        os.makedirs(out, exist_ok=True)
        for b in self.b:  # prime: the image content is built once, export is what is timed
            try:
                b.build(d, "bench/bigimg", timeout=3600)
            except Exception as e:  # noqa: BLE001
                self.fail("6a export ~1 GiB to OCI tarball (gzip)", b, e)
                self.fail("6b push ~1 GiB to local registry", b, e)

        def tarball(b, rep):
            dest = os.path.join(out, f"{b.name}.tar")
            try:
                return b.export_oci(d, "bench/bigimg", dest)
            finally:
                if os.path.exists(dest):
                    log(f"  {b.name} tarball {os.path.getsize(dest) >> 20} MiB")
                    os.unlink(dest)
        self.each("6a export ~1 GiB to OCI tarball (gzip)", tarball)

        def push(b, rep):
            # an empty registry per push, so no builder finds blobs already there
            pr = PushRegistry(self.tmp)
            pr.start()
            try:
                return b.push(d, "bench/bigimg", f"{PUSH_REG}/bench/bigimg:{rep}")
            finally:
                pr.stop()
        self.each("6b push ~1 GiB to local registry", push)

    def s7_conc(self):
        """16 and 64 distinct builds at once on an emptied cache; every build is checked
        to have run its steps (none CACHED)."""
        d = self.inp["conc"]
        for n, scen in ((16, "7a 16 concurrent distinct builds, cold"), (64, "7b 64 concurrent distinct builds, cold")):
            self.conc(d, n, scen, n == 16)

    def conc(self, d, n, scen, mem):
        peaks = {}

        def f(b, rep):
            b.reset()
            time.sleep(1)
            b.mem_reset()
            t0 = time.monotonic()
            stop = threading.Event()
            hw = [0]

            def sample():  # kiln restarts per cold rep, so sample as well as VmHWM
                while not stop.is_set():
                    hw[0] = max(hw[0], b.mem_read()[1])
                    time.sleep(0.05)
            th = threading.Thread(target=sample)
            th.start()
            try:
                with ThreadPoolExecutor(n) as ex:
                    futs = [ex.submit(b.build, d, f"bench/conc{i}", {"ID": f"{rep}-{i}"}, 1800, True)
                            for i in range(n)]
                    for fu in futs:
                        fu.result()
            finally:
                stop.set()
                th.join()
            dt = time.monotonic() - t0
            pk = max(hw[0], b.mem_read()[0])
            peaks[b.name] = max(peaks.get(b.name, 0), pk)
            return dt
        self.each(scen, f)
        if not mem:
            return
        for b in self.b:
            if b.daemon_pids() and b.name in peaks:
                self.record("8b daemon peak RSS over 7a (MiB)", b, peaks[b.name] / 1024, "MiB")
        self.idle_after("8d daemon idle RSS after 7a (MiB)")

    def s9_remote_cache(self):
        """A 20-step build on a wiped daemon from a cache in a registry (kiln:
        registry cache, mode=max; docker 20.10: its inline cache, the only one it
        writes), and the cost of writing kiln's mode=max cache against pushing
        the image."""
        d = self.inp["rc"]
        imp = "9a 20 steps on a wiped daemon, cache imported"
        pr = PushRegistry(self.tmp)
        pr.start()
        try:
            refs = {}
            for b in self.b:  # the cache, written once (not timed)
                if not hasattr(b, "cache_import"):
                    continue
                try:
                    b.reset()
                    refs[b.name] = b.cache_export(d, f"{PUSH_REG}/bench/rc-{b.name}")
                except Exception as e:  # noqa: BLE001
                    self.fail(imp, b, e)

            def from_cache(b, rep):
                if b.name not in refs:
                    return None
                b.reset()
                t, cached = b.cache_import(d, refs[b.name])
                if cached < RC_STEPS:
                    raise RuntimeError(f"only {cached} of {RC_STEPS} steps CACHED from the imported cache")
                return t
            self.each(imp, from_cache)

            # export cost, on a warm daemon: a fresh ref (or repo) per rep, so every blob is uploaded
            def export_max(b, rep):
                if not isinstance(b, Kiln):
                    return None
                b.build(d, "bench/rc")
                return b.cached_export_max(d, f"{PUSH_REG}/bench/rcx-{rep}-{time.time_ns()}:cache")
            self.each("9b cached build + cache export mode=max", export_max)

            def push(b, rep):
                if not hasattr(b, "cache_import"):
                    return None
                b.build(d, "bench/rc")
                return b.push(d, "bench/rc", f"{PUSH_REG}/bench/rcp-{b.name}-{rep}-{time.time_ns()}:v")
            self.each("9c cached build + image push", push)
            k = self.results.get("9b cached build + cache export mode=max", {}).get("kiln")
            kp = self.results.get("9c cached build + image push", {}).get("kiln")
            if isinstance(k, list) and k and isinstance(kp, list) and kp:
                self.extra.append(
                    "### 9 remote cache\n\nkiln's mode=max cache export (9b) against its own image push (9c) "
                    f"of the same cached build: {statistics.median(k) / statistics.median(kp):.2f}×. "
                    "docker 20.10 cannot export a registry cache (that needs buildx), so 9b has no peer.\n")
        finally:
            pr.stop()

    def idle_after(self, scen):
        time.sleep(3)
        for b in self.b:
            if b.daemon_pids():
                self.record(scen, b, b.mem_read()[1] / 1024, "MiB")
                log(f"{scen}: {b.name} {b.mem_read()[1] / 1024:.0f} MiB")

    def peak(self, scen):
        for b in self.b:
            if b.daemon_pids():
                self.record(scen, b, b.mem_read()[0] / 1024, "MiB")

    # ------------------------------------------------------------ report

    def table(self):
        names = [b.name for b in self.b]
        peers = [b for b in self.b if b.name != "kiln"]
        hdr = ["scenario"] + [f"{n} median (min–max)" for n in names]
        hdr += [f"kiln/{p.name}" for p in peers] + ["target"]
        lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for scen in sorted(self.results, key=lambda s: (s.split()[0])):
            res = self.results[scen]
            unit = self.units.get(scen, "s")
            row = [scen]
            for n in names:
                v = res.get(n)
                if isinstance(v, list) and v:
                    fmt = "{:.0f}" if unit == "MiB" else "{:.2f}"
                    u = "" if unit == "MiB" else " s"
                    row.append(f"{fmt.format(statistics.median(v))}{u} ({fmt.format(min(v))}–{fmt.format(max(v))})")
                elif isinstance(v, str):
                    row.append(v)
                else:
                    row.append("–")
            k = res.get("kiln")
            tgt = TARGETS.get(scen)
            for p in peers:
                v = res.get(p.name)
                if isinstance(k, list) and k and isinstance(v, list) and v and statistics.median(v) > 0:
                    r = statistics.median(k) / statistics.median(v)
                    mark = ""
                    if tgt is not None and p.is_buildkit_ref:
                        mark = " ✅" if r <= tgt else " ❌ miss"
                    row.append(f"{r:.2f}{mark}")
                else:
                    row.append("–")
            row.append(f"≤ {tgt}" if tgt is not None else "")
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)


def start_builders(tmp, regdir, peers_wanted, quick, builders, notes):
    """Starts the registry (seeded with busybox) in regdir, kiln, and each wanted peer that
    can run, appending them to builders (so a caller's cleanup finds whatever started) and
    their descriptions to notes; returns the registry's address."""
    reg = subprocess.run(["sh", os.path.join(REPO, "scripts/registry.sh"), "start", regdir],
                         stdout=subprocess.PIPE, check=True).stdout.decode().strip()
    subprocess.run(["sh", os.path.join(REPO, "scripts/seed-busybox.sh"), reg], check=True,
                   stdout=subprocess.DEVNULL)
    log(f"registry {reg} seeded with busybox")
    builders.append(Kiln(tmp, reg))
    kout = ("no --output (solve only)" if kiln_output() == "none"
            else f"--output type=image,name=\u2026,compression={kiln_output()} (image assembled, not pushed; "
                 "docker -t stores uncompressed layers)")
    net = os.environ.get("BENCH_KILN_NETWORK", "") or "host"
    runtime = os.environ.get("BENCH_KILN_RUNTIME", "") or "auto"
    notes.append(f"kiln: {os.path.relpath(builders[0].kilnd, REPO)}, all-in-one, --network-mode {net}, "
                 f"--oci-worker-runtime {runtime}, "
                 "fresh --root for every cold run, "
                 f"`kiln build --progress quiet` {kout}")
    if "docker" in peers_wanted:
        try:
            if not shutil.which("dockerd"):
                raise RuntimeError("dockerd not installed")
            builders.append(Docker(tmp, reg))
        except Exception as e:  # noqa: BLE001
            notes.append(f"docker: NOT USED — dockerd could not run here: {str(e).splitlines()[0]}")
            log(notes[-1])
    # QUICK keeps to 5 minutes: buildah (slow on chained RUN) only when it is
    # the only peer, unless BENCH_PEERS names it.
    skip_buildah = quick and any(b.name == "docker" for b in builders) and not os.environ.get("BENCH_PEERS")
    if skip_buildah and shutil.which("buildah"):
        notes.append("buildah: skipped in QUICK mode (docker's BuildKit ran); BENCH_PEERS=docker,buildah adds it")
    if "buildah" in peers_wanted and shutil.which("buildah") and not skip_buildah:
        try:
            builders.append(Buildah(tmp, reg))
        except Exception as e:  # noqa: BLE001
            notes.append(f"buildah: NOT USED — {str(e).splitlines()[0]}")
    if "buildctl" in peers_wanted and os.environ.get("BUILDCTL") and os.environ.get("BUILDKIT_HOST"):
        builders.append(Buildctl(tmp, reg))
    bk = [b for b in builders if b.is_buildkit]
    for b in builders:
        # targets are kiln / BuildKit; with no BuildKit peer, read them against buildah
        b.is_buildkit_ref = b.is_buildkit or (not bk and b.name == "buildah")
        if b.note:
            notes.append(f"{b.name}: {b.note}")
    if not bk:
        notes.append("no BuildKit peer could run: targets are read against buildah instead")
    if len(builders) < 2:
        log("no peer builder available; kiln figures only")
    return reg


def stop_builders(builders, tmp, regdir):
    for b in builders:
        try:
            b.stop()
        except Exception as e:  # noqa: BLE001
            log(f"stopping {b.name}: {e}")
    subprocess.run(["sh", os.path.join(REPO, "scripts/registry.sh"), "stop", regdir])
    time.sleep(0.5)
    if not os.environ.get("BENCH_KEEP"):
        rm_tree(tmp)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=bool(os.environ.get("QUICK")))
    ap.add_argument("--reps", type=int, default=int(os.environ.get("BENCH_REPS", "0") or 0))
    ap.add_argument("--peers", default=os.environ.get("BENCH_PEERS", "docker,buildah,buildctl"),
                    help="comma list of peers to try (docker, buildah, buildctl)")
    ap.add_argument("--scenarios", default=os.environ.get("BENCH_SCENARIOS", "1,2,4,5,6,7,9"),
                    help="comma list (2 also runs 3 and 8a; 7 also runs 8b/8c)")
    a = ap.parse_args()
    global BUILD_TIMEOUT
    if a.quick and not os.environ.get("BENCH_TIMEOUT"):
        BUILD_TIMEOUT = 150
    reps = a.reps or (1 if a.quick else 5)
    peers_wanted = a.peers.split(",")
    scen = a.scenarios.split(",")

    tmp = tempfile.mkdtemp(prefix="kiln-bench-", dir=os.environ.get("BENCH_TMP_PARENT"))
    log(f"work dir {tmp} ({'QUICK, ' if a.quick else ''}{reps} rep(s))")
    builders = []
    notes = []
    regdir = os.path.join(tmp, "registry")
    try:
        reg = start_builders(tmp, regdir, peers_wanted, a.quick, builders, notes)

        inputs = gen_inputs(tmp, a.quick)
        log("inputs generated")
        bench = Bench(builders, inputs, reps, a.quick, tmp, reg)
        t0 = time.monotonic()
        steps = [("1", bench.s1_cold), ("2", bench.s2_s3_big), ("4", bench.s4_par), ("5", bench.s5_chain),
                 ("7", bench.s7_conc), ("6", bench.s6_export), ("9", bench.s9_remote_cache)]
        for key, fn in steps:
            if key in scen:
                log(f"== scenario {key}")
                fn()
        elapsed = time.monotonic() - t0

        rev = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                             stdout=subprocess.PIPE).stdout.decode().strip()
        notes.insert(0, f"kiln tree: {rev or '?'} (binaries built by bench/run.sh from the working tree)")
        host = subprocess.run(["uname", "-r"], stdout=subprocess.PIPE).stdout.decode().strip()
        load = open("/proc/loadavg").read().split()[:3]
        now = datetime.datetime.now()
        md = [f"# kiln bench {now:%Y-%m-%d %H:%M} {'(QUICK)' if a.quick else ''}", "",
              f"{reps} repetition(s) per scenario, builders interleaved rep by rep; wall-clock seconds "
              f"(RSS in MiB). Host: {os.cpu_count()} CPUs, kernel {host}, load average at end {' '.join(load)}; "
              f"scenarios took {elapsed / 60:.1f} min.",
              "The machine is shared with other engineers compiling: figures are noisy; read the ratios, "
              "not the absolute times.", "",
              "Ratios are kiln / peer (median over median); ✅/❌ mark BuildKit peers against issue 7's targets.", ""]
        md += [f"- {n}" for n in notes]
        md += ["", bench.table(), ""]
        if a.quick:
            md += ["QUICK: 1,000-file ~20 MB context for 2/3, ~64 MiB image for 6.", ""]
        md += bench.extra
        text = "\n".join(md) + "\n"
        print(text)
        rdir = os.path.join(REPO, "bench/results")
        os.makedirs(rdir, exist_ok=True)
        path = os.path.join(rdir, f"{now:%Y-%m-%d}{'-quick' if a.quick else ''}.md")
        with open(path, "w") as f:
            f.write(text)
        log(f"wrote {path}")
    finally:
        stop_builders(builders, tmp, regdir)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""bench/rootless: the cost of rootless mode. A rootless kilnd (an unprivileged user,
`rootlesskit --net=host --copy-up=/etc kilnd --rootless`), and one whose snapshots
fuse-overlayfs mounts, against a root kilnd, all release builds, on bench.py's inputs and scenarios 1 (cold build), 3 (one-file-change
rebuild of the 10,000-file context) and 5a/5b (50 chained RUN, cold and cached),
interleaved rep by rep. Every cold rep starts a new daemon on a new root and checks
in its plain progress that no step was CACHED (bench.py's cold check). Prints a markdown table (medians,
ratio rootless / root) and writes bench/results/<date>-rootless.md.

    sh bench/rootless/run.sh [REPS]     # QUICK=1: the smaller inputs
"""
import os
import pwd
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import bench as B  # noqa: E402  (bench/bench.py: its builders, inputs and scenarios)

class Root(B.Kiln):
    name = "root"
    is_buildkit = True  # the reference the ratio is read against


class Rootless(B.Kiln):
    name = "rootless"
    extra_config = ""

    prefix = "rl"

    def start(self):
        user = os.environ.get("BENCH_ROOTLESS_USER", "kiln-rootless")
        pw = pwd.getpwnam(user)
        self.gen += 1
        base = os.path.join(self.tmp, f"{self.prefix}{self.gen}")
        os.makedirs(os.path.join(base, "bin"), exist_ok=True)
        os.makedirs(os.path.join(base, "run"), exist_ok=True)
        self.root = os.path.join(base, "root")
        self.sock = os.path.join(base, "kilnd.sock")
        kilnd = os.path.join(base, "bin/kilnd")
        B.shutil.copy2(self.kilnd, kilnd)
        cfg = os.path.join(base, "kilnd.toml")
        with open(cfg, "w") as f:
            f.write(
                f'root = "{self.root}"\n[grpc]\naddress = ["unix://{self.sock}"]\n'
                f'{self.extra_config}'
                f'[registry."docker.io"]\nmirrors = ["{self.reg}"]\n'
                f'[registry."{self.reg}"]\nhttp = true\n'
            )
        for dirpath, dirs, files in os.walk(base):
            for n in [dirpath] + [os.path.join(dirpath, x) for x in dirs + files]:
                os.lchown(n, pw.pw_uid, pw.pw_gid)
        os.chmod(self.tmp, 0o755)
        os.chmod(base, 0o755)
        self.logf = open(os.path.join(self.tmp, f"kilnd-{self.prefix}.log"), "ab")
        env = ["HOME=" + pw.pw_dir, "USER=" + user, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "XDG_RUNTIME_DIR=" + os.path.join(base, "run")]
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "env", "-i", *env,
             "rootlesskit", "--state-dir", os.path.join(base, "rootlesskit"), "--net=host", "--copy-up=/etc",
             kilnd, "--rootless", "--config", cfg],
            stdout=self.logf, stderr=self.logf)
        B.wait_for(lambda: os.path.exists(self.sock), 30, "rootless kilnd socket")
        if self.extra_config and "fuse-overlayfs" in self.extra_config:
            with open(os.path.join(self.tmp, f"kilnd-{self.prefix}.log"), "rb") as f:
                if b"snapshots are mounted by fuse-overlayfs" not in f.read():
                    raise RuntimeError(f"{self.name}: kilnd does not say it mounts with fuse-overlayfs")

    def stop(self):
        self.stop_daemon()
        for gen in range(1, self.gen + 1):
            B.rm_tree(os.path.join(self.tmp, f"{self.prefix}{gen}"))


class RootlessFuse(Rootless):
    """rootless, its snapshots mounted by fuse-overlayfs (where a kernel cannot mount
    overlayfs in a user namespace)."""
    name = "rootless, fuse-overlayfs"
    extra_config = '[worker.oci]\nsnapshotter = "fuse-overlayfs"\n'
    prefix = "fuse"


def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def main():
    quick = bool(os.environ.get("QUICK"))
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else (1 if quick else 3)
    tmp = tempfile.mkdtemp(prefix="kiln-rlbench-")
    os.chmod(tmp, 0o755)
    reg = subprocess.run(["sh", os.path.join(B.REPO, "scripts/registry.sh"), "start", os.path.join(tmp, "registry")],
                         stdout=subprocess.PIPE, check=True).stdout.decode().strip()
    builders = []
    try:
        subprocess.run(["sh", os.path.join(B.REPO, "scripts/seed-busybox.sh"), reg], check=True,
                       stdout=subprocess.DEVNULL)
        inputs = B.gen_inputs(tmp, quick)
        for cls in (Rootless, Root, RootlessFuse):  # each stopped in `finally`, even if the next fails to start
            builders.append(cls(tmp, reg))
        bench = B.Bench(builders, inputs, reps, quick, tmp, reg)
        bench.s1_cold()
        bench.s2_s3_big()
        bench.s5_chain()
        rows = []
        for scen in ["1 cold build", "3 one-file-change rebuild", "5a 50 chained RUN, cold",
                     "5b 50 chained RUN, cached"]:
            r = bench.results.get(scen, {})
            vals = [r.get(n) for n in ("rootless", "root", RootlessFuse.name)]
            ok = [isinstance(v, list) and bool(v) for v in vals]
            cells = [f"{median(v):.3f} ({min(v):.3f}–{max(v):.3f})" if k else str(v) for v, k in zip(vals, ok)]
            ratio = [f"{median(vals[i]) / median(vals[1]):.2f}×" if ok[i] and ok[1] else "—" for i in (0, 2)]
            rows.append(f"| {scen} | {' | '.join(cells)} | {ratio[0]} | {ratio[1]} |")
        head = (f"# rootless kilnd against root kilnd, {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}, "
                f"{os.cpu_count()} cores, {reps} rep(s){', QUICK inputs' if quick else ''}\n\n"
                "Release builds; the same inputs as bench.py; interleaved rep by rep; every cold rep on a new "
                "daemon and root, checked to have run every step (no CACHED in its progress). Seconds: median "
                "(min–max); ratios to root are the cost of rootless. Every daemon's steps share the host's "
                "network (the root kilnd with bench.py's --network-mode host, the rootless one under "
                "rootlesskit --net=host).\n\n"
                "| scenario | rootless | root | rootless, fuse-overlayfs | rootless / root | fuse-overlayfs / root |\n"
                "|---|---|---|---|---|---|\n")
        text = head + "\n".join(rows) + "\n"
        print(text)
        out = os.path.join(B.REPO, "bench/results", time.strftime("%Y-%m-%d") + "-rootless.md")
        with open(out, "w") as f:
            f.write(text)
    finally:
        for b in builders:
            try:
                b.stop()
            except Exception as e:  # noqa: BLE001
                B.log(f"stop {b.name}: {e}")
        subprocess.run(["sh", os.path.join(B.REPO, "scripts/registry.sh"), "stop", os.path.join(tmp, "registry")],
                       check=False, stdout=subprocess.DEVNULL)
        B.rm_tree(tmp)


if __name__ == "__main__":
    main()

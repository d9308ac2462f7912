#!/usr/bin/env python3
"""kiln cost curves: how each cost grows with its work, side by side with BuildKit.

Four curves, each point measured for kiln and its peer (a standalone buildkitd when
BUILDCTL and BUILDKIT_HOST name one, else the BuildKit built into a dockerd this
script starts), interleaved rep by rep, with bench.py's builders and helpers:

- context: N files of 1 KiB (1,000 per directory) behind `COPY ctx/ /ctx/` and a
  `RUN find`; primed once (not timed), then no-op rebuilds and one-file-change
  rebuilds (the same file appended to before each rep, for every builder);
- chain: N chained `RUN echo`, cold (emptied cache, every step checked to have run)
  and cached;
- conc: N concurrent distinct builds from an emptied cache (bench.py's scenario 7
  input, every build checked to have run its steps);
- image: a G GiB image (bench.py's scenario 6 recipe, scaled), built once (not
  timed), then exported to a gzip OCI tarball and pushed to an empty registry.

For each curve the report gives, per size, each builder's median (min–max), kiln's
ratio to the peer, and the time per unit of work (ms per 1,000 files, ms per step,
s per build, s per GiB), and per builder the growth: time per unit at the largest
size over time per unit at the smallest (at most 1.0: the cost grows at most
linearly with the work). Results go into bench/results/<date>-curves.md; a run of
some curves replaces their sections there and keeps the others.
"""

import argparse
import datetime
import hashlib
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B  # noqa: E402

# a single build may take this long (the priming build of the largest context does real work)
LONG = 3600


class Curve:
    def __init__(self, name, env, sizes, kinds, unit, per_unit, label, what, note=""):
        self.name = name
        self.env = env  # the environment variable overriding the sizes
        self.default = sizes
        self.kinds = kinds  # the timed scenarios at each size
        self.unit = unit  # per-unit column heading
        self.per_unit = per_unit  # (seconds, size) -> time per unit of work
        self.label = label  # size -> text
        self.what = what  # the section's title
        self.note = note  # how to read it

    def sizes(self):
        raw = os.environ.get(self.env, "")
        if not raw:
            return self.default
        vals = [float(x) for x in raw.split(",") if x.strip()]
        return sorted(int(v) if v == int(v) and self.name != "image" else v for v in vals)


CURVES = [
    Curve("context", "CURVE_CONTEXT", [10000, 100000, 1000000], ["no-op rebuild", "one-file-change rebuild"],
          "ms / 1k files", lambda t, n: t * 1000 / (n / 1000), lambda n: f"{n:,} files",
          "context size: N files of 1 KiB, `COPY ctx/ /ctx/` + `RUN find`"),
    Curve("chain", "CURVE_CHAIN", [50, 150, 500], ["cold", "cached"],
          "ms / step", lambda t, n: t * 1000 / n, lambda n: f"{n} steps",
          "chain length: N chained `RUN echo step i >> /steps`"),
    Curve("conc", "CURVE_CONC", [16, 32, 64], ["cold"],
          "s / build", lambda t, n: t / n, lambda n: f"{n} builds",
          "concurrency: N distinct builds at once from an emptied cache"),
    Curve("image", "CURVE_IMAGE_GIB", [1.0, 2.0, 4.0],
          ["export OCI tarball (gzip), first", "export OCI tarball (gzip), again", "push"],
          "s / GiB", lambda t, g: t / g, lambda g: f"{g:g} GiB",
          "image size: G GiB in 4 RUN layers (half random, half compressible)",
          "at each size the image is built once (not timed), then exported once (first: every layer is "
          "compressed), exported again (the repetitions: a builder that keeps compressed layers, as kiln "
          "and BuildKit do, reuses them; docker 20.10 has no oci exporter, so its export is a cached build "
          "+ `docker save | gzip`, which compresses every time), then pushed to an empty registry per push "
          "(kiln reuses the layers its export compressed; dockerd compresses on every push)"),
]
BY_NAME = {c.name: c for c in CURVES}


def key(curve, kind, size):
    return f"{curve.name} {kind} @ {curve.label(size)}"


class CurveBench(B.Bench):
    """bench.py's Bench, keeping each failure's whole message and the repetitions that
    succeeded before it for the report."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.errors = []
        self.before_fail = {}  # (scenario, builder) -> seconds of the reps before the failure

    def fail(self, scen, b, err):
        done = self.results.get(scen, {}).get(b.name)
        if isinstance(done, list) and done:
            self.before_fail[(scen, b.name)] = list(done)
        super().fail(scen, b, err)
        self.errors.append((scen, b.name, str(err)))

    def each_reps(self, scen, reps, fn):
        saved, self.reps = self.reps, reps
        try:
            self.each(scen, fn)
        finally:
            self.reps = saved


# ---------------------------------------------------------------- inputs


def write_context(c, n):
    """n files of 1 KiB each (distinct contents), 1,000 per directory, under c/ctx; returns
    (c, the file the one-file-change rebuilds append to)."""
    per = 1024
    rnd = random.Random(n)
    chunk = os.urandom(per * 64)
    t0 = time.monotonic()
    for i in range(n):
        sub = f"{c}/ctx/d{i // 1000:04d}"
        if i % 1000 == 0:
            os.makedirs(sub, exist_ok=True)
        off = rnd.randrange(0, len(chunk) - per)
        fd = os.open(f"{sub}/f{i:07d}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, i.to_bytes(8, "little") + chunk[off:off + per - 8])
        finally:
            os.close(fd)
    B.write(f"{c}/Dockerfile", "FROM busybox\nCOPY ctx/ /ctx/\nRUN find /ctx -type f | wc -l > /count\n")
    B.log(f"context of {n:,} files written in {time.monotonic() - t0:.0f}s")
    return c, f"{c}/ctx/d0000/f0000000.bin"


# ---------------------------------------------------------------- curves


def run_context(bench, curve, n, reps):
    d, changed = write_context(os.path.join(bench.tmp, f"in/context-{n}"), n)
    noop, change = (key(curve, k, n) for k in curve.kinds)
    tag = f"bench/ctx{n}"
    for b in bench.b:  # prime (not timed), from an emptied cache
        try:
            b.reset()
            b.build(d, tag, timeout=LONG)
        except Exception as e:  # noqa: BLE001 - a builder failing is a result
            bench.fail(noop, b, e)
            bench.fail(change, b, e)
    B.settle("context priming")
    bench.each_reps(noop, reps, lambda b, rep: b.build(d, tag, timeout=LONG))
    for rep in range(reps):
        with open(changed, "ab") as fh:  # the same change for every builder
            fh.write(f"change {rep} {time.time_ns()}\n".encode())
        bench.each_reps(change, 1, lambda b, r: b.build(d, tag, timeout=LONG))


def run_chain(bench, curve, n, reps):
    d = B.write_chain(os.path.join(bench.tmp, f"in/chain-{n}"), n)
    cold, cached = (key(curve, k, n) for k in curve.kinds)
    tag = f"bench/chain{n}"

    def f(b, rep):
        b.reset()
        return b.build(d, tag, timeout=LONG, cold=True)
    bench.each_reps(cold, reps, f)
    bench.each_reps(cached, reps, lambda b, rep: b.build(d, tag, timeout=LONG))


def run_conc(bench, curve, n, reps):
    d = os.path.join(bench.tmp, "in/conc")
    if not os.path.exists(d):
        B.write_conc(d)
    saved, bench.reps = bench.reps, reps
    try:
        bench.conc(d, n, key(curve, "cold", n), False)
    finally:
        bench.reps = saved


def run_image(bench, curve, g, reps):
    mib = round(g * 1024)
    d = B.write_big_image(os.path.join(bench.tmp, f"in/image-{mib}"), mib)
    first, export, push = (key(curve, k, g) for k in curve.kinds)
    tag = f"bench/img{mib}"
    out = os.path.join(bench.tmp, "export")
    os.makedirs(out, exist_ok=True)
    for b in bench.b:  # the image is built once; export and push are what is timed
        try:
            b.build(d, tag, timeout=LONG)
        except Exception as e:  # noqa: BLE001
            for k in (first, export, push):
                bench.fail(k, b, e)
    B.settle("image build")

    def tarball(b, rep):
        dest = os.path.join(out, f"{b.name}.tar")
        try:
            return b.export_oci(d, tag, dest)
        finally:
            if os.path.exists(dest):
                B.log(f"  {b.name} tarball {os.path.getsize(dest) >> 20} MiB")
                os.unlink(dest)
    bench.each_reps(first, 1, tarball)
    bench.each_reps(export, reps, tarball)

    def pushed(b, rep):
        pr = B.PushRegistry(bench.tmp)  # an empty registry per push
        pr.start()
        try:
            return b.push(d, tag, f"{B.PUSH_REG}/bench/img{mib}:{rep}")
        finally:
            pr.stop()
    bench.each_reps(push, reps, pushed)


RUNNERS = {"context": run_context, "chain": run_chain, "conc": run_conc, "image": run_image}


# ---------------------------------------------------------------- report


def fmt_s(v):
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def fmt_unit(v):
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def section(bench, curve, sizes, reps_of, meta):
    """The markdown section of one curve."""
    names = [b.name for b in bench.b]
    peers = names[1:]
    lines = [f"## {curve.name} — {curve.what}", ""]
    lines += [f"- {m}" for m in meta]
    lines += ["- repetitions per size: " + ", ".join(f"{curve.label(s)}: {reps_of(s)}" for s in sizes), ""]
    for kind in curve.kinds:
        hdr = ["size"] + [f"{n} median (min–max)" for n in names] + [f"kiln/{p}" for p in peers]
        hdr += [f"{n} {curve.unit}" for n in names]
        lines += [f"### {curve.name}: {kind}", "", "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        per = {n: {} for n in names}  # builder -> size -> time per unit
        for s in sizes:
            res = bench.results.get(key(curve, kind, s), {})
            row, med = [curve.label(s)], {}
            for n in names:
                v = res.get(n)
                if isinstance(v, list) and v:
                    med[n] = statistics.median(v)
                    per[n][s] = curve.per_unit(med[n], s)
                    row.append(f"{fmt_s(med[n])} s ({fmt_s(min(v))}–{fmt_s(max(v))})")
                elif isinstance(v, str):
                    done = bench.before_fail.get((key(curve, kind, s), n))
                    if done:
                        v += f" (in rep {len(done) + 1}; reps before it: {', '.join(fmt_s(x) for x in done)} s)"
                    row.append(v)
                else:
                    row.append("–")
            for p in peers:
                if "kiln" in med and med.get(p):
                    r = med["kiln"] / med[p]
                    row.append(f"{r:.2f} {'✅' if r <= 1.0 else '❌'}")
                else:
                    row.append("–")
            row += [fmt_unit(per[n][s]) if s in per[n] else "–" for n in names]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        growth = []
        for n in names:
            got = [s for s in sizes if s in per[n]]
            if len(got) < 2:
                growth.append(f"{n}: – (fewer than two sizes measured)")
                continue
            lo, hi = got[0], got[-1]
            g = per[n][hi] / per[n][lo]
            part = "" if hi == sizes[-1] and lo == sizes[0] else "; not every size measured"
            growth.append(f"{n} {g:.2f} {'✅' if g <= 1.0 else '❌'} ({curve.label(hi)} vs {curve.label(lo)}: "
                          f"{fmt_unit(per[n][hi])} vs {fmt_unit(per[n][lo])} {curve.unit}{part})")
        lines += ["Growth (time per unit at the largest size ÷ at the smallest; ≤ 1.0 is at most linear): "
                  + "; ".join(growth) + ".", ""]
    errs = [(s, n, e) for s, n, e in bench.errors if s.startswith(curve.name + " ")]
    if errs:
        lines += ["Failures (whole message, last lines):", ""]
        for s, n, e in errs:
            tail = [ln for ln in e.strip().splitlines() if ln.strip()][-6:]
            tail = [re.sub(r"/tmp/kiln-bench-[^ ]*?/", "…/", ln) for ln in tail]
            lines += [f"- {s}, {n}:", "", "  ```", *[f"  {ln[:300]}" for ln in tail], "  ```", ""]
    return "\n".join(lines).rstrip() + "\n"


SECTION = re.compile(r"<!-- curve (\w+) -->\n(.*?)<!-- end curve \1 -->\n", re.S)


def write_report(path, date, sections):
    """Replaces the given curves' sections in path (keeping the others) and rewrites its head."""
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = {m.group(1): m.group(2) for m in SECTION.finditer(f.read())}
    old.update(sections)
    head = [f"# kiln cost curves {date}", "",
            "`python3 bench/curves.py` (see bench/README.md): each point is kiln and its peer in the same "
            "run, interleaved rep by rep; wall-clock seconds, median (min–max) over the repetitions. "
            "kiln/peer is median over median (✅ at or below the peer). The per-unit columns divide the "
            "median by the work (files/1,000, steps, builds, GiB); growth is per-unit at the largest size "
            "over per-unit at the smallest (✅ at most 1.0: the cost grows at most linearly with the work). "
            "Every cold repetition ran with plain progress and was checked to show no step after `FROM` as "
            "`CACHED`. The machine is shared with other engineers' compiles: read the ratios, which come from "
            "the same run, more than the absolute times.", ""]
    missing = [c.name for c in CURVES if c.name not in old]
    if missing:
        head += [f"Not measured (yet): {', '.join(missing)}.", ""]
    # the curves in their order, then any other marked section (e.g. notes added by hand)
    order = [c.name for c in CURVES if c.name in old] + [n for n in old if n not in BY_NAME]
    body = "".join(f"<!-- curve {n} -->\n{old[n]}<!-- end curve {n} -->\n\n" for n in order)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(head) + "\n" + body.rstrip() + "\n")


# ---------------------------------------------------------------- main


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    # SIGTERM, or SIGINT even when started in the background, stops the run with the
    # builders stopped and the work dir removed
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--curves", default=os.environ.get("CURVES", "context,chain,conc,image"),
                    help="comma list of curves: context, chain, conc, image")
    ap.add_argument("--reps", type=int, default=int(os.environ.get("CURVE_REPS", "0") or 3))
    ap.add_argument("--reps-largest", type=int, default=int(os.environ.get("CURVE_REPS_LARGEST", "0") or 0),
                    help="repetitions at each curve's largest size (default: --reps)")
    default_peer = "buildctl" if os.environ.get("BUILDCTL") and os.environ.get("BUILDKIT_HOST") else "docker"
    ap.add_argument("--peers", default=os.environ.get("CURVE_PEERS", default_peer),
                    help="comma list of peers (docker, buildctl, buildah); default: buildctl when BUILDCTL "
                         "and BUILDKIT_HOST are set, else docker")
    ap.add_argument("--out", default=os.environ.get("CURVE_OUT", ""),
                    help="report path (default bench/results/<date>-curves.md)")
    a = ap.parse_args()
    names = [n.strip() for n in a.curves.split(",") if n.strip()]
    for n in names:
        if n not in BY_NAME:
            raise SystemExit(f"unknown curve {n}: expected one of {', '.join(BY_NAME)}")
    if not os.environ.get("BENCH_TIMEOUT"):
        B.BUILD_TIMEOUT = LONG
    now = datetime.datetime.now()
    out = a.out or os.path.join(B.REPO, "bench/results", f"{now:%Y-%m-%d}-curves.md")

    tmp = tempfile.mkdtemp(prefix="kiln-bench-", dir=os.environ.get("BENCH_TMP_PARENT"))
    B.log(f"work dir {tmp}; curves {', '.join(names)}; {a.reps} rep(s)"
          + (f", {a.reps_largest} at the largest sizes" if a.reps_largest else ""))
    builders, notes = [], []
    regdir = os.path.join(tmp, "registry")
    try:
        reg = B.start_builders(tmp, regdir, a.peers.split(","), False, builders, notes)
        if len(builders) < 2:
            B.log("no peer could run: kiln figures only")
        rev = subprocess.run(["git", "-C", B.REPO, "describe", "--always", "--dirty"],
                             stdout=subprocess.PIPE).stdout.decode().strip()
        kernel = subprocess.run(["uname", "-r"], stdout=subprocess.PIPE).stdout.decode().strip()
        kilnd = builders[0].kilnd
        with open(kilnd, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        mtime = datetime.datetime.fromtimestamp(os.path.getmtime(kilnd), datetime.timezone.utc)
        notes.insert(1, f"kilnd binary {kilnd} (built {mtime:%Y-%m-%d %H:%M} UTC, sha256 {digest}…)")
        bench = CurveBench(builders, {}, a.reps, False, tmp, reg)
        for n in names:
            curve = BY_NAME[n]
            sizes = curve.sizes()

            def reps_of(s, sizes=sizes):
                return a.reps_largest if a.reps_largest and s == sizes[-1] else a.reps
            notes_n = ([curve.note] if curve.note else []) + notes
            B.log(f"== curve {n}: {', '.join(curve.label(s) for s in sizes)}")
            load0 = " ".join(open("/proc/loadavg").read().split()[:3])
            t0 = time.monotonic()
            started = datetime.datetime.now()
            for i, s in enumerate(sizes):
                B.log(f"== {n} @ {curve.label(s)} ({reps_of(s)} rep(s))")
                RUNNERS[n](bench, curve, s, reps_of(s))
                # the report after every size, so an interrupted run leaves what it measured
                load1 = " ".join(open("/proc/loadavg").read().split()[:3])
                left = sizes[i + 1:]
                meta = [f"run {started:%Y-%m-%d %H:%M}, took {(time.monotonic() - t0) / 60:.1f} min; kiln tree "
                        f"{rev or '?'}; host {os.cpu_count()} CPUs, kernel {kernel}; load average "
                        f"{load0} at start, {load1} at end"] + notes_n
                if left:
                    meta.insert(0, "**incomplete**: the run stopped before "
                                + ", ".join(curve.label(x) for x in left))
                text = section(bench, curve, sizes, reps_of, meta)
                write_report(out, f"{now:%Y-%m-%d}", {n: text})
            print(text, flush=True)
            B.log(f"wrote {out} (curve {n})")
    finally:
        B.stop_builders(builders, tmp, regdir)


if __name__ == "__main__":
    main()

//! Builds for other platforms through QEMU user-mode emulation: on this host a
//! `RUN` step of `--opt platform=linux/arm64` runs the arm64 busybox of the seeded
//! index (`scripts/seed-busybox.sh`) through the binfmt_misc handler that Debian's
//! `qemu-user-static` registers (`scripts/binfmt.sh`, run by `scripts/test.sh`).
//! The worker lists the emulated platforms; a platform with no emulator fails
//! before its step starts, saying so. Nothing here is skipped: without the
//! handler the tests fail, naming the fix.

use anyhow::{Context, Result, bail};
use kiln_integration_tests::{
    Backend, BuildContext, Daemon, Topology, dockerfile_args, oci_image, tar_entry,
};
use std::path::Path;

/// The architecture `uname -m` says for arm64, and the foreign platform the
/// tests build (amd64's on arm64 hosts).
fn foreign() -> (&'static str, &'static str, &'static str) {
    if cfg!(target_arch = "aarch64") {
        ("linux/amd64", "amd64", "x86_64")
    } else {
        ("linux/arm64", "arm64", "aarch64")
    }
}

fn host() -> (&'static str, &'static str, &'static str) {
    if cfg!(target_arch = "aarch64") {
        ("linux/arm64", "arm64", "aarch64")
    } else {
        ("linux/amd64", "amd64", "x86_64")
    }
}

const DOCKERFILE: &str = "FROM busybox\nRUN uname -m > /arch\n";

fn build(d: &Daemon, ctx: &Path, extra: &[&str]) -> Result<std::process::Output> {
    let mut args: Vec<&str> = vec!["build", "--progress", "plain"];
    args.extend(dockerfile_args());
    args.extend(extra);
    d.kiln(ctx, &args)
}

fn built(d: &Daemon, ctx: &Path, extra: &[&str]) -> Result<()> {
    let out = build(d, ctx, extra)?;
    if !out.status.success() {
        bail!(
            "kiln build failed: {}\n--- kilnd ---\n{}\n(is the emulator registered? sh scripts/binfmt.sh)",
            String::from_utf8_lossy(&out.stderr),
            d.logs()
        );
    }
    Ok(())
}

/// The ELF machine of a binary's header (`e_machine`, little-endian hosts' binaries).
fn elf_machine(bin: &[u8]) -> Option<u16> {
    let b = bin.get(18..20)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

fn machine_of(arch: &str) -> u16 {
    if arch == "arm64" { 183 } else { 62 }
}

fn workers(d: &Daemon) -> Result<String> {
    let out = d.kiln(Path::new("."), &["debug", "workers"])?;
    if !out.status.success() {
        bail!(
            "kiln debug workers: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kiln debug workers` (ListWorkers) lists the host's platform first, then the
/// emulated ones in BuildKit's normal form.
#[test]
fn workers_list_the_emulated_platforms() -> Result<()> {
    for topology in [Topology::AllInOne, Topology::Split] {
        let d = Daemon::start(topology)?;
        let out = workers(&d)?;
        let line = out
            .lines()
            .nth(1)
            .with_context(|| format!("no worker in {out:?}"))?;
        let platforms: Vec<&str> = line
            .split('\t')
            .nth(1)
            .context("no platforms column")?
            .split(',')
            .collect();
        assert_eq!(platforms.first().copied(), Some(host().0), "{out}");
        assert!(
            platforms.contains(&foreign().0),
            "{topology:?}: {out}\n(the {} emulator is not registered: sh scripts/binfmt.sh)",
            foreign().0
        );
        if !cfg!(target_arch = "aarch64") {
            // qemu-user-static's arm handler, in BuildKit's form
            assert!(platforms.contains(&"linux/arm/v7"), "{out}");
        }
    }
    Ok(())
}

/// `RUN uname -m` of a linux/arm64 build runs the arm64 busybox under emulation:
/// `aarch64`, and the image's config says arm64.
#[test]
fn run_step_of_another_platform_runs_emulated() -> Result<()> {
    let (plat, arch, machine) = foreign();
    let d = Daemon::start(Topology::AllInOne)?;
    let ctx = BuildContext::new(DOCKERFILE)?;
    let dir = ctx.path();
    let opt = format!("platform={plat}");
    built(
        &d,
        dir,
        &[
            "--opt",
            &opt,
            "--output",
            "type=local,dest=out",
            "--output",
            "type=oci,dest=img.tar",
        ],
    )?;
    let got = std::fs::read_to_string(dir.join("out/arch")).context("/arch")?;
    assert_eq!(got.trim(), machine);
    let busybox = std::fs::read(dir.join("out/bin/busybox"))?;
    assert_eq!(
        elf_machine(&busybox),
        Some(machine_of(arch)),
        "the {arch} busybox of the index"
    );
    let img = oci_image(&dir.join("img.tar"))?;
    assert_eq!(img.config["architecture"], arch, "{}", img.config);
    assert_eq!(img.config["os"], "linux");
    Ok(())
}

/// The same with the worker in a process of its own, and on the containerd
/// executor: the kernel starts the emulator whatever runs the step.
#[test]
fn emulated_steps_run_split_and_on_containerd() -> Result<()> {
    let (plat, _, machine) = foreign();
    let mut daemons = vec![("split", Daemon::start(Topology::Split)?)];
    if let Some(backend) = Backend::containerd() {
        daemons.push((
            "containerd",
            Daemon::start_on(Topology::AllInOne, &backend, "")?,
        ));
    }
    for (what, d) in &daemons {
        let ctx = BuildContext::new(DOCKERFILE)?;
        let opt = format!("platform={plat}");
        built(
            d,
            ctx.path(),
            &["--opt", &opt, "--output", "type=local,dest=out"],
        )?;
        let got = std::fs::read_to_string(ctx.path().join("out/arch")).context("/arch")?;
        assert_eq!(got.trim(), machine, "{what}");
    }
    Ok(())
}

/// Two platforms in one build: each image's step ran its own platform's binary,
/// and the index names both.
#[test]
fn two_platforms_each_run_their_own_binaries() -> Result<()> {
    let d = Daemon::start(Topology::AllInOne)?;
    let ctx = BuildContext::new(DOCKERFILE)?;
    let dir = ctx.path();
    let both = if cfg!(target_arch = "aarch64") {
        "platform=linux/arm64,linux/amd64"
    } else {
        "platform=linux/amd64,linux/arm64"
    };
    built(
        &d,
        dir,
        &[
            "--opt",
            both,
            "--output",
            "type=local,dest=out",
            "--output",
            "type=oci,dest=multi.tar",
        ],
    )?;
    for (_, arch, machine) in [host(), foreign()] {
        let got = std::fs::read_to_string(dir.join(format!("out/linux_{arch}/arch")))
            .with_context(|| format!("/arch of {arch}"))?;
        assert_eq!(got.trim(), machine, "{arch}");
    }
    let index: serde_json::Value =
        serde_json::from_slice(&tar_entry(&dir.join("multi.tar"), "index.json")?)?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json names no index")?;
    let inner: serde_json::Value = serde_json::from_slice(&tar_entry(
        &dir.join("multi.tar"),
        &format!("blobs/{}", digest.replacen(':', "/", 1)),
    )?)?;
    let mut archs: Vec<&str> = inner["manifests"]
        .as_array()
        .context("manifests")?
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap_or(""))
        .collect();
    archs.sort_unstable();
    assert_eq!(archs, vec!["amd64", "arm64"], "{inner}");
    Ok(())
}

/// A step of a platform no emulator runs fails before it starts, naming the
/// platform and the fix, not with "exec format error".
#[test]
fn a_platform_without_an_emulator_fails_clearly() -> Result<()> {
    let d = Daemon::start(Topology::AllInOne)?;
    let listed = workers(&d)?;
    // one no handler of this machine runs: qemu-user-static registers the common
    // ones, not big-endian arm64
    let plat = ["linux/s390x", "linux/riscv64", "linux/arm64be"]
        .into_iter()
        .find(|p| !listed.contains(p))
        .context("every candidate platform is emulated here")?;
    let arch = plat.trim_start_matches("linux/");
    let ctx = BuildContext::new("FROM scratch\nRUN true\n")?;
    let opt = format!("platform={plat}");
    let out = build(&d, ctx.path(), &["--opt", &opt])?;
    assert!(!out.status.success(), "a {plat} step ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot run {plat} steps")),
        "names the platform: {err}"
    );
    assert!(
        err.contains(&format!("no binfmt_misc handler runs {arch} binaries")),
        "{err}"
    );
    assert!(
        err.contains("qemu-user-static"),
        "says how to fix it: {err}"
    );
    assert!(!err.contains("exec format error"), "{err}");
    Ok(())
}

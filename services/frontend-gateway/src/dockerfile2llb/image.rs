//! Instructions that only change the image config (ENV, LABEL, USER, CMD,
//! ENTRYPOINT, EXPOSE, VOLUME, STOPSIGNAL, SHELL, MAINTAINER, HEALTHCHECK,
//! ONBUILD) and their history entries.

use std::collections::BTreeMap;

use kiln_dockerfile::{CommandLine, Healthcheck, KeyValue};
use kiln_oci::EmptyObject;

use super::Error;
use super::stage::{StageState, go_quote_list};

/// What went wrong, for [`super::Error::InvalidInstruction`].
pub(crate) type Reason = String;

/// The stage's shell (SHELL or `/bin/sh -c`) with `args` joined.
pub(crate) fn with_shell(st: &StageState, args: &[String]) -> Vec<String> {
    let mut out = match &st.image.config.shell {
        Some(shell) if !shell.is_empty() => shell.clone(),
        _ => vec!["/bin/sh".to_string(), "-c".to_string()],
    };
    out.push(args.join(" "));
    out
}

pub(crate) fn command_args(st: &StageState, cmd: &CommandLine) -> Vec<String> {
    match cmd {
        CommandLine::Exec(v) => v.clone(),
        CommandLine::Shell(s) => with_shell(st, std::slice::from_ref(s)),
    }
}

pub(crate) fn env(st: &mut StageState, kvs: &[KeyValue]) {
    let mut msg = String::from("ENV");
    for kv in kvs {
        msg.push_str(&format!(" {}={}", kv.key, kv.value));
        st.add_env(&kv.key, &kv.value);
        st.add_image_env(&kv.key, &kv.value);
    }
    st.commit_empty(msg);
}

pub(crate) fn label(st: &mut StageState, kvs: &[KeyValue]) {
    let mut msg = String::from("LABEL");
    let labels = st.image.config.labels.get_or_insert_with(BTreeMap::new);
    for kv in kvs {
        labels.insert(kv.key.clone(), kv.value.clone());
        msg.push_str(&format!(" {}={}", kv.key, kv.value));
    }
    st.commit_empty(msg);
}

pub(crate) fn user(st: &mut StageState, user: &str) {
    st.user = user.to_string();
    st.image.config.user = user.to_string();
    st.commit_empty(format!("USER {user}"));
}

pub(crate) fn cmd(st: &mut StageState, cmd: &CommandLine) {
    let args = command_args(st, cmd);
    st.image.config.cmd = Some(args.clone());
    st.image
        .config
        .extra
        .insert("ArgsEscaped".to_string(), serde_json::Value::Bool(true));
    st.cmd_set = true;
    st.commit_empty(format!("CMD {}", go_quote_list(&args)));
}

pub(crate) fn entrypoint(st: &mut StageState, cmd: &CommandLine) {
    let args = command_args(st, cmd);
    st.image.config.entrypoint = Some(args.clone());
    if !st.cmd_set {
        st.image.config.cmd = None;
    }
    st.commit_empty(format!("ENTRYPOINT {}", go_quote_list(&args)));
}

/// Port specs as BuildKit's `parsePorts` reads them: `[[ip:]hostPort:]port[-end][/proto]`,
/// each giving `port/proto` (in the given order, duplicates kept) for the container port.
pub(crate) fn parse_ports(specs: &[String]) -> Result<Vec<String>, Reason> {
    let mut out = Vec::new();
    for spec in specs {
        out.extend(parse_port(spec)?);
    }
    Ok(out)
}

fn parse_port(raw: &str) -> Result<Vec<String>, Reason> {
    let parts: Vec<&str> = raw.split(':').collect();
    let n = parts.len();
    let (ip, host_port, container) = match n {
        1 => (String::new(), "", parts[0]),
        2 => (String::new(), parts[0], parts[1]),
        _ => (parts[..n - 2].join(":"), parts[n - 2], parts[n - 1]),
    };
    let (port, proto) = container.split_once('/').unwrap_or((container, ""));
    if port.is_empty() {
        return Err(format!("invalid port: {raw:?}: no port specified"));
    }
    let proto = match proto.to_ascii_lowercase().as_str() {
        "" => "tcp".to_string(),
        p @ ("tcp" | "udp" | "sctp") => p.to_string(),
        _ => return Err(format!("invalid port: {raw:?}: invalid proto: {proto}")),
    };
    let ip = match ip.strip_prefix('[') {
        Some(rest) => match rest.strip_suffix(']') {
            Some(inner) => inner.to_string(),
            None => return Err(format!("invalid IP address {ip}")),
        },
        None => ip,
    };
    if !ip.is_empty() && ip.parse::<std::net::IpAddr>().is_err() {
        return Err(format!("invalid IP address: {ip}"));
    }
    let (start, end) = port_range(port).map_err(|_| format!("invalid containerPort: {port}"))?;
    if !host_port.is_empty() {
        let (host_start, host_end) =
            port_range(host_port).map_err(|_| format!("invalid hostPort: {host_port}"))?;
        if end - start != host_end - host_start && end != start {
            return Err(format!(
                "invalid ranges specified for container and host Ports: {port} and {host_port}"
            ));
        }
    }
    Ok((start..=end).map(|p| format!("{p}/{proto}")).collect())
}

/// `8000` or `8000-9000` (BuildKit's `parsePortRange`).
fn port_range(ports: &str) -> Result<(i64, i64), ()> {
    let number = |s: &str| -> Result<i64, ()> {
        let p = s.parse::<i64>().map_err(|_| ())?;
        if (0..=65535).contains(&p) {
            Ok(p)
        } else {
            Err(())
        }
    };
    if ports.is_empty() {
        return Err(());
    }
    let (start, end) = match ports.split_once('-') {
        Some((a, b)) => (a, Some(b)),
        None => (ports, None),
    };
    let first = number(start)?;
    match end {
        None => Ok((first, first)),
        Some(end) if end == start => Ok((first, first)),
        Some(end) => {
            let last = number(end)?;
            if last < first {
                return Err(());
            }
            Ok((first, last))
        }
    }
}

pub(crate) fn expose(st: &mut StageState, specs: &[String]) -> Result<(), Reason> {
    let ports = parse_ports(specs)?;
    let exposed = st
        .image
        .config
        .exposed_ports
        .get_or_insert_with(BTreeMap::new);
    for p in &ports {
        exposed.insert(p.clone(), EmptyObject {});
    }
    st.commit_empty(format!("EXPOSE [{}]", ports.join(" ")));
    Ok(())
}

pub(crate) fn volume(st: &mut StageState, volumes: &[String]) -> Result<(), Reason> {
    let map = st.image.config.volumes.get_or_insert_with(BTreeMap::new);
    for v in volumes {
        if v.is_empty() {
            return Err("VOLUME specified can not be an empty string".to_string());
        }
        map.insert(v.clone(), EmptyObject {});
    }
    st.commit_empty(format!("VOLUME [{}]", volumes.join(" ")));
    Ok(())
}

const SIGNALS: &[&str] = &[
    "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT", "KILL",
    "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM", "TRAP", "TSTP",
    "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ", "UNUSED",
];

/// Accepts numbers, `SIGTERM`/`TERM`, and `RTMIN+n`/`RTMAX-n` like moby/sys/signal.
pub(crate) fn valid_signal(s: &str) -> bool {
    if let Ok(n) = s.parse::<u32>() {
        return n > 0 && n < 65;
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    SIGNALS.contains(&name)
        || name == "RTMIN"
        || name == "RTMAX"
        || name
            .strip_prefix("RTMIN+")
            .or_else(|| name.strip_prefix("RTMAX-"))
            .is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n <= 30))
}

pub(crate) fn stop_signal(st: &mut StageState, signal: &str) -> Result<(), Reason> {
    if !valid_signal(signal) {
        return Err(format!("invalid signal: {signal}"));
    }
    st.image.config.stop_signal = Some(signal.to_string());
    st.commit_empty(format!("STOPSIGNAL {signal}"));
    Ok(())
}

pub(crate) fn shell(st: &mut StageState, shell: &[String]) {
    st.image.config.shell = Some(shell.to_vec());
    st.commit_empty(format!("SHELL [{}]", shell.join(" ")));
}

pub(crate) fn maintainer(st: &mut StageState, who: &str) {
    st.image.author = Some(who.to_string());
    st.commit_empty(format!("MAINTAINER {who}"));
}

/// Go's `%q` of an integer: a quoted rune literal.
fn go_quote_rune(n: u32) -> String {
    let body = match char::from_u32(n) {
        Some('\'') => "\\'".to_string(),
        Some('\\') => "\\\\".to_string(),
        Some('\u{7}') => "\\a".to_string(),
        Some('\u{8}') => "\\b".to_string(),
        Some('\u{c}') => "\\f".to_string(),
        Some('\n') => "\\n".to_string(),
        Some('\r') => "\\r".to_string(),
        Some('\t') => "\\t".to_string(),
        Some('\u{b}') => "\\v".to_string(),
        Some(c) if !c.is_control() => c.to_string(),
        _ if n < 0x80 => format!("\\x{n:02x}"),
        _ => format!("\\u{n:04x}"),
    };
    format!("'{body}'")
}

/// A HEALTHCHECK duration flag in nanoseconds (0 when not given).
fn healthcheck_duration(
    value: Option<&str>,
    flag: &'static str,
    line: usize,
) -> Result<i64, Error> {
    let Some(value) = value else {
        return Ok(0);
    };
    let ns = kiln_units::parse_go_duration(value)
        .map_err(|source| Error::InvalidHealthcheckDuration { line, flag, source })?;
    // BuildKit's parseOptInterval: anything but 0 under a millisecond (negative
    // too), named by its flag, whichever flag it is
    if ns != 0 && ns < 1_000_000 {
        return Err(Error::InvalidInstruction {
            line,
            instruction: "HEALTHCHECK".to_string(),
            reason: format!("Interval {flag:?} cannot be less than 1ms"),
        });
    }
    Ok(ns)
}

pub(crate) fn healthcheck(st: &mut StageState, hc: &Healthcheck, line: usize) -> Result<(), Error> {
    let mut obj = serde_json::Map::new();
    obj.insert("Test".to_string(), serde_json::json!(hc.test));
    let mut durations = Vec::new();
    for (flag, key, value) in [
        ("interval", "Interval", &hc.interval),
        ("timeout", "Timeout", &hc.timeout),
        ("start-period", "StartPeriod", &hc.start_period),
        ("start-interval", "StartInterval", &hc.start_interval),
    ] {
        let ns = healthcheck_duration(value.as_deref(), flag, line)?;
        if ns != 0 {
            obj.insert(key.to_string(), serde_json::json!(ns));
        }
        durations.push(format!("\"{}\"", kiln_units::format_go_duration(ns)));
    }
    if let Some(r) = hc.retries.filter(|r| *r > 0) {
        obj.insert("Retries".to_string(), serde_json::json!(r));
    }
    let test = go_quote_list(&hc.test);
    let retries = go_quote_rune(hc.retries.unwrap_or(0));
    st.image.config.healthcheck = Some(serde_json::Value::Object(obj));
    st.commit_empty(format!(
        "HEALTHCHECK &{{{test} {} {retries}}}",
        durations.join(" ")
    ));
    Ok(())
}

pub(crate) fn onbuild(st: &mut StageState, expression: &str) {
    st.image
        .config
        .on_build
        .get_or_insert_with(Vec::new)
        .push(expression.to_string());
}

/// `|N K=V ... args` as BuildKit's runCommandString.
pub(crate) fn run_command_string(st: &StageState, args: &[String]) -> String {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for arg in &st.build_args {
        let v = st
            .env
            .iter()
            .rev()
            .find(|(k, _)| *k == arg.key)
            .map(|(_, v)| v.clone())
            .or_else(|| arg.value.clone())
            .unwrap_or_default();
        match pairs.iter_mut().find(|(k, _)| *k == arg.key) {
            Some((_, value)) => *value = v,
            None => pairs.push((arg.key.clone(), v)),
        }
    }
    let mut parts: Vec<String> = Vec::new();
    if !pairs.is_empty() {
        parts.push(format!("|{}", pairs.len()));
        parts.extend(pairs.into_iter().map(|(k, v)| format!("{k}={v}")));
    }
    parts.extend(args.iter().cloned());
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        let s = |v: &[&str]| parse_ports(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(s(&["8080/tcp"]), Ok(vec!["8080/tcp".to_string()]));
        assert_eq!(s(&["80"]), Ok(vec!["80/tcp".to_string()]));
        assert_eq!(
            s(&["53/UDP", "80"]),
            Ok(vec!["53/udp".to_string(), "80/tcp".to_string()])
        );
        assert_eq!(s(&["7000-7002"]).map(|v| v.len()), Ok(3));
        assert_eq!(
            s(&[
                "80/TCP",
                "8080:81",
                "127.0.0.1:8082:82/udp",
                "[::1]:1:2",
                "80"
            ]),
            Ok(["80/tcp", "81/tcp", "82/udp", "2/tcp", "80/tcp"]
                .map(String::from)
                .to_vec())
        );
        assert_eq!(s(&["x"]), Err("invalid containerPort: x".to_string()));
        assert_eq!(
            s(&["80/Foo"]),
            Err("invalid port: \"80/Foo\": invalid proto: Foo".to_string())
        );
        assert_eq!(s(&["9-8"]), Err("invalid containerPort: 9-8".to_string()));
        assert_eq!(
            s(&["70000"]),
            Err("invalid containerPort: 70000".to_string())
        );
        assert_eq!(
            s(&["/udp"]),
            Err("invalid port: \"/udp\": no port specified".to_string())
        );
        assert_eq!(s(&["a:1:2"]), Err("invalid IP address: a".to_string()));
        assert_eq!(
            s(&["1-2:3-5"]),
            Err("invalid ranges specified for container and host Ports: 3-5 and 1-2".to_string())
        );
        assert_eq!(s(&["1-3:5"]).map(|v| v.len()), Ok(1));
    }

    #[test]
    fn signals_and_runes() {
        assert!(
            valid_signal("SIGTERM")
                && valid_signal("term")
                && valid_signal("9")
                && valid_signal("SIGRTMIN+3")
        );
        assert!(!valid_signal("SIGFOO") && !valid_signal("0") && !valid_signal(""));
        assert_eq!(go_quote_rune(3), "'\\x03'");
        assert_eq!(go_quote_rune(65), "'A'");
    }
}

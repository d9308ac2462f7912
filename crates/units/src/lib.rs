//! Durations and sizes in the grammars BuildKit's users already write, so a
//! value means the same in a Dockerfile, a `kiln`/`buildctl` flag and
//! `kilnd.toml`:
//! - durations are Go's `time.ParseDuration` (`1h30m`, `500ms`, `1.5s`), the
//!   grammar of `HEALTHCHECK --interval`, `buildctl prune --keep-duration`
//!   and prune filters; config files also take bare seconds, as buildkitd.toml does;
//! - sizes are go-units' `RAMInBytes` (`512m`, `10GB`, `1.5GiB`, `4096`;
//!   `k`/`m`/`g`/`t`/`p` are powers of 1024 with or without `i`/`b`), the grammar
//!   of `RUN --mount=type=tmpfs,size=` and buildkitd.toml's `keepBytes`.
//!
//! Pure functions, no dependencies beyond `thiserror`.

use std::time::Duration;

/// A duration or size that does not follow its grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid duration {value:?}")]
    InvalidDuration { value: String },
    #[error("missing unit in duration {value:?} (use ns, us, ms, s, m or h)")]
    MissingUnit { value: String },
    #[error("unknown unit {unit:?} in duration {value:?} (use ns, us, ms, s, m or h)")]
    UnknownUnit { unit: String, value: String },
    #[error("negative duration {value:?}")]
    NegativeDuration { value: String },
    #[error("invalid size {value:?}")]
    InvalidSize { value: String },
}

const UNITS: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Go's `time.ParseDuration`, in nanoseconds (may be negative).
pub fn parse_go_duration(value: &str) -> Result<i64, Error> {
    let invalid = || Error::InvalidDuration {
        value: value.to_string(),
    };
    let (neg, mut rest) = match value.as_bytes().first() {
        Some(b'-') => (true, &value[1..]),
        Some(b'+') => (false, &value[1..]),
        _ => (false, value),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    // Nanoseconds, scaled by 10^9 to keep fractions exact until the end.
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let int = &rest[..int_len];
        rest = &rest[int_len..];
        let mut frac = "";
        if let Some(after) = rest.strip_prefix('.') {
            let n = after.bytes().take_while(u8::is_ascii_digit).count();
            frac = &after[..n];
            rest = &after[n..];
        }
        if int.is_empty() && frac.is_empty() {
            return Err(invalid());
        }
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        if unit.is_empty() {
            return Err(Error::MissingUnit {
                value: value.to_string(),
            });
        }
        let Some(&(_, scale)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(Error::UnknownUnit {
                unit: unit.to_string(),
                value: value.to_string(),
            });
        };
        let whole: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| invalid())?
        };
        // Go keeps as many fraction digits as fit; 18 is far past nanoseconds.
        let frac = &frac[..frac.len().min(18)];
        let frac_num: u128 = if frac.is_empty() {
            0
        } else {
            frac.parse().map_err(|_| invalid())?
        };
        let frac_ns = frac_num * scale / 10u128.pow(frac.len() as u32);
        total = whole
            .checked_mul(scale)
            .and_then(|w| w.checked_add(frac_ns))
            .and_then(|v| v.checked_add(total))
            .filter(|v| *v <= i64::MAX as u128)
            .ok_or_else(invalid)?;
    }
    let total = total as i64;
    Ok(if neg { -total } else { total })
}

/// A non-negative Go duration (`24h`, `90m`, `1h30m`, `500ms`).
pub fn parse_duration(value: &str) -> Result<Duration, Error> {
    let ns = parse_go_duration(value.trim())?;
    u64::try_from(ns)
        .map(Duration::from_nanos)
        .map_err(|_| Error::NegativeDuration {
            value: value.to_string(),
        })
}

/// A duration in a config file: a Go duration or a whole number of seconds,
/// as buildkitd.toml's `keepDuration` takes it.
pub fn parse_config_duration(value: &str) -> Result<Duration, Error> {
    match value.trim().parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => parse_duration(value),
    }
}

/// Go's `time.Duration.String()` of `ns` nanoseconds (`1m30s`, `500ms`, `0s`).
pub fn format_go_duration(ns: i64) -> String {
    if ns == 0 {
        return "0s".to_string();
    }
    let sign = if ns < 0 { "-" } else { "" };
    let u = ns.unsigned_abs();
    // `whole.fraction` of v / unit with trailing zeros dropped.
    let decimal = |v: u64, unit: u64| -> String {
        let (whole, rest) = (v / unit, v % unit);
        if rest == 0 {
            return whole.to_string();
        }
        let digits = unit.ilog10() as usize;
        let frac = format!("{rest:0digits$}");
        format!("{whole}.{}", frac.trim_end_matches('0'))
    };
    if u < 1_000 {
        return format!("{sign}{u}ns");
    }
    if u < 1_000_000 {
        return format!("{sign}{}µs", decimal(u, 1_000));
    }
    if u < 1_000_000_000 {
        return format!("{sign}{}ms", decimal(u, 1_000_000));
    }
    let secs_ns = u % 60_000_000_000;
    let mins = u / 60_000_000_000;
    let (h, m) = (mins / 60, mins % 60);
    let s = format!("{}s", decimal(secs_ns, 1_000_000_000));
    match (h, m) {
        (0, 0) => format!("{sign}{s}"),
        (0, m) => format!("{sign}{m}m{s}"),
        (h, m) => format!("{sign}{h}h{m}m{s}"),
    }
}

/// go-units' `RAMInBytes`: `4096`, `512m`, `1.5GiB`, `10 GB` (powers of 1024).
pub fn parse_size(value: &str) -> Result<i64, Error> {
    let invalid = || Error::InvalidSize {
        value: value.to_string(),
    };
    let t = value.trim();
    let num_len = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(num_len);
    // go-units: digits, then `.digits` groups; no leading or trailing dot.
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.contains("..") {
        return Err(invalid());
    }
    let n: f64 = num.parse().map_err(|_| invalid())?;
    let unit = unit.strip_prefix(' ').unwrap_or(unit).to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let power = match unit {
        "" => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        "p" => 5,
        _ => return Err(invalid()),
    };
    let bytes = n * 1024f64.powi(power);
    if !bytes.is_finite() || bytes >= i64::MAX as f64 {
        return Err(invalid());
    }
    Ok(bytes as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_go() {
        let ok = [
            ("0", 0),
            ("5s", 5_000_000_000),
            ("1h30m", 5_400_000_000_000),
            ("1.5s", 1_500_000_000),
            (".5s", 500_000_000),
            ("500ms", 500_000_000),
            ("10us", 10_000),
            ("10µs", 10_000),
            ("3ns", 3),
            ("-1m", -60_000_000_000),
            ("+2h", 7_200_000_000_000),
            ("1h2m3s4ms", 3_723_004_000_000),
        ];
        for (s, ns) in ok {
            assert_eq!(parse_go_duration(s), Ok(ns), "{s}");
        }
        for bad in [
            "",
            "5",
            "s",
            "1d",
            ".s",
            "1.2.3s",
            "-",
            "9999999999h",
            "1 s",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            parse_go_duration("24").expect_err("no unit").to_string(),
            "missing unit in duration \"24\" (use ns, us, ms, s, m or h)"
        );
    }

    #[test]
    fn config_durations_also_take_seconds() {
        assert_eq!(parse_config_duration("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(
            parse_config_duration("48h"),
            Ok(Duration::from_secs(172_800))
        );
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn durations_print_as_go_prints_them() {
        for (ns, s) in [
            (0, "0s"),
            (1_500_000_000, "1.5s"),
            (90_000_000_000, "1m30s"),
            (3_600_000_000_000, "1h0m0s"),
            (500_000_000, "500ms"),
            (1_500, "1.5µs"),
            (7, "7ns"),
            (-30_000_000_000, "-30s"),
        ] {
            assert_eq!(format_go_duration(ns), s);
            if ns != 1_500 {
                assert_eq!(parse_go_duration(s), Ok(ns), "round trip {s}");
            }
        }
    }

    #[test]
    fn sizes_follow_go_units_ram_in_bytes() {
        let ok = [
            ("4096", 4096),
            ("32m", 32 << 20),
            ("32M", 32 << 20),
            ("1g", 1 << 30),
            ("10GB", 10 << 30),
            ("1.5GiB", 3 << 29),
            ("2 kb", 2048),
            ("1p", 1 << 50),
        ];
        for (s, n) in ok {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        for bad in ["", "m", "-1m", "1.m", ".5m", "1x", "1mbb", "1e3"] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
    }
}

//! Parsers for command-line values, run by clap as each argument is read.
//!
//! Every value is checked here, before anything is allocated or connected, so that a mistake
//! costs the user a usage message (exit 2) rather than a preallocated guest, a hang, or the
//! OOM killer. Sizes go through the `parse-size` crate, which parses integers exactly and
//! reports overflow instead of saturating a float.

use std::fmt::Write as _;

/// A size in bytes: `2GiB`, `512MiB`, `1.5G`, `4096`. Decimal prefixes (`k`, `M`, `G`) are
/// powers of 1000, binary ones (`KiB`, `MiB`, `GiB`) powers of 1024.
pub fn size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("{s:?}: a size cannot be negative"));
    }
    parse_size::parse_size(t).map_err(|e| match e {
        parse_size::Error::PosOverflow => {
            format!("{s:?} is too large: sizes stop below 16 EiB")
        }
        _ => format!("{s:?} is not a size; write e.g. 2GiB, 512MiB or 4096"),
    })
}

/// A rate in bytes per second: `125MB` (bytes, `/s` optional) or `1Gbit` / `1Gbps`
/// (bits; a lone `b` is bytes). `0` means unlimited where the flag says so.
pub fn rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let lower = t.to_ascii_lowercase();
    let bits = ["bit", "bps"]
        .iter()
        .find(|u| lower.ends_with(*u))
        .map(|u| &t[..t.len() - u.len()]);
    match bits {
        Some(num) => {
            let b = size(num).map_err(|_| bad_rate(s))?;
            Ok(b / 8)
        }
        None => size(t).map_err(|_| bad_rate(s)),
    }
}

fn bad_rate(s: &str) -> String {
    format!("{s:?} is not a rate; write bytes per second (125MB, 1GB/s) or bits (1Gbit, 800Mbps)")
}

/// A fraction in `0..=1`.
pub fn fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a fraction between 0 and 1 (e.g. 0.25)"
        )),
    }
}

/// A fraction in `0..=1` that must not be 0 (a hot set of no memory dirties nothing).
pub fn positive_fraction(s: &str) -> Result<f64, String> {
    match fraction(s)? {
        0.0 => Err(format!("{s:?}: must be more than 0 and at most 1")),
        v => Ok(v),
    }
}

/// A non-negative, finite rate in MB/s.
pub fn mb_per_s(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a rate in MB/s (0 or more)")),
    }
}

/// A non-negative, finite number of seconds.
pub fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds (0 or more)")),
    }
}

/// A TCP address `HOST:PORT`, also written `tcp:HOST:PORT` as QEMU and ch-remote do; IPv6
/// hosts in brackets (`[::1]:4444`). Returns `HOST:PORT`.
pub fn tcp_addr(s: &str) -> Result<String, String> {
    let t = s.trim();
    let t = match t.get(..4) {
        Some(p) if p.eq_ignore_ascii_case("tcp:") => &t[4..],
        _ => t,
    };
    let Some((host, port)) = t.rsplit_once(':') else {
        return Err(format!(
            "{s:?} has no port; write HOST:PORT or tcp:HOST:PORT"
        ));
    };
    if let Some((scheme, _)) = host.split_once(':') {
        if !host.starts_with('[') && scheme.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(format!(
                "{s:?}: only tcp: addresses are understood (the data transport is --transport)"
            ));
        }
    }
    if host.is_empty() {
        return Err(format!("{s:?} has no host; write e.g. 0.0.0.0:{port}"));
    }
    match port.parse::<u16>() {
        Ok(_) => Ok(t.to_string()),
        Err(_) => Err(format!("{s:?}: {port:?} is not a port (0..=65535)")),
    }
}

/// Bytes with an IEC prefix chosen to fit: `512 B`, `1.50 GiB`.
pub fn iec(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    let mut o = String::new();
    let _ = write!(o, "{} {}", three_digits(v), UNITS[u]);
    o
}

/// A rate in bytes/s with an SI prefix chosen to fit: `950 kB/s`, `1.25 GB/s`.
pub fn si_rate(bytes_per_s: f64) -> String {
    const UNITS: [&str; 5] = ["B/s", "kB/s", "MB/s", "GB/s", "TB/s"];
    let mut v = bytes_per_s.max(0.0);
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    format!("{} {}", three_digits(v), UNITS[u])
}

/// Three significant digits: `1.23`, `12.3`, `123`.
fn three_digits(v: f64) -> String {
    if v >= 99.95 {
        format!("{v:.0}")
    } else if v >= 9.995 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size("2GiB"), Ok(2 << 30));
        assert_eq!(size("512MiB"), Ok(512 << 20));
        assert_eq!(size("1.5G"), Ok(1_500_000_000));
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(
            size("16EiB").unwrap_err(),
            "\"16EiB\" is too large: sizes stop below 16 EiB"
        );
        assert!(size("15EiB").is_ok());
        assert!(size("99999999999TiB").unwrap_err().contains("too large"));
        assert!(size("18446744073709551616")
            .unwrap_err()
            .contains("too large"));
        assert!(size("-1").unwrap_err().contains("negative"));
        assert!(size("12 parsecs").unwrap_err().contains("not a size"));
        assert!(size("").is_err());
    }

    #[test]
    fn rates_in_bytes_and_bits() {
        assert_eq!(rate("125MB"), Ok(125_000_000));
        assert_eq!(rate("125MB/s"), Ok(125_000_000));
        assert_eq!(rate("1Gbit"), Ok(125_000_000));
        assert_eq!(rate("1Gbps"), Ok(125_000_000));
        assert_eq!(rate("800Mbit/s"), Ok(100_000_000));
        assert_eq!(rate("0"), Ok(0));
        assert_eq!(rate("1GB"), Ok(1_000_000_000));
        assert!(rate("fast").unwrap_err().contains("not a rate"));
        assert!(rate("-5MB").is_err());
        assert!(rate("99999999999Tbit").is_err());
    }

    #[test]
    fn fractions() {
        assert_eq!(fraction("0"), Ok(0.0));
        assert_eq!(fraction("1"), Ok(1.0));
        assert!(fraction("7").is_err());
        assert!(fraction("-0.1").is_err());
        assert!(fraction("NaN").is_err());
        assert!(positive_fraction("0").is_err());
        assert!(positive_fraction("2").is_err());
        assert_eq!(positive_fraction("0.1"), Ok(0.1));
    }

    #[test]
    fn addresses() {
        assert_eq!(
            tcp_addr("tcp:10.0.0.1:4444").as_deref(),
            Ok("10.0.0.1:4444")
        );
        assert_eq!(tcp_addr("TCP:host:1").as_deref(), Ok("host:1"));
        assert_eq!(tcp_addr("[::1]:4444").as_deref(), Ok("[::1]:4444"));
        assert_eq!(tcp_addr("tcp:[::1]:4444").as_deref(), Ok("[::1]:4444"));
        assert_eq!(tcp_addr("localhost:4444").as_deref(), Ok("localhost:4444"));
        assert!(tcp_addr("rdma:10.0.0.1:4444").unwrap_err().contains("tcp:"));
        assert!(tcp_addr("10.0.0.1").unwrap_err().contains("no port"));
        assert!(tcp_addr("10.0.0.1:99999")
            .unwrap_err()
            .contains("not a port"));
        assert!(tcp_addr(":4444").unwrap_err().contains("no host"));
    }

    #[test]
    fn units() {
        assert_eq!(iec(512), "512 B");
        assert_eq!(iec(1536 << 20), "1.50 GiB");
        assert_eq!(iec(64 << 20), "64.0 MiB");
        assert_eq!(iec(300 << 10), "300 KiB");
        assert_eq!(si_rate(0.0), "0.00 B/s");
        assert_eq!(si_rate(50e6), "50.0 MB/s");
        assert_eq!(si_rate(1.25e9), "1.25 GB/s");
        assert_eq!(si_rate(950e3), "950 kB/s");
    }
}

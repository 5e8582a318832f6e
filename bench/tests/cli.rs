//! The `rmig-bench` command as a user runs it.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rmig-bench"))
}

fn json_of(out: &std::process::Output) -> Value {
    let s = String::from_utf8_lossy(&out.stdout);
    let line = s.lines().last().unwrap_or_else(|| {
        panic!(
            "no output; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(line).unwrap()
}

#[test]
fn loopback_json_has_query_migrate_names_and_equal_memory() {
    let out = bench()
        .args([
            "loopback",
            "--size",
            "64MiB",
            "--fill",
            "mixed",
            "--dirty-rate",
            "100",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out);
    assert_eq!(j["status"], "completed");
    assert_eq!(j["verified"], true);
    assert_eq!(j["memory_equal"], true);
    assert_eq!(j["transport"], "tcp");
    for k in [
        "total_time_ms",
        "setup_time_ms",
        "downtime_ms",
        "expected_downtime_ms",
        "lanes",
    ] {
        assert!(j[k].is_number(), "{k}");
    }
    for k in [
        "total",
        "transferred",
        "remaining",
        "duplicate",
        "normal",
        "normal_bytes",
        "dirty_sync_count",
        "mbps",
    ] {
        assert!(j["ram"][k].is_number(), "ram.{k}");
    }
    assert_eq!(j["ram"]["total"], 64 << 20);
    assert!(
        j["ram"]["duplicate"].as_u64().unwrap() > 0,
        "mixed fill has zero pages"
    );
    let rounds = j["rounds"].as_array().unwrap();
    assert!(!rounds.is_empty());
    for k in ["pages", "bytes", "duration_ms", "dirty_rate"] {
        assert!(rounds[0][k].is_number(), "rounds[].{k}");
    }
    assert_eq!(j["run"]["prealloc"], true);
}

#[test]
fn verify_off_and_no_prealloc() {
    let out = bench()
        .args([
            "loopback",
            "--size",
            "32MiB",
            "--verify",
            "off",
            "--no-prealloc",
            "--lanes",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let j = json_of(&out);
    assert_eq!(j["verified"], Value::Null);
    assert_eq!(j["memory_equal"], true);
    assert_eq!(j["lanes"], 3);
    assert_eq!(j["run"]["prealloc"], false);
}

#[test]
fn human_table_by_default() {
    let out = bench()
        .args(["loopback", "--size", "16MiB"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("status                 completed"), "{s}");
    assert!(s.contains("memory equal           true"), "{s}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn two_hosts(dest_size: &str, dest_key: &str) -> (std::process::Output, std::process::Output) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dest = bench()
        .args(["dest", "--listen", &addr, "--size", dest_size, "--json"])
        .env("RMIG_KEY", dest_key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let src = bench()
        .args([
            "source",
            "--connect",
            &addr,
            "--size",
            "32MiB",
            "--fill",
            "random",
            "--json",
        ])
        .env("RMIG_KEY", "two-host key")
        .output()
        .unwrap();
    (src, dest.wait_with_output().unwrap())
}

#[test]
fn source_and_dest_across_processes() {
    let (src, dst) = two_hosts("32MiB", "two-host key");
    assert!(
        src.status.success(),
        "{}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(
        dst.status.success(),
        "{}",
        String::from_utf8_lossy(&dst.stderr)
    );
    assert_eq!(json_of(&src)["verified"], true);
    assert_eq!(json_of(&dst)["status"], "completed");
}

#[test]
fn mismatched_sizes_fail_on_both_ends() {
    let (src, dst) = two_hosts("64MiB", "two-host key");
    assert!(!src.status.success());
    assert!(!dst.status.success());
    assert!(json_of(&src)["error"]
        .as_str()
        .unwrap()
        .contains("region table mismatch"));
}

#[test]
fn wrong_key_fails_on_both_ends() {
    let (src, dst) = two_hosts("32MiB", "another key");
    assert!(!src.status.success());
    assert!(!dst.status.success());
    assert!(json_of(&dst)["error"]
        .as_str()
        .unwrap()
        .contains("authentication failed"));
}

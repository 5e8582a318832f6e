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
        .args([
            "dest",
            "--listen",
            &addr,
            "--size",
            dest_size,
            "--json",
            "--incoming-timeout",
            "5",
        ])
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
        .env("RMIG_KEY", "two-host key, 16+ bytes")
        .output()
        .unwrap();
    (src, dest.wait_with_output().unwrap())
}

#[test]
fn source_and_dest_across_processes() {
    let (src, dst) = two_hosts("32MiB", "two-host key, 16+ bytes");
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
    let (src, dst) = two_hosts("64MiB", "two-host key, 16+ bytes");
    assert!(!src.status.success());
    assert!(!dst.status.success());
    assert!(json_of(&src)["error"]
        .as_str()
        .unwrap()
        .contains("region table mismatch"));
    let de = json_of(&dst)["error"].as_str().unwrap().to_string();
    assert!(
        de.contains("1 connections refused") && de.contains("region table mismatch"),
        "{de}"
    );
}

#[test]
fn wrong_key_fails_on_both_ends() {
    let (src, dst) = two_hosts("32MiB", "another key, 16+ bytes");
    assert!(!src.status.success());
    assert!(!dst.status.success());
    assert!(json_of(&dst)["error"]
        .as_str()
        .unwrap()
        .contains("authentication failed"));
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// Sums every sample of `name` (all label sets) in Prometheus text.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let v: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

#[test]
fn metrics_are_served_while_migrating() {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = bench()
        .args([
            "loopback",
            "--size",
            "128MiB",
            "--max-bandwidth",
            "50MB",
            "--json",
            "--metrics-addr",
            &addr,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Mid-migration: 128 MiB at 50 MB/s take about 2.7 s.
    std::thread::sleep(Duration::from_millis(1300));
    let body = http_get(&addr, "/metrics");
    let sent = metric_sum(&body, "rmig_sent_bytes_total").expect("rmig_sent_bytes_total");
    assert!(sent > 10e6 && sent < 128e6, "sent {sent}\n{body}");
    let pages = metric_sum(&body, "rmig_sent_pages_total").expect("pages");
    assert!(pages > 1000.0);
    assert_eq!(
        metric_sum(&body, "rmig_ram_total_bytes"),
        Some((128u64 << 20) as f64)
    );
    assert!(metric_sum(&body, "rmig_lanes").is_some_and(|l| l >= 1.0));
    assert!(
        body.contains("rmig_sent_bytes_total{transport=\"tcp\",lane=\"0\"}"),
        "{body}"
    );
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(json_of(&out)["status"], "completed");
}

#[test]
fn progress_json_has_rounds_and_a_line_a_second() {
    let dir = std::env::temp_dir().join(format!("rmig-progress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prog = dir.join("p.jsonl");
    let out = bench()
        .args([
            "loopback",
            "--size",
            "96MiB",
            "--max-bandwidth",
            "40MB",
            "--dirty-rate",
            "5",
            "--json",
            "--progress-json",
        ])
        .arg(&prog)
        .output()
        .unwrap();
    assert!(out.status.success());
    let result = json_of(&out);
    let lines: Vec<Value> = std::fs::read_to_string(&prog)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rounds = lines.iter().filter(|l| l["kind"] == "round").count();
    assert_eq!(rounds, result["rounds"].as_array().unwrap().len());
    let ticks: Vec<f64> = lines
        .iter()
        .filter(|l| l["kind"] == "tick")
        .map(|l| l["t_ms"].as_f64().unwrap())
        .collect();
    assert!(ticks.len() >= 3, "{ticks:?}");
    for w in ticks.windows(2) {
        assert!(
            w[1] - w[0] <= 1200.0,
            "a gap of {} ms between progress lines",
            w[1] - w[0]
        );
    }
    let mid = lines
        .iter()
        .find(|l| l["kind"] == "tick" && l["status"] == "active")
        .unwrap();
    assert!(mid["remaining"].as_u64().unwrap() > 0);
    assert!(
        mid["eta_switchover_s"].is_number() || mid["bandwidth"] == 0.0,
        "{mid}"
    );
    assert_eq!(lines.last().unwrap()["status"], "completed");

    // The plot of the same run, in both formats.
    let res = dir.join("r.json");
    std::fs::write(&res, &out.stdout).unwrap();
    for ext in ["svg", "png"] {
        let pic = dir.join(format!("plot.{ext}"));
        let st = bench()
            .arg("plot")
            .arg(&res)
            .arg("-o")
            .arg(&pic)
            .status()
            .unwrap();
        assert!(st.success());
        assert!(std::fs::metadata(&pic).unwrap().len() > 10_000);
    }
    let svg = std::fs::read_to_string(dir.join("plot.svg")).unwrap();
    assert!(svg.contains("expected downtime after the round vs the limit"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn numa_auto_reports_plan_and_placement() {
    let out = bench()
        .args([
            "loopback", "--size", "32MiB", "--numa", "auto", "--lanes", "2", "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let j = json_of(&out);
    let n = &j["numa"];
    assert!(n["nodes"].as_u64().unwrap() >= 1);
    let lanes = n["plan"]["lanes"].as_array().unwrap();
    assert_eq!(lanes.len(), 2);
    for o in n["observed"].as_array().unwrap() {
        let planned = o["planned_node"].as_u64().unwrap();
        let nodes: Vec<u64> = o["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        if n["fallback"].is_null() {
            assert_eq!(nodes, vec![planned], "lane ran off its node: {o}");
        }
    }
    let spans = n["plan"]["spans"].as_array().unwrap();
    let pages: u64 = spans
        .iter()
        .map(|s| s["span"]["npages"].as_u64().unwrap())
        .sum();
    assert_eq!(pages, (32 << 20) / 4096);
    // And the plan alone, for a synthetic machine.
    let out = bench()
        .args([
            "topology",
            "--hwloc-synthetic",
            "pack:2 numa:2 core:2 pu:1",
            "--lanes",
            "4",
            "--memory-node",
            "2",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("4 NUMA node(s)"), "{s}");
    assert_eq!(s.matches("on node 2 (CPUs [4, 5])").count(), 4, "{s}");
}

/// Waits for `child` at most `limit`; kills it and panics past that.
fn wait_at_most(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let t = std::time::Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("child still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stopped_destination_fails_the_source_within_twice_the_peer_timeout() {
    // kill -STOP the destination mid-round: its heartbeats stop and its sockets fill up. The
    // source must notice within twice the peer timeout (5 s), resume its guest and say why.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let key = "stopped destination key";
    let mut dest = bench()
        .args(["dest", "--listen", &addr, "--size", "256MiB", "--json"])
        .args(["--incoming-timeout", "30"])
        .env("RMIG_KEY", key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // A connection that does not handshake is refused and the destination keeps listening,
    // so probing for readiness is harmless.
    let ready = std::time::Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            ready.elapsed() < Duration::from_secs(20),
            "destination never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut src = bench()
        .args(["source", "--connect", &addr, "--size", "256MiB", "--json"])
        .args(["--max-bandwidth", "40MB", "--lanes", "2"])
        // No reconnect window: the failure itself must come within twice the peer timeout.
        .args(["--reconnect-window", "0"])
        .env("RMIG_KEY", key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let stop = std::time::Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &dest.id().to_string()])
        .status()
        .unwrap()
        .success());
    let st = wait_at_most(&mut src, Duration::from_secs(30));
    let waited = stop.elapsed();
    let _ = dest.kill();
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &dest.id().to_string()])
        .status();
    let _ = dest.wait();
    let out = src.wait_with_output().unwrap();
    assert!(!st.success(), "the source cannot succeed");
    eprintln!(
        "source gave up {} ms after the destination was stopped",
        waited.as_millis()
    );
    assert!(
        waited < Duration::from_secs(11),
        "the source took {waited:?} to give up"
    );
    let j = json_of(&out);
    assert_eq!(j["status"], "failed");
    let e = j["error"].as_str().unwrap();
    assert!(e.contains("peer silent"), "{e}");
}

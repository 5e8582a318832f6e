//! The `rmig-bench` command as a user runs it.
//!
//! Every child process has a deadline: a hang fails the test instead of the CI job.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rmig-bench"))
}

/// The longest any one child may run.
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `cmd` to the end like `Command::output`, but kills it and panics past `limit`.
fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    collect(child, limit)
}

/// Waits for a child with piped stdout and stderr at most `limit`, reading both meanwhile.
fn collect(mut child: Child, limit: Duration) -> Output {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = wait_at_most(&mut child, limit);
    Output {
        status,
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    }
}

fn output(cmd: &mut Command) -> Output {
    output_within(cmd, DEADLINE)
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The last line on stderr: the one that says why a run failed.
fn last_err_line(out: &Output) -> String {
    stderr_of(out)
        .lines()
        .rfind(|l| l.starts_with("rmig-bench:"))
        .unwrap_or_else(|| panic!("no rmig-bench line on stderr: {}", stderr_of(out)))
        .to_string()
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
    let mut cmd = bench();
    cmd.args([
        "loopback",
        "--size",
        "64MiB",
        "--fill",
        "mixed",
        "--dirty-rate",
        "100",
        "--json",
    ]);
    let out = output(&mut cmd);
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

/// A guest that rewrites half its memory four times faster than its 400 Mbit/s ceiling:
/// post-copy after two rounds moves it, the destination's guest faults on pages it lacks,
/// every page missing at the switch lands exactly once, and the memories are compared on
/// every page the destination's guest did not write since it resumed.
#[test]
fn loopback_postcopy_reports_the_phase_and_compares_what_the_guest_left_alone() {
    let out = output(bench().args([
        "loopback",
        "--size",
        "64MiB",
        "--dirty-rate",
        "200",
        "--hot-set",
        "0.5",
        "--max-bandwidth",
        "400Mbit",
        "--auto-converge",
        "off",
        "--postcopy-after",
        "2",
        "--lanes",
        "2",
        "--json",
    ]));
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let j = json_of(&out);
    assert_eq!(j["status"], "completed", "{j}");
    assert_eq!(j["verified"], true);
    assert_eq!(
        j["source_guest"], "paused",
        "the source never resumes its copy"
    );
    let src = &j["postcopy"];
    let dst = &j["dest_postcopy"];
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}: {j}"));
    assert!(n(dst, "pages_at_switch") > 0, "{j}");
    assert_eq!(n(src, "pages_at_switch"), n(dst, "pages_at_switch"));
    assert_eq!(
        n(dst, "pages_on_fault") + n(dst, "pages_background"),
        n(dst, "pages_at_switch"),
        "every page missing at the switch landed once: {dst}"
    );
    assert!(
        n(dst, "faults") > 0,
        "the destination's guest faulted: {dst}"
    );
    assert!(n(dst, "pages_on_fault") > 0, "{dst}");
    assert!(dst["fault_p50_us"].as_f64().unwrap() > 0.0, "{dst}");
    assert!(src["duration_ms"].as_f64().unwrap() > 0.0, "{src}");
    let written = n(&j["dest_guest"], "pages_written");
    assert!(written > 0, "the destination's guest ran: {j}");
    assert_eq!(j["memory_pages_left_out"].as_u64(), Some(written));
    assert!(written < 64 * 256, "the rest of memory was compared: {j}");
    assert_eq!(j["memory_equal"], true);
    assert_eq!(
        j["rounds"].as_array().unwrap().last().unwrap()["last"],
        true
    );
}

#[test]
fn verify_off_and_no_prealloc() {
    let mut cmd = bench();
    cmd.args([
        "loopback",
        "--size",
        "32MiB",
        "--verify",
        "off",
        "--no-prealloc",
        "--lanes",
        "3",
        "--json",
    ]);
    let out = output(&mut cmd);
    assert!(out.status.success());
    let j = json_of(&out);
    assert_eq!(j["verified"], Value::Null);
    assert_eq!(j["memory_equal"], true);
    assert_eq!(j["lanes"], 3);
    assert_eq!(j["run"]["prealloc"], false);
}

/// A source that fails before it reaches its destination (RDMA asked for on 127.0.0.1, which
/// no RDMA device serves) ends the whole run with its reason, instead of leaving the
/// destination in the same process listening for ever.
#[test]
fn loopback_whose_source_fails_before_connecting_ends_with_its_reason() {
    let t0 = Instant::now();
    let mut cmd = bench();
    cmd.args([
        "loopback",
        "--addr",
        "127.0.0.1",
        "--transport",
        "rdma",
        "--size",
        "8MiB",
        "--json",
    ]);
    let out = output_within(&mut cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.lines()
            .any(|l| l.starts_with("rmig-bench: source:") && l.contains("no RDMA device")),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
}

#[test]
fn human_table_by_default() {
    let mut cmd = bench();
    cmd.args(["loopback", "--size", "16MiB"]);
    let out = output(&mut cmd);
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

/// A destination run as a child process, ready once it has said "listening on".
struct DestChild {
    child: Child,
    addr: String,
    out: std::thread::JoinHandle<Vec<u8>>,
    err: std::thread::JoinHandle<String>,
    /// How many times it has said "listening on" (once per migration with --keep-serving).
    listening: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl DestChild {
    /// Starts `rmig-bench dest --listen tcp:127.0.0.1:PORT ARGS` and waits (at most 20 s)
    /// for its "listening on" line instead of sleeping a fixed time.
    fn start(args: &[&str], key: &str) -> DestChild {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = bench()
            .args(["dest", "--listen", &format!("tcp:{addr}")])
            .args(args)
            .env("RMIG_KEY", key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let listening = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = listening.clone();
        let err = std::thread::spawn(move || {
            let mut all = String::new();
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                if l.starts_with("listening on") {
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = tx.send(());
                }
                all.push_str(&l);
                all.push('\n');
            }
            all
        });
        let mut stdout = child.stdout.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = stdout.read_to_end(&mut v);
            v
        });
        let mut d = DestChild {
            child,
            addr,
            out,
            err,
            listening,
        };
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = d.child.kill();
            let _ = d.child.wait();
            panic!("the destination never listened: {}", d.err.join().unwrap());
        }
        d
    }

    /// Waits (at most 20 s) until it has said "listening on" `n` times.
    fn wait_listening(&self, n: usize) {
        let t = Instant::now();
        while self.listening.load(std::sync::atomic::Ordering::SeqCst) < n {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the destination did not listen a {n}th time"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the end (at most `limit`) and returns what it printed.
    fn finish(mut self, limit: Duration) -> Output {
        let status = wait_at_most(&mut self.child, limit);
        Output {
            status,
            stdout: self.out.join().unwrap(),
            stderr: self.err.join().unwrap().into_bytes(),
        }
    }
}

const KEY: &str = "two-host key, 16+ bytes";

fn two_hosts(dest_size: &str, dest_key: &str) -> (Output, Output) {
    let dest = DestChild::start(
        &["--size", dest_size, "--json", "--incoming-timeout", "5"],
        dest_key,
    );
    let mut cmd = bench();
    cmd.args(["source", "--connect", &format!("tcp:{}", dest.addr)])
        .args(["--size", "32MiB", "--fill", "random", "--json"])
        .env("RMIG_KEY", KEY);
    let src = output(&mut cmd);
    (src, dest.finish(Duration::from_secs(30)))
}

#[test]
fn source_and_dest_across_processes() {
    let (src, dst) = two_hosts("32MiB", KEY);
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
    let (src, dst) = two_hosts("64MiB", KEY);
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
    let prog = progress_file("metrics");
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
            "--progress-json",
        ])
        .arg(&prog)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Mid-migration: 128 MiB at 50 MB/s take about 2.7 s.
    wait_until_sent(&prog, 20_000_000);
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
    // Round 0 moves the remainder and the bandwidth too, not only the round's end.
    let left = metric_sum(&body, "rmig_remaining_bytes").expect("rmig_remaining_bytes");
    assert!(left < 118e6 && left > 0.0, "remaining {left}");
    let bw = metric_sum(&body, "rmig_bandwidth_bytes_per_second").expect("bandwidth");
    assert!(
        bw > 20e6 && bw < 80e6,
        "bandwidth {bw} at a 50 MB/s ceiling"
    );
    assert!(
        body.contains("rmig_sent_bytes_total{transport=\"tcp\",lane=\"0\"}"),
        "{body}"
    );
    let out = collect(child, DEADLINE);
    assert!(out.status.success());
    assert_eq!(json_of(&out)["status"], "completed");
}

#[test]
fn progress_json_has_rounds_and_a_line_a_second() {
    let dir = std::env::temp_dir().join(format!("rmig-progress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prog = dir.join("p.jsonl");
    let mut cmd = bench();
    cmd.args([
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
    .arg(&prog);
    let out = output(&mut cmd);
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
    // Round 0 is most of the migration: after its first second it shows a rate measured from
    // acknowledged bytes, an ETA, and a remainder that goes down.
    let round0: Vec<&Value> = lines
        .iter()
        .filter(|l| l["kind"] == "tick" && l["status"] == "active" && l["round"] == 0)
        .filter(|l| l["t_ms"].as_f64().unwrap() > 1000.0)
        .collect();
    assert!(round0.len() >= 2, "too few round-0 lines: {lines:?}");
    for l in &round0 {
        let rate = l["rate"].as_f64().unwrap();
        assert!(
            rate > 20e6 && rate < 60e6,
            "40 MB/s ceiling, rate {rate}: {l}"
        );
        assert!(l["eta_switchover_s"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["remaining"].as_u64().unwrap() > 0, "{l}");
    }
    let (first, last) = (round0[0], round0[round0.len() - 1]);
    assert!(
        last["remaining"].as_u64().unwrap() < first["remaining"].as_u64().unwrap(),
        "remaining does not move in round 0: {first} .. {last}"
    );
    // Each round line carries its own rate: bytes over duration.
    for (l, r) in lines
        .iter()
        .filter(|l| l["kind"] == "round")
        .zip(result["rounds"].as_array().unwrap())
    {
        let own = r["bytes"].as_f64().unwrap() * 8.0 / (r["duration_ms"].as_f64().unwrap() * 1e3);
        assert!(
            (l["mbps"].as_f64().unwrap() - own).abs() < 1e-6 * own.max(1.0),
            "{l} vs {r}"
        );
        assert!(
            (r["mbps"].as_f64().unwrap() - own).abs() < 1e-6 * own.max(1.0),
            "{r}"
        );
    }
    assert_eq!(lines.last().unwrap()["status"], "completed");

    // The plot of the same run, in both formats.
    let res = dir.join("r.json");
    std::fs::write(&res, &out.stdout).unwrap();
    for ext in ["svg", "png"] {
        let pic = dir.join(format!("plot.{ext}"));
        let st = output(bench().arg("plot").arg(&res).arg("-o").arg(&pic)).status;
        assert!(st.success());
        assert!(std::fs::metadata(&pic).unwrap().len() > 10_000);
    }
    let svg = std::fs::read_to_string(dir.join("plot.svg")).unwrap();
    assert!(svg.contains("expected downtime after the round vs the limit"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn numa_auto_reports_plan_and_placement() {
    let mut cmd = bench();
    cmd.args([
        "loopback", "--size", "32MiB", "--numa", "auto", "--lanes", "2", "--json",
    ]);
    let out = output(&mut cmd);
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
    let mut cmd = bench();
    cmd.args([
        "topology",
        "--hwloc-synthetic",
        "pack:2 numa:2 core:2 pu:1",
        "--lanes",
        "4",
        "--memory-node",
        "2",
    ]);
    let out = output(&mut cmd);
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
    let prog = progress_file("stopped");
    let mut src = bench()
        .args(["source", "--connect", &addr, "--size", "256MiB", "--json"])
        .args(["--max-bandwidth", "40MB", "--lanes", "2", "--progress-json"])
        .arg(&prog)
        // No reconnect window: the failure itself must come within twice the peer timeout.
        .args(["--reconnect-window", "0"])
        .env("RMIG_KEY", key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Mid-round: 40 MB in of 256 MiB at 40 MB/s.
    wait_until_sent(&prog, 40_000_000);
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
    let _ = std::fs::remove_dir_all(prog.parent().unwrap());
}

/// Runs `rmig-bench ARGS` and expects a usage error naming `says`, fast.
fn usage_error(args: &[&str], says: &str) {
    let t = Instant::now();
    let out = output_within(bench().args(args), Duration::from_secs(10));
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("error: "),
        "{args:?}: clap's style: {err}"
    );
    assert!(first.contains(says), "{args:?}: {first:?} lacks {says:?}");
    assert!(err.contains("try '--help'"), "{args:?}: {err}");
    assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "{args:?}: took {:?}",
        t.elapsed()
    );
}

#[test]
fn bad_values_are_usage_errors_before_anything_runs() {
    for (args, says) in [
        (&["loopback", "--lanes", "0"][..], "0 is not in 1..=64"),
        (&["loopback", "--lanes", "1000"], "1000 is not in 1..=64"),
        (&["loopback", "--hot-set", "2"], "not a fraction"),
        (&["loopback", "--hot-set", "0"], "more than 0"),
        (&["loopback", "--zero-fraction", "7"], "not a fraction"),
        (
            &["loopback", "--writers", "0", "--dirty-rate", "100"],
            "needs at least one writer",
        ),
        (&["loopback", "--max-rounds", "0"], "--max-rounds"),
        (&["loopback", "--postcopy-after", "0"], "--postcopy-after"),
        (
            &["loopback", "--postcopy", "--page-size", "2MiB"],
            "--postcopy needs --page-size 4KiB",
        ),
        (&["loopback", "--downtime-limit", "0"], "--downtime-limit"),
        (&["loopback", "--size", "-1"], "cannot be negative"),
        (&["loopback", "--size", "99999999999TiB"], "too large"),
        (&["loopback", "--size", "64TiB"], "MemAvailable"),
        (
            &["loopback", "--size", "64TiB", "--no-prealloc"],
            "MemAvailable",
        ),
        (
            &["dest", "--listen", "127.0.0.1:1", "--size", "64TiB"],
            "--no-prealloc",
        ),
        (&["loopback", "--size", "5000"], "multiple of the page size"),
        (&["loopback", "--page-size", "8KiB"], "4KiB or 2MiB"),
        (&["loopback", "--max-bandwidth", "fast"], "not a rate"),
        (&["source", "--connect", "rdma:10.0.0.1:4444"], "only tcp:"),
        (&["source", "--connect", "10.0.0.1"], "no port"),
        (&["dest", "--listen", "tcp:127.0.0.1:99999"], "not a port"),
        (
            &[
                "topology",
                "--hwloc-synthetic",
                "pack:2 numa:2 core:2 pu:1",
                "--memory-node",
                "9",
            ],
            "no node 9",
        ),
    ] {
        usage_error(args, says);
    }
}

#[test]
fn help_says_what_the_exit_codes_mean() {
    for sub in [
        &["--help"][..],
        &["loopback", "--help"],
        &["source", "--help"],
        &["dest", "--help"],
    ] {
        let out = output_within(bench().args(sub), Duration::from_secs(10));
        assert!(out.status.success());
        let h = String::from_utf8_lossy(&out.stdout);
        for code in ["  0 ", "  1 ", "  2 ", "  3 ", "  4 ", "  130 "] {
            assert!(h.contains(code), "{sub:?} lacks exit code {code:?}: {h}");
        }
    }
    for sub in ["plot", "topology", "bare"] {
        let out = output_within(bench().args([sub, "--help"]), Duration::from_secs(10));
        let h = String::from_utf8_lossy(&out.stdout);
        for code in ["  0 ", "  1 ", "  2 "] {
            assert!(h.contains(code), "{sub} lacks exit code {code:?}: {h}");
        }
    }
    let out = output_within(
        bench().args(["loopback", "--help"]),
        Duration::from_secs(10),
    );
    let h = String::from_utf8_lossy(&out.stdout);
    for heading in [
        "Guest memory:",
        "Workload:",
        "Migration:",
        "Transport and RDMA:",
        "Output:",
    ] {
        assert!(h.contains(heading), "no {heading:?} group: {h}");
    }
}

#[test]
fn every_flag_of_every_subcommand_is_in_the_readme() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for sub in ["loopback", "source", "dest", "topology", "plot", "bare"] {
        let out = output_within(bench().args([sub, "--help"]), Duration::from_secs(10));
        let help = String::from_utf8_lossy(&out.stdout);
        let flags: Vec<&str> = help
            .lines()
            .filter_map(|l| {
                l.trim_start()
                    .split([' ', ',', '='])
                    .find(|w| w.starts_with("--"))
            })
            .filter(|f| *f != "--help")
            .collect();
        assert!(flags.len() >= 2, "{sub}: {help}");
        for f in flags {
            assert!(
                readme.contains(&format!("`{f}")),
                "README has no row for {sub} {f}"
            );
        }
    }
}

#[test]
fn rates_in_bits_and_tcp_prefixes_are_understood() {
    // 1 Gbit/s is 125 MB/s: 64 MiB take about half a second at the ceiling.
    let out = output(bench().args([
        "loopback",
        "--size",
        "64MiB",
        "--max-bandwidth",
        "1Gbit",
        "--json",
    ]));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let mbps = json_of(&out)["ram"]["mbps"].as_f64().unwrap();
    assert!(mbps > 500.0 && mbps < 1100.0, "paced at 1 Gbit/s: {mbps}");
}

/// Peak resident memory of a child that has ended, in bytes (`wait4`).
fn wait_rss(child: &mut Child, limit: Duration) -> (ExitStatus, u64) {
    use std::os::unix::process::ExitStatusExt;
    let t = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain data; all zeroes is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child's pid, into values we own; WNOHANG does not block.
        let r = unsafe { libc::wait4(child.id() as i32, &mut status, libc::WNOHANG, &mut ru) };
        if r > 0 {
            return (ExitStatus::from_raw(status), ru.ru_maxrss as u64 * 1024);
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("child still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_port_in_use_is_found_before_preallocation() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let mut child = bench()
        .args(["dest", "--listen", &addr, "--size", "1GiB", "--json"])
        .env("RMIG_KEY", KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let (st, rss) = wait_rss(&mut child, Duration::from_secs(20));
    assert_eq!(st.code(), Some(1), "{err}");
    let line = err.lines().last().unwrap();
    assert!(
        line.contains("cannot listen on") && line.contains("--listen"),
        "{err}"
    );
    assert!(
        rss < 256 << 20,
        "{rss} bytes resident: memory was preallocated first"
    );
}

#[test]
fn failures_say_why_on_stderr_also_with_json() {
    let args = [
        "loopback",
        "--size",
        "128MiB",
        "--dirty-rate",
        "3000",
        "--hot-set",
        "1",
        "--max-bandwidth",
        "50MB",
        "--max-rounds",
        "1",
        "--auto-converge",
        "off",
    ];
    let out = output(bench().args(args).arg("--json"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let j = json_of(&out);
    assert_eq!(j["status"], "failed");
    let line = last_err_line(&out);
    assert!(
        line.starts_with("rmig-bench: source: did not converge"),
        "{line}"
    );
    for f in [
        "--downtime-limit",
        "--on-no-convergence",
        "--auto-converge",
        "--max-bandwidth",
    ] {
        assert!(line.contains(f), "{f} missing: {line}");
    }
    assert_eq!(
        stderr_of(&out)
            .lines()
            .filter(|l| l.starts_with("rmig-bench:"))
            .count(),
        1,
        "one line, not an echo from each end: {}",
        stderr_of(&out)
    );
    // The table of the same failure claims nothing that did not happen.
    let out = output(bench().args(args));
    assert_eq!(out.status.code(), Some(1));
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(t.contains("status                 failed"), "{t}");
    assert!(t.contains("verified               not reached"), "{t}");
    assert!(
        !t.contains("0 Mbit/s") && !t.contains("verified               off"),
        "{t}"
    );
}

#[test]
fn a_size_mismatch_says_here_and_there_the_right_way_round() {
    let (src, dst) = two_hosts("64MiB", KEY);
    let line = last_err_line(&src);
    assert!(
        line.contains("67108864 bytes, page 4096) at the destination vs 0 (bench.ram, 33554432 bytes, page 4096) here (the source)"),
        "{line}"
    );
    assert!(line.contains("use the same --size"), "{line}");
    let dline = last_err_line(&dst);
    assert!(
        dline.contains("67108864 bytes, page 4096) here vs 0 (bench.ram, 33554432 bytes"),
        "{dline}"
    );
    assert!(dline.contains("use the same --size"), "{dline}");
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child we own and have not waited for yet.
    let r = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
}

/// Waits (at most 30 s) until the progress file `p` has a line with transferred bytes in
/// status `active`: the migration is under way.
fn wait_until_migrating(p: &std::path::Path) {
    wait_until_sent(p, 0);
}

/// Waits (at most 30 s) until the progress file `p` shows more than `bytes` sent while active.
fn wait_until_sent(p: &std::path::Path, bytes: u64) {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        let moving = text.lines().any(|l| {
            serde_json::from_str::<Value>(l)
                .is_ok_and(|v| v["status"] == "active" && v["transferred"].as_u64() > Some(bytes))
        });
        if moving {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never migrating: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn progress_file(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rmig-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("p.jsonl")
}

#[test]
fn ctrl_c_cancels_reports_and_exits_130() {
    let prog = progress_file("ctrl-c");
    let child = bench()
        .args(["loopback", "--size", "256MiB", "--max-bandwidth", "40MB"])
        .args(["--dirty-rate", "10", "--json", "--progress-json"])
        .arg(&prog)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // 256 MiB at 40 MB/s take about 7 s: the signal comes in round 0.
    wait_until_migrating(&prog);
    signal(&child, libc::SIGINT);
    let t = Instant::now();
    let out = collect(child, Duration::from_secs(20));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(out.status.code(), Some(130), "{}", stderr_of(&out));
    let j = json_of(&out);
    assert_eq!(j["status"], "cancelled");
    assert_eq!(j["source_guest"], "running");
    assert!(j["error"].as_str().unwrap().contains("SIGINT"), "{j}");
    let line = last_err_line(&out);
    assert!(
        line.contains("cancelled") && line.contains("keeps running"),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(prog.parent().unwrap());
}

#[test]
fn sigterm_on_the_destination_cancels_both_ends() {
    let dest = DestChild::start(
        &["--size", "256MiB", "--json", "--incoming-timeout", "30"],
        KEY,
    );
    let prog = progress_file("sigterm");
    let src = bench()
        .args(["source", "--connect", &dest.addr, "--size", "256MiB"])
        .args(["--json", "--max-bandwidth", "40MB", "--progress-json"])
        .arg(&prog)
        .env("RMIG_KEY", KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_migrating(&prog);
    signal(&dest.child, libc::SIGTERM);
    let d = dest.finish(Duration::from_secs(20));
    let s = collect(src, Duration::from_secs(20));
    assert_eq!(d.status.code(), Some(130), "{}", stderr_of(&d));
    assert_eq!(json_of(&d)["status"], "cancelled");
    assert_eq!(s.status.code(), Some(1), "{}", stderr_of(&s));
    let j = json_of(&s);
    assert_eq!(j["status"], "cancelled");
    assert_eq!(j["source_guest"], "running");
    assert!(
        j["error"].as_str().unwrap().contains("cancelled by peer"),
        "{j}"
    );
    assert!(
        last_err_line(&s).contains("the destination cancelled"),
        "{}",
        stderr_of(&s)
    );
    let _ = std::fs::remove_dir_all(prog.parent().unwrap());
}

#[test]
fn the_destination_reports_what_it_received() {
    let dir = std::env::temp_dir().join(format!("rmig-dest-progress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prog = dir.join("d.jsonl");
    let dest = DestChild::start(
        &[
            "--size",
            "32MiB",
            "--json",
            "--no-prealloc",
            "--thp",
            "off",
            "--incoming-timeout",
            "20",
            "--progress-json",
            prog.to_str().unwrap(),
        ],
        KEY,
    );
    // Setup time counts from the connection: the source comes a second late.
    std::thread::sleep(Duration::from_secs(1));
    let mut cmd = bench();
    cmd.args([
        "source",
        "--connect",
        &dest.addr,
        "--size",
        "32MiB",
        "--json",
    ])
    .env("RMIG_KEY", KEY);
    let s = output(&mut cmd);
    let d = dest.finish(Duration::from_secs(30));
    assert!(s.status.success(), "{}", stderr_of(&s));
    assert!(d.status.success(), "{}", stderr_of(&d));
    let j = json_of(&d);
    assert_eq!(j["status"], "completed");
    let f = &j["dest"];
    assert_eq!(f["received_bytes"], 32 << 20, "{f}");
    assert_eq!(j["ram"]["transferred"], 32 << 20);
    let src_rounds = json_of(&s)["rounds"].as_array().unwrap().len() as u64;
    assert_eq!(f["rounds"].as_u64().unwrap(), src_rounds, "{f}");
    assert!(f["rate"].as_f64().unwrap() > 1e6, "{f}");
    assert!(f["downtime_ms"].as_f64().unwrap() > 0.0, "{f}");
    let total = f["total_ms"].as_f64().unwrap();
    assert!(
        total < j["total_time_ms"].as_f64().unwrap() - 900.0,
        "waiting counted: {j}"
    );
    assert!(j["setup_time_ms"].as_f64().unwrap() < 900.0, "{j}");
    // What the source alone knows is not in the destination's report, and the reverse.
    assert!(j["run"]["fill"].is_null() && j["run"]["dirty_rate_mbs"].is_null());
    let sj = json_of(&s);
    assert!(sj["run"]["prealloc"].is_null());
    // Each end's own figures reach the other (iperf3's sender and receiver at both ends):
    // the destination's, memory facts included, are its word, not the source's guess.
    let theirs = &sj["peer"];
    assert_eq!(theirs["page_bytes"], 32 << 20, "{sj}");
    assert_eq!(theirs["rounds"].as_u64().unwrap(), src_rounds, "{theirs}");
    assert_eq!(theirs["memory"]["prefaulted"], false, "{theirs}");
    assert_eq!(theirs["memory"]["huge_pages"], "--thp off", "{theirs}");
    let dest_downtime_us = (f["downtime_ms"].as_f64().unwrap() * 1e3) as i64;
    assert!(
        (theirs["downtime_us"].as_i64().unwrap() - dest_downtime_us).abs() <= 1,
        "{theirs} vs {f}"
    );
    assert!(theirs["setup_us"].as_f64().unwrap() < 900e3, "{theirs}");
    let ours = &j["peer"];
    assert_eq!(ours["page_bytes"], sj["ram"]["normal_bytes"], "{j}");
    assert_eq!(ours["memory"]["prefaulted"], true, "{ours}");
    assert_eq!(ours["memory"], sj["memory"], "{ours}");

    let lines: Vec<Value> = std::fs::read_to_string(&prog)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 2, "{lines:?}");
    let last = lines.last().unwrap();
    assert_eq!(last["side"], "destination");
    assert_eq!(last["status"], "completed");
    assert_eq!(last["transferred"], 32 << 20);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_destination_shows_live_bytes_within_round_0() {
    let prog = progress_file("dest-live");
    let dest = DestChild::start(
        &[
            "--size",
            "48MiB",
            "--json",
            "--incoming-timeout",
            "20",
            "--progress-json",
            prog.to_str().unwrap(),
        ],
        KEY,
    );
    // Round 0 takes about three seconds at 16 MB/s.
    let mut cmd = bench();
    cmd.args(["source", "--connect", &dest.addr, "--size", "48MiB"])
        .args(["--max-bandwidth", "16MB", "--json"])
        .env("RMIG_KEY", KEY);
    let s = output(&mut cmd);
    let d = dest.finish(Duration::from_secs(30));
    assert!(s.status.success(), "{}", stderr_of(&s));
    assert!(d.status.success(), "{}", stderr_of(&d));
    let total = 48u64 << 20;
    let mid: Vec<(f64, u64)> = std::fs::read_to_string(&prog)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["kind"] == "tick" && l["status"] == "active" && l["round"] == 0)
        .map(|l| {
            (
                l["t_ms"].as_f64().unwrap(),
                l["transferred"].as_u64().unwrap(),
            )
        })
        .filter(|&(_, b)| b > 0 && b < total)
        .collect();
    // Several lines inside round 0, each second's bytes more than the last's.
    assert!(
        mid.len() >= 3,
        "the destination's bytes move only per round: {mid:?}"
    );
    for w in mid.windows(2) {
        assert!(w[1].0 - w[0].0 <= 1200.0, "a gap in {mid:?}");
        assert!(w[1].1 >= w[0].1, "bytes went back: {mid:?}");
    }
    assert!(mid.last().unwrap().1 > mid[0].1, "no movement: {mid:?}");
    let _ = std::fs::remove_dir_all(prog.parent().unwrap());
}

#[test]
fn final_metrics_linger_with_help_histograms_and_build_info() {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = bench()
        .args([
            "loopback",
            "--size",
            "32MiB",
            "--json",
            "--dirty-rate",
            "20",
        ])
        .args(["--metrics-addr", &addr, "--metrics-linger", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The report comes first; the endpoint then stays up for the scrape.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let report = rx.recv_timeout(DEADLINE).expect("no report");
    let j: Value = serde_json::from_str(&report).unwrap();
    assert_eq!(j["status"], "completed");
    let body = http_get(&addr, "/metrics");
    let st = wait_at_most(&mut child, Duration::from_secs(20));
    assert!(st.success());
    assert_eq!(
        metric_sum(&body, "rmig_migrations_total"),
        Some(1.0),
        "{body}"
    );
    for help in [
        "# HELP rmig_sent_bytes_total ",
        "# HELP rmig_remaining_bytes ",
        "# HELP rmig_round_duration_seconds ",
        "# HELP rmig_lanes ",
        "# HELP rmig_build_info ",
    ] {
        assert!(body.contains(help), "no {help:?}: {body}");
    }
    assert!(
        body.contains("# TYPE rmig_round_duration_seconds histogram"),
        "{body}"
    );
    assert!(
        body.contains("rmig_round_duration_seconds_bucket{le=\"0.1\"}"),
        "{body}"
    );
    assert!(body.contains("rmig_build_info{version=\""), "{body}");
}

/// Where the relay cuts the control connection.
#[derive(Clone, Copy, PartialEq)]
enum Cut {
    /// Drops the destination's `Ready` and closes: the source never commits.
    Ready,
    /// Drops the source's `Commit` and closes: both ends are left not knowing.
    Commit,
}

/// A TCP relay between a source and a destination: lanes pass untouched; on the control
/// connection (the first one) frames are read one by one and the connection is cut at `cut`.
fn relay(dest: String, cut: Cut) -> String {
    use rmig_engine::protocol::{codec::encode, Message};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (ready, commit) = (encode(&Message::Ready), encode(&Message::Commit));
    std::thread::spawn(move || {
        for (i, c) in l.incoming().enumerate() {
            let Ok(a) = c else { return };
            let b = std::net::TcpStream::connect(&dest).unwrap();
            let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            if i > 0 {
                pipe(a, b, None);
                pipe(b2, a2, None);
                continue;
            }
            let stop = match cut {
                Cut::Ready => (None, Some(ready.clone())),
                Cut::Commit => (Some(commit.clone()), None),
            };
            pipe(a, b, stop.0);
            pipe(b2, a2, stop.1);
        }
    });
    addr
}

/// Copies `from` into `to` on a thread; with `stop`, frame by frame, closing both instead of
/// forwarding the frame equal to `stop`.
fn pipe(mut from: std::net::TcpStream, mut to: std::net::TcpStream, stop: Option<Vec<u8>>) {
    use std::io::Write;
    std::thread::spawn(move || {
        let Some(stop) = stop else {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
            return;
        };
        loop {
            let mut len = [0u8; 4];
            if from.read_exact(&mut len).is_err() {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            let mut frame = len.to_vec();
            frame.resize(4 + u32::from_le_bytes(len) as usize, 0);
            if from.read_exact(&mut frame[4..]).is_err() {
                return;
            }
            if frame == stop {
                let _ = from.shutdown(std::net::Shutdown::Both);
                let _ = to.shutdown(std::net::Shutdown::Both);
                return;
            }
            if to.write_all(&frame).is_err() {
                return;
            }
        }
    });
}

/// A two-host migration through a relay that cuts the control connection at `cut`, with
/// the given `--on-handover-unknown` decisions (`None`: the default, asking).
fn cut_handover(cut: Cut, src_says: Option<&str>, dest_says: Option<&str>) -> (Output, Output) {
    // The relay reads the control frames: cleartext.
    let mut dargs = vec!["--size", "32MiB", "--json", "--incoming-timeout", "20"];
    dargs.extend(["--encryption", "off"]);
    if let Some(d) = dest_says {
        dargs.extend(["--on-handover-unknown", d]);
    }
    let dest = DestChild::start(&dargs, KEY);
    let via = relay(dest.addr.clone(), cut);
    let mut cmd = bench();
    cmd.args(["source", "--connect", &via, "--size", "32MiB", "--json"])
        .args(["--reconnect-window", "0", "--encryption", "off"])
        .env("RMIG_KEY", KEY);
    if let Some(s) = src_says {
        cmd.args(["--on-handover-unknown", s]);
    }
    let s = output(&mut cmd);
    (s, dest.finish(Duration::from_secs(40)))
}

#[test]
fn an_unknown_handover_waits_for_a_decision_and_exits_3() {
    let (s, d) = cut_handover(Cut::Commit, None, None);
    for (o, side) in [(&s, "source"), (&d, "destination")] {
        assert_eq!(o.status.code(), Some(3), "{side}: {}", stderr_of(o));
        assert_eq!(json_of(o)["status"], "handover-unknown", "{side}");
        // The guest was paused here and is not resumed: the pause so far, not 0.
        let paused = json_of(o)["downtime_ms"].as_f64().unwrap();
        assert!(paused > 0.0, "{side}: downtime_ms {paused}");
        let line = last_err_line(o);
        assert!(
            line.contains(&format!("rmig-bench: {side}: handover unknown"))
                && line.contains("--on-handover-unknown"),
            "{line}"
        );
    }
    assert_eq!(json_of(&s)["source_guest"], "paused", "nobody decided");
}

#[test]
fn the_operator_s_decision_settles_an_unknown_handover() {
    // The operator runs the guest on the source and discards the destination's copy.
    let (s, d) = cut_handover(Cut::Commit, Some("run-here"), Some("run-there"));
    let (sj, dj) = (json_of(&s), json_of(&d));
    assert_eq!(sj["status"], "failed", "{sj}");
    assert_eq!(sj["source_guest"], "running");
    assert!(sj["error"]
        .as_str()
        .unwrap()
        .contains("operator resumed the guest on the source"));
    assert_eq!(s.status.code(), Some(1));
    assert_eq!(dj["status"], "failed", "{dj}");
    assert!(dj["error"]
        .as_str()
        .unwrap()
        .contains("left the guest to the source"));
    assert_eq!(d.status.code(), Some(1));
    // And the other way round: the destination runs it, the source's copy stays paused.
    let (s, d) = cut_handover(Cut::Commit, Some("run-there"), Some("run-here"));
    let (sj, dj) = (json_of(&s), json_of(&d));
    assert_eq!(sj["status"], "completed", "{sj}");
    assert_eq!(sj["source_guest"], "paused");
    assert_eq!(s.status.code(), Some(0), "{}", stderr_of(&s));
    assert_eq!(dj["status"], "completed", "{dj}");
    assert_eq!(d.status.code(), Some(0), "{}", stderr_of(&d));
}

#[test]
fn a_link_lost_before_commit_leaves_the_source_running() {
    // Ready never reaches the source: it never commits, so it runs its guest on; only the
    // destination, which said Ready, cannot know.
    let (s, d) = cut_handover(Cut::Ready, Some("run-there"), None);
    let sj = json_of(&s);
    assert_eq!(sj["status"], "failed", "{sj}");
    assert_eq!(sj["source_guest"], "running");
    assert_eq!(s.status.code(), Some(1));
    assert_eq!(json_of(&d)["status"], "handover-unknown");
    assert_eq!(d.status.code(), Some(3));
}

#[test]
fn a_destination_name_that_does_not_resolve_fails_before_allocating() {
    let mut child = bench()
        .args([
            "source",
            "--connect",
            "tcp:no-such-host.invalid:4444",
            "--size",
            "1GiB",
        ])
        .env("RMIG_KEY", KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let (st, rss) = wait_rss(&mut child, Duration::from_secs(30));
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("cannot resolve --connect"), "{err}");
    assert!(
        rss < 256 << 20,
        "{rss} bytes resident: the guest was allocated first"
    );
}

/// One `source` run of 32 MiB against `addr`, within the deadline.
fn source_to(addr: &str) -> Output {
    let mut cmd = bench();
    cmd.args(["source", "--connect", &format!("tcp:{addr}")])
        .args(["--size", "32MiB", "--fill", "random", "--json"])
        .env("RMIG_KEY", KEY);
    output(&mut cmd)
}

#[test]
fn keep_serving_takes_one_source_after_another_until_ctrl_c() {
    let dest = DestChild::start(&["--size", "32MiB", "--json", "--keep-serving"], KEY);
    let first = source_to(&dest.addr);
    assert!(first.status.success(), "{}", stderr_of(&first));
    // The next source comes at once, before the destination says it listens again: the
    // listener stays bound between migrations, so it waits in the backlog and is served.
    let second = source_to(&dest.addr);
    assert!(second.status.success(), "{}", stderr_of(&second));
    dest.wait_listening(3);
    signal(&dest.child, libc::SIGINT);
    let out = dest.finish(Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(130), "{}", stderr_of(&out));
    let reports: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let statuses: Vec<&str> = reports
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["completed", "completed", "cancelled"]);
    for r in &reports[..2] {
        assert!(
            r["dest"]["received_bytes"].as_u64().unwrap() >= 32 << 20,
            "{r}"
        );
    }
}

#[test]
fn bare_transfer_moves_the_bytes_unfaulted_or_prefaulted() {
    for (flags, memory) in [(&[][..], "unfaulted"), (&["--prefault"][..], "prefaulted")] {
        let out = output(
            bench()
                .args([
                    "bare", "--size", "8MiB", "--lanes", "3", "--check", "--json",
                ])
                .args(flags),
        );
        assert!(out.status.success(), "{}", stderr_of(&out));
        let j = json_of(&out);
        assert_eq!(j["memory"], memory);
        assert_eq!(j["connections"], 3);
        assert_eq!(j["bytes"], 8 << 20);
        assert_eq!(j["memory_equal"], true, "{j}");
        assert_eq!(j["source_hash"], j["dest_hash"]);
        assert!(j["data_rate"].as_f64().unwrap() > 0.0);
    }
    let text = output(bench().args(["bare", "--size", "1MiB", "--lanes", "2"]));
    assert!(String::from_utf8_lossy(&text.stdout)
        .contains("memory: unfaulted (neither end touched before)"));
}

/// The figure after `label` in `line`, e.g. `rmig 0.68 GB/s` gives 0.68 for `rmig `.
fn figure_after(line: &str, label: &str) -> f64 {
    let rest = &line[line
        .find(label)
        .unwrap_or_else(|| panic!("{label:?} in {line}"))
        + label.len()..];
    rest.split([' ', ','])
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{label:?} in {line}: {e}"))
}

#[test]
fn vs_iperf3_script_prints_the_bare_column_and_its_ratio() {
    if Command::new("iperf3").arg("--version").output().is_err() {
        eprintln!("iperf3 is not installed; nothing to compare against");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/vs-iperf3.sh");
    let out = output_within(
        Command::new(script)
            .arg("2")
            .env("RUNS", "1")
            .env("SIZE", "8MiB")
            .env("IPERF_SECONDS", "1")
            .env("BENCH", env!("CARGO_BIN_EXE_rmig-bench")),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let median = stdout
        .lines()
        .find(|l| l.starts_with("median:"))
        .unwrap_or_else(|| panic!("no median line: {stdout}"));
    let rmig = figure_after(median, "rmig ");
    let bare = figure_after(median, "bare (prefaulted) ");
    let ratio = figure_after(median, "rmig/bare ");
    assert!(rmig > 0.0 && bare > 0.0, "{median}");
    // Both rates are printed rounded to 0.01 GB/s; the ratio is of the unrounded rates.
    let tol = 0.01 / bare * (1.0 + ratio) + 0.01;
    assert!((ratio - rmig / bare).abs() <= tol, "{median}");
}

/// RDMA under encryption: refused without `--rdma-cleartext-lanes` (the error and the hint
/// name it); with it, the source gets as far as looking for a device (none for 127.0.0.1).
/// `auto` with the flag migrates over TCP in TLS, the JSON saying every page was encrypted.
#[test]
fn rdma_under_encryption_needs_the_cleartext_lanes_flag() {
    // The source decides before its TLS handshake: a listener that never accepts will do.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to = l.local_addr().unwrap().to_string();
    let source = [
        "source",
        "--connect",
        &to,
        "--size",
        "16MiB",
        "--transport",
        "rdma",
    ];
    let out = output(bench().args(source).env("RMIG_KEY", KEY));
    assert!(!out.status.success());
    let e = last_err_line(&out);
    assert!(
        e.contains("--rdma-cleartext-lanes") && e.contains("in clear"),
        "{e}"
    );
    let mut opted = bench();
    opted.args(source).arg("--rdma-cleartext-lanes");
    let out = output(opted.env("RMIG_KEY", KEY));
    assert!(!out.status.success());
    let e = last_err_line(&out);
    assert!(e.contains("no RDMA device"), "{e}");
    let base = ["loopback", "--size", "16MiB", "--encryption", "on"];
    let out = output(
        bench()
            .args(base)
            .args(["--rdma-cleartext-lanes", "--json"]),
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let j = json_of(&out);
    assert_eq!(j["transport"], "tcp");
    assert_eq!(j["encryption"], "tls-psk");
    assert_eq!(j["data_lanes_encrypted"], true);
}

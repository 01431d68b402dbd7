//! External load tools (hey, wrk, iperf3) run as bounded child processes,
//! with parsers for their output; and the built-in bulk transfer used when
//! iperf3 is missing.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// What one run of a load tool measured.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ToolSample {
    pub requests_per_sec: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Responses counted by the tool.
    pub responses: u64,
    /// Errors (connect, read, timeouts, non-2xx) the tool reported.
    pub errors: u64,
}

/// Runs `cmd` with its output in a file, killing it after `timeout`; returns its output.
pub fn run_bounded(mut cmd: Command, timeout: Duration, dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(format!("{name}.out"));
    let out = std::fs::File::create(&path).ctx(|| format!("create {}", path.display()))?;
    let err = out.try_clone().ctx(|| "dup".into())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .ctx(|| format!("start {:?}", cmd.get_program()))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().ctx(|| "wait".into())? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::NotReady {
                what: format!("{name} (killed)"),
                secs: timeout.as_secs(),
                log: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    if !status.success() {
        return Err(Error::Protocol {
            what: name.to_owned(),
            detail: format!("exited with {status}: {}", crate::net::truncate(&text, 400)),
        });
    }
    Ok(text)
}

/// Go-style duration text for hey: `1.5s`, `300ms`.
pub fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// One HTTP load run of an external tool: where, how many clients, how long.
#[derive(Clone, Copy, Debug)]
pub struct HttpRun<'a> {
    pub url: &'a str,
    pub concurrency: usize,
    pub duration: Duration,
    /// `false`: a new connection per request.
    pub keepalive: bool,
}

/// `hey -z D -c C [-disable-keepalive] URL`.
pub fn hey(bin: &Path, run: &HttpRun, dir: &Path) -> Result<ToolSample> {
    let mut cmd = Command::new(bin);
    cmd.args([
        "-z",
        &go_duration(run.duration),
        "-c",
        &run.concurrency.to_string(),
        "-t",
        "10",
    ]);
    if !run.keepalive {
        cmd.arg("-disable-keepalive");
    }
    cmd.arg(run.url);
    let text = run_bounded(cmd, run.duration + Duration::from_secs(30), dir, "hey")?;
    parse_hey(&text).ok_or_else(|| no_rate("hey", &text))
}

/// The error for a tool's output without a Requests/sec line.
fn no_rate(tool: &str, text: &str) -> Error {
    Error::Protocol {
        what: tool.into(),
        detail: format!(
            "no Requests/sec in its output: {}",
            crate::net::truncate(text, 400)
        ),
    }
}

/// Parses hey's text report.
pub fn parse_hey(text: &str) -> Option<ToolSample> {
    let mut s = ToolSample::default();
    let mut found = false;
    let mut in_errors = false;
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            s.requests_per_sec = v.trim().parse().ok()?;
            found = true;
        } else if let Some(v) = t.strip_prefix("50% in ") {
            s.p50_ms = v
                .trim_end_matches(" secs")
                .trim()
                .parse::<f64>()
                .ok()
                .map(|x| x * 1000.0);
        } else if let Some(v) = t.strip_prefix("99% in ") {
            s.p99_ms = v
                .trim_end_matches(" secs")
                .trim()
                .parse::<f64>()
                .ok()
                .map(|x| x * 1000.0);
        } else if t == "Error distribution:" {
            in_errors = true;
            continue;
        }
        if let Some(bracketed) = t.strip_prefix('[') {
            let (code, rest) = bracketed.split_once(']').unwrap_or(("", ""));
            let n: u64 = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if in_errors {
                s.errors += code.parse::<u64>().unwrap_or(0);
            } else if let Ok(code) = code.parse::<u16>() {
                s.responses += n;
                if !(200..400).contains(&code) {
                    s.errors += n;
                }
            }
        }
    }
    found.then_some(s)
}

/// `wrk -t T -c C -d D --latency [-H "Connection: close"] URL`.
pub fn wrk(bin: &Path, run: &HttpRun, dir: &Path) -> Result<ToolSample> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(run.concurrency);
    // wrk takes whole seconds.
    let secs = run.duration.as_secs_f64().round().max(1.0) as u64;
    let mut cmd = Command::new(bin);
    cmd.args([
        "-t",
        &threads.to_string(),
        "-c",
        &run.concurrency.to_string(),
        "-d",
        &format!("{secs}s"),
        "--timeout",
        "10s",
        "--latency",
    ]);
    if !run.keepalive {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(run.url);
    let text = run_bounded(cmd, Duration::from_secs(secs + 30), dir, "wrk")?;
    parse_wrk(&text).ok_or_else(|| no_rate("wrk", &text))
}

fn wrk_time_ms(v: &str) -> Option<f64> {
    let v = v.trim();
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

/// Parses wrk's report (with `--latency`).
pub fn parse_wrk(text: &str) -> Option<ToolSample> {
    let mut s = ToolSample::default();
    let mut found = false;
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            s.requests_per_sec = v.trim().parse().ok()?;
            found = true;
        } else if let Some(v) = t.strip_prefix("50%") {
            s.p50_ms = wrk_time_ms(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            s.p99_ms = wrk_time_ms(v);
        } else if t.contains(" requests in ") {
            s.responses = t.split_whitespace().next()?.parse().ok()?;
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            s.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            s.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    found.then_some(s)
}

/// `iperf3 -c IP -p PORT -P streams -t secs -J`: Gbit/s received.
pub fn iperf3(
    bin: &Path,
    addr: SocketAddr,
    streams: usize,
    duration: Duration,
    dir: &Path,
) -> Result<f64> {
    let secs = duration.as_secs_f64().round().max(1.0) as u64;
    let mut cmd = Command::new(bin);
    cmd.args([
        "-c",
        &addr.ip().to_string(),
        "-p",
        &addr.port().to_string(),
        "-P",
        &streams.to_string(),
        "-t",
        &secs.to_string(),
        "-J",
    ]);
    let text = run_bounded(cmd, Duration::from_secs(secs + 30), dir, "iperf3")?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Protocol {
        what: "iperf3".into(),
        detail: format!("not JSON ({e})"),
    })?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| Error::Protocol {
            what: "iperf3".into(),
            detail: format!("no end.sum_received: {}", v["error"]),
        })
}

/// The built-in bulk transfer: `streams` connections to a sink write for
/// `duration`, then close and wait for the sink to close; Gbit/s over that time.
pub fn bulk_builtin(addr: SocketAddr, streams: usize, duration: Duration) -> Result<f64> {
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<u64> {
                let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                s.set_write_timeout(Some(Duration::from_secs(10)))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let buf = vec![0x5au8; 128 * 1024];
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    s.write_all(&buf)?;
                    sent += buf.len() as u64;
                }
                s.shutdown(std::net::Shutdown::Write)?;
                let mut rest = [0u8; 64];
                while s.read(&mut rest)? > 0 {}
                Ok(sent)
            })
        })
        .collect();
    let mut total = 0u64;
    for h in handles {
        total += h
            .join()
            .map_err(|_| Error::Protocol {
                what: "bulk transfer".into(),
                detail: "a stream thread panicked".into(),
            })?
            .ctx(|| format!("bulk transfer to {addr}"))?;
    }
    Ok(total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEY: &str = "\nSummary:\n  Total:\t1.0016 secs\n  Slowest:\t0.0209 secs\n  Fastest:\t0.0001 secs\n  Average:\t0.0021 secs\n  Requests/sec:\t23456.7890\n  \n  Total data:\t164199 bytes\n  Size/request:\t7 bytes\n\nResponse time histogram:\n  0.000 [1]\t|\n\n\nLatency distribution:\n  10% in 0.0005 secs\n  50% in 0.0015 secs\n  99% in 0.0102 secs\n\nStatus code distribution:\n  [200]\t23450 responses\n  [502]\t3 responses\n\nError distribution:\n  [4]\tGet \"http://127.0.0.1:1/\": dial tcp: connection refused\n";

    #[test]
    fn hey_output_parses() {
        let s = parse_hey(HEY).unwrap();
        assert_eq!(s.requests_per_sec, 23456.789);
        assert_eq!(s.p50_ms, Some(1.5));
        assert!((s.p99_ms.unwrap() - 10.2).abs() < 1e-9);
        assert_eq!(s.responses, 23453);
        assert_eq!(s.errors, 7);
        assert!(parse_hey("nothing").is_none());
    }

    #[test]
    fn wrk_output_parses() {
        let text = "Running 1s test @ http://127.0.0.1:9101/\n  1 threads and 10 connections\n  Latency Distribution\n     50%  227.00us\n     75%  300.00us\n     90%  400.00us\n     99%    1.23ms\n  24691 requests in 1.00s, 3.58MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 5\nRequests/sec:  24691.23\nTransfer/sec:      3.58MB\n";
        let s = parse_wrk(text).unwrap();
        assert_eq!(s.requests_per_sec, 24691.23);
        assert_eq!(s.p50_ms, Some(0.227));
        assert_eq!(s.p99_ms, Some(1.23));
        assert_eq!(s.responses, 24691);
        assert_eq!(s.errors, 8);
    }

    #[test]
    fn durations_print_for_go() {
        assert_eq!(go_duration(Duration::from_secs(5)), "5s");
        assert_eq!(go_duration(Duration::from_millis(300)), "300ms");
    }
}

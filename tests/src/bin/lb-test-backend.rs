//! A backend process for the end-to-end tests: a real process that tests can
//! SIGKILL and restart on the same port.
//!
//! ```text
//! lb-test-backend echo --name N --listen ADDR [--ready-file PATH]
//! lb-test-backend http --name N --listen ADDR [--ready-file PATH]
//! ```
//!
//! - `echo`: on each connection writes `N\n`, then echoes everything it reads;
//!   on EOF from the client it shuts down its write side.
//! - `http`: a minimal HTTP/1.1 keep-alive responder: every request gets 200
//!   with an `X-Node: N` header and body `N\n`.
//!
//! `ADDR` may use port 0; the bound address is written to the ready file
//! (atomically: written beside it, then renamed) once the socket listens.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;

const USAGE: &str = "usage: lb-test-backend (echo|http) --name N --listen ADDR [--ready-file PATH]";

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let (mut name, mut listen, mut ready) = (None, None, None);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| fail(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--name" => name = Some(value),
            "--listen" => listen = Some(value),
            "--ready-file" => ready = Some(PathBuf::from(value)),
            _ => fail(&format!("unknown flag {flag}")),
        }
    }
    let name: Arc<str> = Arc::from(name.unwrap_or_else(|| fail("--name is required")));
    let listen = listen.unwrap_or_else(|| fail("--listen is required"));
    let handler: fn(TcpStream, &str) = match mode.as_str() {
        "echo" => echo,
        "http" => http,
        _ => fail(&format!("unknown mode `{mode}`")),
    };
    let listener = TcpListener::bind(&listen)
        .unwrap_or_else(|e| fail(&format!("cannot listen on {listen}: {e}")));
    let addr = listener.local_addr().expect("local_addr");
    if let Some(path) = ready {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{addr}\n")).expect("write ready file");
        std::fs::rename(&tmp, &path).expect("rename ready file");
    }
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = Arc::clone(&name);
        std::thread::spawn(move || handler(stream, &name));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("lb-test-backend: {msg}\n{USAGE}");
    std::process::exit(2);
}

fn echo(mut s: TcpStream, name: &str) {
    let _ = s.set_nodelay(true);
    if s.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let _ = s.shutdown(Shutdown::Write);
                // Keep the socket until the peer closes too, so a late client
                // write is not answered with a reset.
                let _ = io::copy(&mut s, &mut io::sink());
                return;
            }
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn http(s: TcpStream, name: &str) {
    let _ = s.set_nodelay(true);
    let Ok(write_half) = s.try_clone() else {
        return;
    };
    let mut w = write_half;
    let mut r = BufReader::new(s);
    let body = format!("{name}\n");
    loop {
        let mut request_line = String::new();
        match r.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if request_line.trim().is_empty() {
            continue;
        }
        let mut close = request_line.trim_end().ends_with("HTTP/1.0");
        let mut content_length = 0u64;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.parse().unwrap_or(0);
                } else if k.eq_ignore_ascii_case("connection") {
                    if v.eq_ignore_ascii_case("close") {
                        close = true;
                    } else if v.eq_ignore_ascii_case("keep-alive") {
                        close = false;
                    }
                }
            }
        }
        if content_length > 0
            && io::copy(&mut (&mut r).take(content_length), &mut io::sink()).is_err()
        {
            return;
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nX-Node: {name}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if w.write_all(response.as_bytes()).is_err() {
            return;
        }
        if close {
            let _ = w.shutdown(Shutdown::Write);
            return;
        }
    }
}

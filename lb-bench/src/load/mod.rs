//! The load generator: `c` workers on tokio, each with one connection at a
//! time, bounded by a request count (`-n`) and/or a duration (`-z`).
//!
//! - HTTP/1.1 `GET` with keep-alive (one connection per worker, reopened if
//!   the server closes it) or without (`Connection: close`, a new connection,
//!   so a new 5-tuple, per request: what `hey -disable-keepalive` does).
//! - Raw TCP: send `size` bytes, read the echo back.
//! - `qps` is a rate limit **per worker**, as hey's `-q`: the total is at most
//!   `qps × c`.
//! - With a source range, each new connection binds the next address of the
//!   range, round-robin, so the balancer sees many client IPs.
//!
//! Every response's latency (from the start of the request, including the
//! connect when it opened a connection, to the last byte) goes into an HDR
//! histogram; the backend that served it comes from a response header
//! (`X-Node`), or for TCP from the echo server's greeting line.
//!
//! The files, in the order a run uses them (each depends only on the ones
//! before it, never on the runner, so there are no import loops):
//!
//! - `spec`: [`LoadSpec`], its validation, expected shares from `/backends`;
//! - `report`: what a run measured ([`LoadReport`] and its parts); the JSON
//!   report is these types' `Serialize`;
//! - `state`: what all workers of one run share (budget, deadline, sources);
//! - `tally`: one worker's counts, and how two tallies merge;
//! - `conn`: opening and closing a worker's connection;
//! - `exchange`: one request, over HTTP/1.1 or raw TCP, and what it counts;
//! - `progress`: the progress bar on stderr;
//! - `summary`: the merged tally turned into a [`LoadReport`];
//! - `run`: [`run`], the workers and their loop;
//! - `text`: [`render_text`], hey's text layout.
//!
//! [`udp`] is the UDP generator, apart from all of the above: closed-loop
//! echo flows on blocking threads with batched syscalls; [`quic`] is the
//! QUIC handshake load (new connections from new sockets, on quinn).

mod conn;
mod exchange;
mod progress;
pub mod quic;
mod report;
mod run;
mod spec;
mod state;
mod summary;
mod tally;
mod text;
pub mod udp;

pub use report::{BackendRow, Distribution, FlowRecord, Latency, LoadReport};
pub use run::run;
pub use spec::{expected_from_admin, LoadSpec, DEFAULT_REQUESTS};
pub use text::render_text;

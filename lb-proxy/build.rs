//! Builds the sockmap engine's BPF program (`bpf/sockmap.bpf.c`) with clang
//! into `$OUT_DIR/sockmap.bpf.o`, which `src/tcp/sockmap.rs` embeds. Without
//! clang (or when it fails) the object is left empty and the build still
//! succeeds: the engine then reports itself unavailable at runtime and
//! frontends asking for it copy with `auto` instead.
//!
//! `CLANG` names another compiler; the command run is
//! `clang -O2 -g -target bpf -I/usr/include/<arch>-linux-gnu -c bpf/sockmap.bpf.c -o $OUT_DIR/sockmap.bpf.o`.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "bpf/sockmap.bpf.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("sockmap.bpf.o");
    if let Err(why) = compile(&object) {
        println!(
            "cargo:warning=sockmap engine not built ({why}); copy = \"sockmap\" will run as auto"
        );
        std::fs::write(&object, []).expect("OUT_DIR is writable");
    }
}

/// Runs clang; the error says why there is no object.
fn compile(object: &Path) -> Result<(), String> {
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // <linux/bpf.h> includes <asm/types.h>, which Debian keeps under the host's multiarch directory.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    let status = Command::new(&clang)
        .args([
            "-O2", "-g", "-target", "bpf", &multiarch, "-c", SOURCE, "-o",
        ])
        .arg(object)
        .status()
        .map_err(|e| format!("cannot run {clang}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{clang} failed: {status}"))
    }
}

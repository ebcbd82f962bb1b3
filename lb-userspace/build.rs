//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! When it is missing (plain `cargo check`/`clippy` on a machine without the
//! BPF toolchain) an empty object is embedded instead; `lb` then refuses to
//! load it with a message that says how to build it.

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = env::var_os("LB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/lb-ebpf"));
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let dest = out.join("lb-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&dest, bytes).expect("write embedded object"),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not found: embedding an empty one (run `cargo xtask build`)",
                object.display()
            );
            fs::write(&dest, []).expect("write empty object");
        }
    }
}

//! Embeds the eBPF objects built by `cargo xtask build-ebpf`: the data
//! plane's (`LB_EBPF_OBJECT`, lb-ebpf) and, from the same directory, the
//! backends' decapsulator (`lb-decap`, lb-ebpf's second object, which `lb
//! decap` loads) and the tools' (lb-ebpf-tools: `lb-pktgen`, which `lb
//! pktgen` loads, and `lb-bench`, which only the `harness` feature embeds).
//!
//! When one is missing (plain `cargo check`/`clippy` on a machine without
//! the BPF toolchain) an empty object is embedded instead; `lb` then refuses
//! to load it with a message that says how to build it.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = env::var_os("LB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/lb-ebpf"));
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    embed(&object, &out.join("lb-ebpf.o"));
    for tool in ["lb-decap", "lb-pktgen", "lb-bench"] {
        embed(&object.with_file_name(tool), &out.join(format!("{tool}.o")));
    }
}

fn embed(object: &Path, dest: &Path) {
    println!("cargo:rerun-if-changed={}", object.display());
    match fs::read(object) {
        Ok(bytes) => fs::write(dest, bytes).expect("write embedded object"),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not found: embedding an empty one (run `cargo xtask build`)",
                object.display()
            );
            fs::write(dest, []).expect("write empty object");
        }
    }
}

//! The Debian package as an operator meets it: `cargo xtask test` builds it
//! with `cargo xtask package` from the debug build it tests (LB_DEB; the
//! release package differs only in the binary's optimisation). Its contents
//! and metadata are inspected (`dpkg-deb`, `lintian`), then it is installed
//! with `dpkg -i`, used (`lb --version`, `man lb`, `systemd-analyze verify`
//! of the installed unit, `lb validate` of the installed config, `lb pktgen
//! --help`) and purged, leaving nothing behind. The installed `lb` is the
//! product without the harness: no `lb lab`/`lb bench`, no lab TLS stack
//! (rcgen, rustls's server side), and its embedded eBPF objects hold the
//! data plane's program, the decapsulator's (`lb decap`) and the
//! generator's, none of the benchmark's.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context, Result, ensure};
use lb_tests::lb_bin;

fn run(program: &str, args: &[&str]) -> Result<Output> {
    Command::new(program)
        .args(args)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))
}

/// Stdout of a command that must succeed.
fn ok(program: &str, args: &[&str]) -> Result<String> {
    let out = run(program, args)?;
    ensure!(
        out.status.success(),
        "{program} {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn installed() -> Result<bool> {
    Ok(run("dpkg-query", &["-W", "-f", "${Status}", "lb"])?
        .stdout
        .starts_with(b"install ok installed"))
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The eBPF objects embedded in `binary` (ELF files of machine EM_BPF in its
/// bytes), each as the names of its programs, parsed as aya parses them.
fn embedded_bpf_programs(binary: &[u8]) -> Result<Vec<BTreeSet<String>>> {
    const EM_BPF: u16 = 247;
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let mut objects = Vec::new();
    let mut at = 0;
    while let Some(i) = find(&binary[at..], b"\x7fELF") {
        let elf = &binary[at + i..];
        at += i + 4;
        // 64-bit little-endian, e_machine EM_BPF.
        if elf.len() < 64 || elf[4] != 2 || elf[5] != 1 || u16_at(elf, 18) != EM_BPF {
            continue;
        }
        // The section headers end the file: e_shoff + e_shnum * e_shentsize.
        let shoff = u64::from_le_bytes(elf[40..48].try_into()?) as usize;
        let len = shoff + usize::from(u16_at(elf, 60)) * usize::from(u16_at(elf, 58));
        ensure!(len <= elf.len(), "an embedded BPF ELF runs past the binary");
        // ELF parsing wants its headers aligned: copy into 8-byte words.
        let mut words = vec![0u64; len.div_ceil(8)];
        let bytes: &mut [u8] = bytemuck_bytes(&mut words);
        bytes[..len].copy_from_slice(&elf[..len]);
        let object = aya_obj::Object::parse(&bytes[..len]).context("parsing an embedded object")?;
        objects.push(object.programs.keys().cloned().collect());
    }
    Ok(objects)
}

/// `words` as bytes.
fn bytemuck_bytes(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: u8 has no alignment or validity requirement; same memory,
    // eight times the length.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) }
}

/// Purges the package when the test ends, however it ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run("dpkg", &["--purge", "lb"]);
    }
}

#[test]
fn debian_package_installs_works_and_purges() -> Result<()> {
    lb_bin(); // root, and the tests' environment
    let deb = PathBuf::from(std::env::var_os("LB_DEB").context(
        "LB_DEB is not set: run the tests with `cargo xtask test`, which builds the package",
    )?);
    let deb_arg = deb.to_str().context("package path")?;
    ensure!(
        !installed()?,
        "a package named lb is already installed on this host: not replacing it"
    );

    // What is in it.
    let contents = ok("dpkg-deb", &["--contents", deb_arg])?;
    for path in [
        "./usr/bin/lb",
        "./lib/systemd/system/lb.service",
        "./etc/lb/lb.toml",
        "./usr/share/man/man1/lb.1.gz",
        "./usr/share/man/man1/lb-run.1.gz",
        "./usr/share/man/man1/lb-doctor.1.gz",
        "./usr/share/bash-completion/completions/lb",
        "./usr/share/zsh/vendor-completions/_lb",
        "./usr/share/fish/vendor_completions.d/lb.fish",
        "./usr/share/doc/lb/deployment.md",
        "./usr/share/doc/lb/copyright",
    ] {
        ensure!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{contents}"
        );
    }
    let fields = ok(
        "dpkg-deb",
        &["--field", deb_arg, "Package", "Version", "Architecture"],
    )?;
    let version = env!("CARGO_PKG_VERSION");
    ensure!(
        fields.contains("Package: lb") && fields.contains(&format!("Version: {version}")),
        "{fields}"
    );
    let conffiles = ok("dpkg-deb", &["--info", deb_arg, "conffiles"])?;
    ensure!(
        conffiles.trim() == "/etc/lb/lb.toml",
        "the config is a conffile (an upgrade keeps the operator's edits): {conffiles}"
    );
    // No maintainer script: installing enables and starts nothing.
    let info = ok("dpkg-deb", &["--info", deb_arg])?;
    ensure!(
        !info.contains("postinst") && !info.contains("prerm"),
        "{info}"
    );

    // Debian's own checker: no error.
    let lintian = run("lintian", &["--fail-on", "error", deb_arg])?;
    let report = String::from_utf8_lossy(&lintian.stdout);
    ensure!(
        lintian.status.success() && !report.lines().any(|l| l.starts_with("E:")),
        "lintian {}:\n{report}{}",
        lintian.status,
        String::from_utf8_lossy(&lintian.stderr)
    );

    // Installed.
    let guard = Installed;
    ok("dpkg", &["-i", deb_arg])?;
    ensure!(installed()?, "dpkg -i did not install lb");
    let version_line = ok("/usr/bin/lb", &["--version"])?;
    ensure!(
        version_line.trim() == format!("lb {version}"),
        "{version_line}"
    );
    let man = ok("man", &["lb"])?;
    ensure!(
        man.contains("lb - XDP L4 load balancer") && man.contains("lb-doctor(1)"),
        "man lb:\n{man}"
    );
    let man_doctor = ok("man", &["lb-doctor"])?;
    ensure!(
        man_doctor.contains("--config"),
        "man lb-doctor:\n{man_doctor}"
    );
    let unit = Path::new("/lib/systemd/system/lb.service");
    let verify = run(
        "systemd-analyze",
        &["verify", unit.to_str().context("unit path")?],
    )?;
    let stderr = String::from_utf8_lossy(&verify.stderr);
    ensure!(
        verify.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {}: {}\n{stderr}",
        unit.display(),
        verify.status
    );
    let validate = ok("/usr/bin/lb", &["validate", "/etc/lb/lb.toml"])?;
    ensure!(validate.contains(": ok ("), "{validate}");

    // The product, not the harness: the load generator is there, the lab
    // and the benchmarks are not.
    let pktgen = ok("/usr/bin/lb", &["pktgen", "--help"])?;
    ensure!(
        pktgen.contains("--dev") && pktgen.contains("--dst-mac"),
        "lb pktgen --help:\n{pktgen}"
    );
    for verb in ["lab", "bench"] {
        let out = run("/usr/bin/lb", &[verb, "--help"])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains("unrecognized subcommand"),
            "the installed lb has `lb {verb}` ({}):\n{stderr}",
            out.status
        );
    }
    let binary = std::fs::read("/usr/bin/lb")?;
    ensure!(
        find(&binary, b"rcgen").is_none(),
        "the installed lb links rcgen (the lab's certificates)"
    );
    // rustls's client stays (the `tls` health check); its server side, the
    // lab's HTTPS, does not: no panic location in rustls's src/server/.
    let mut rest = &binary[..];
    while let Some(i) = find(rest, b"rustls-0.") {
        let path = &rest[i..rest.len().min(i + 40)];
        ensure!(
            find(path, b"/src/server/").is_none(),
            "the installed lb links rustls's server side: {}",
            String::from_utf8_lossy(path)
        );
        rest = &rest[i + 1..];
    }
    let objects = embedded_bpf_programs(&binary)?;
    let names = |o: &[&str]| o.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    ensure!(
        objects.len() == 3
            && objects.contains(&names(&[
                "lb",
                "lb_probe",
                "lb_proxy",
                "lb_proxy6",
                "lb_setup",
                "lb_v6",
                "lb_v6_portless",
                "lb_v6_setup"
            ]))
            && objects.contains(&names(&["lb_decap"]))
            && objects.contains(&names(&["pktgen"])),
        "the installed lb embeds the data plane's object (`lb`, its second stage `lb_setup`, its PROXY v2 stages `lb_proxy` and `lb_proxy6`, IPv6's stages `lb_v6`, `lb_v6_setup` and `lb_v6_portless`, and `lb_probe` for checks through the VIP), the backends' decapsulator's (`lb_decap`, `lb decap`) and the generator's (`pktgen`), no benchmark program: {objects:?}"
    );
    let bash = std::fs::read_to_string("/usr/share/bash-completion/completions/lb")?;
    ensure!(
        bash.contains("doctor"),
        "the bash completions know the commands"
    );

    // Purged: nothing left, the conffile included.
    drop(guard);
    ensure!(!installed()?, "dpkg --purge left lb installed");
    for path in [
        "/usr/bin/lb",
        "/etc/lb/lb.toml",
        unit.to_str().unwrap_or(""),
    ] {
        ensure!(!Path::new(path).exists(), "{path} left after purge");
    }
    Ok(())
}

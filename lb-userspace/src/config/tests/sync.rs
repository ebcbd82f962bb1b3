//! `[sync]`: the key file (its mode, its length), the addresses, the
//! bulk copy's wait, and a config with `[sync]` going through `check`.

use std::os::unix::fs::PermissionsExt as _;

use super::*;

/// A key file with `text` and `mode` in a directory of this test's own.
fn key_file(test: &str, text: &str, mode: u32) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lb-sync-test-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("sync.key");
    std::fs::write(&file, text).expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).expect("chmod");
    file
}

const KEY: &str = "4f1c0e5d9a2b7c3e8f6a1d0b9c2e7f4a3b8d5c6e1f0a9b2c7d4e3f8a5b6c1d0e\n";

fn with_sync(lines: &str) -> String {
    format!("{}\n[sync]\n{lines}\n", one_service("", B1))
}

fn sync_lines(file: &std::path::Path, extra: &str) -> String {
    format!(
        "listen = \"198.19.0.11:7890\"\npeers = [\"198.19.0.12:7890\", \"198.19.0.13:7890\"]\n\
         key-file = \"{}\"\n{extra}",
        file.display()
    )
}

#[test]
fn a_sync_section_is_read_with_its_key_and_defaults() {
    let file = key_file("ok", KEY, 0o600);
    let cfg = parse_ok(&with_sync(&sync_lines(&file, "")));
    let sync = cfg.sync.clone().expect("[sync]");
    assert_eq!(sync.listen, addr4("198.19.0.11:7890"));
    assert_eq!(
        sync.peers,
        vec![addr4("198.19.0.12:7890"), addr4("198.19.0.13:7890")]
    );
    assert_eq!(sync.key.expose(), KEY.trim());
    assert_eq!(sync.bulk_timeout, std::time::Duration::from_secs(2));
    assert!(
        !format!("{sync:?}").contains(KEY.trim()),
        "Debug hides the key"
    );
    // A live change goes through the same rules, [sync] included.
    assert_eq!(check(&cfg, Path::new("live")).expect("check"), cfg);
    let cfg = parse_ok(&with_sync(&sync_lines(&file, "bulk-timeout = \"500ms\"")));
    assert_eq!(
        cfg.sync.expect("[sync]").bulk_timeout,
        std::time::Duration::from_millis(500)
    );
    assert!(
        parse_ok(&one_service("", B1)).sync.is_none(),
        "off by default"
    );
}

#[test]
fn a_key_file_others_may_read_or_a_short_key_is_refused() {
    for (test, mode, text, fragment) in [
        (
            "group",
            0o640,
            KEY,
            "mode 640 lets others read or write the key",
        ),
        ("world", 0o604, KEY, "mode 604"),
        ("short", 0o600, "0123456789abcdef\n", "at least 32"),
        ("empty", 0o600, "", "at least 32"),
    ] {
        let file = key_file(test, text, mode);
        let (key, reason) = parse_err(&with_sync(&sync_lines(&file, "")));
        assert_eq!(key, "sync.key-file", "{test}");
        assert!(reason.contains(fragment), "{test}: {reason}");
        assert!(
            reason.contains(&file.display().to_string()),
            "{test}: {reason}"
        );
    }
    let (key, reason) = parse_err(&with_sync(&sync_lines(Path::new("/no/such/key"), "")));
    assert_eq!(key, "sync.key-file");
    assert!(reason.contains("cannot read"), "{reason}");
}

#[test]
fn bad_sync_addresses_and_keys_are_named() {
    let file = key_file("bad", KEY, 0o600);
    let path = file.display().to_string();
    for (lines, key, fragment) in [
        (
            format!("peers = [\"198.19.0.12:7890\"]\nkey-file = \"{path}\""),
            "sync.listen",
            "required key is missing",
        ),
        (
            format!("listen = \"0.0.0.0:7890\"\npeers = [\"198.19.0.12:7890\"]\nkey-file = \"{path}\""),
            "sync.listen",
            "a specific address",
        ),
        (
            format!("listen = \"198.19.0.11\"\npeers = [\"198.19.0.12:7890\"]\nkey-file = \"{path}\""),
            "sync.listen",
            "expected IPv4:port",
        ),
        (
            format!("listen = \"198.19.0.11:7890\"\npeers = []\nkey-file = \"{path}\""),
            "sync.peers",
            "at least one peer",
        ),
        (
            format!(
                "listen = \"198.19.0.11:7890\"\npeers = [\"198.19.0.12:7890\", \"198.19.0.12:7891\"]\nkey-file = \"{path}\""
            ),
            "sync.peers[1]",
            "listed twice",
        ),
        (
            format!("listen = \"198.19.0.11:7890\"\npeers = [\"198.19.0.11:7891\"]\nkey-file = \"{path}\""),
            "sync.peers[0]",
            "this LB's own address",
        ),
        (
            "listen = \"198.19.0.11:7890\"\npeers = [\"198.19.0.12:7890\"]\nkey-file = \"sync.key\"".to_owned(),
            "sync.key-file",
            "absolute path",
        ),
        (
            sync_lines(&file, "bulk-timeout = \"61s\""),
            "sync.bulk-timeout",
            "at most 60s",
        ),
        (sync_lines(&file, "key = \"inline\""), "sync.key", "unknown field"),
    ] {
        assert_rejected(&with_sync(&lines), key, fragment);
    }
}

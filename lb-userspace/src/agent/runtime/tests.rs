//! The state file's merge rule and its atomic write.

use std::sync::atomic::{AtomicU32, Ordering};

use super::*;
use crate::{
    agent::state::{edit, firewall_edit},
    dataplane::firewall::List,
    wire::{BackendChange, RuleEdit},
};

const SITE: &str = r#"
[dataplane]
interfaces = ["lb-front", "lb-back"]

[[service]]
name = "www"
vip = "198.18.0.10:80"
scheduler = "weighted-round-robin"
backends = [
  { name = "web1", address = "198.19.0.11:80" },
  { name = "web2", address = "198.19.0.12:80" },
  { name = "web3", address = "198.19.0.13:80" },
]
"#;

fn parse(text: &str) -> Config {
    config::parse(text, Path::new("site.toml")).expect("valid site")
}

fn origin() -> &'static Path {
    Path::new("lb.state.toml")
}

/// A fresh directory under the temp dir, removed by the test.
fn scratch() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lb-runtime-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// The site after a series of `lb backend` and `lb firewall` commands.
fn changed(file: &Config) -> (Config, BTreeMap<Key, Admin>) {
    let mut cfg = file.clone();
    let mut admin = BTreeMap::new();
    let svc = |backend: &str| ("www".to_owned(), backend.to_owned());
    for change in [
        BackendChange::Drain {
            service: svc("web1").0,
            backend: svc("web1").1,
            wait: false,
            timeout: 0,
        },
        BackendChange::Weight {
            service: "www".into(),
            backend: "web2".into(),
            weight: 5,
        },
        BackendChange::Remove {
            service: "www".into(),
            backend: "web3".into(),
        },
        BackendChange::Add {
            service: "www".into(),
            backend: "web4".into(),
            address: "198.19.0.14:80".into(),
            weight: 2,
            backup: true,
        },
        BackendChange::Disable {
            service: "www".into(),
            backend: "web4".into(),
        },
    ] {
        let e = edit(&cfg, &admin, change).expect("edit");
        (cfg, admin) = (e.config, e.admin);
    }
    let deny = RuleEdit::Add {
        prefix: "203.0.113.0/24".into(),
        service: None,
    };
    (cfg, _) = firewall_edit(&cfg, List::Deny, &deny).expect("deny");
    (cfg, admin)
}

#[test]
fn changes_round_trip_through_the_file() {
    let file = parse(SITE);
    let (running, admin) = changed(&file);
    let state = diff(&file, &running, &admin);
    assert_eq!(
        state.describe(),
        vec![
            "www/web1: drain",
            "www/web2: weight 5 (file: 1)",
            "www/web3: removed",
            "www/web4: added 198.19.0.14:80 weight 2 backup, disabled",
            "[firewall]: deny 203.0.113.0/24 added",
        ]
    );
    let dir = scratch();
    let path = dir.join("lb.state.toml");
    save(&path, &state).expect("save");
    let back = load(&path).expect("load");
    assert_eq!(back, state);
    let merged = merge(&file, &back, origin());
    assert_eq!(merged.dropped, Vec::<String>::new());
    assert_eq!(merged.config, running);
    assert_eq!(merged.admin, admin);
    // Nothing changed at run time: nothing to keep.
    assert!(diff(&file, &file, &BTreeMap::new()).is_empty());
    std::fs::remove_dir_all(dir).expect("cleanup");
}

#[test]
fn the_file_wins_for_what_it_changed_since() {
    let file = parse(SITE);
    let (running, admin) = changed(&file);
    let state = diff(&file, &running, &admin);
    // The file now gives web2 weight 3 (the runtime change said 5 over 1),
    // names a web4 of its own, and web3 moved to another address.
    let edited = parse(&SITE.replace(
        r#"  { name = "web2", address = "198.19.0.12:80" },
  { name = "web3", address = "198.19.0.13:80" },"#,
        r#"  { name = "web2", address = "198.19.0.12:80", weight = 3 },
  { name = "web3", address = "198.19.0.23:80" },
  { name = "web4", address = "198.19.0.24:80" },"#,
    ));
    let merged = merge(&edited, &state, origin());
    let www = &merged.config.services[0];
    let shape = |name: &str| {
        www.backends
            .iter()
            .find(|b| b.name == name)
            .map(|b| (b.address.to_string(), b.weight))
    };
    assert_eq!(shape("web1"), Some(("198.19.0.11:80".into(), 1)));
    assert_eq!(shape("web2"), Some(("198.19.0.12:80".into(), 3)));
    assert_eq!(shape("web3"), Some(("198.19.0.23:80".into(), 1)));
    assert_eq!(shape("web4"), Some(("198.19.0.24:80".into(), 1)));
    // The drain survives (same server); web4's disable does not (the
    // file's web4 is another server).
    assert_eq!(
        merged.admin,
        BTreeMap::from([(key("www", "web1"), Admin::Drain)])
    );
    assert_eq!(merged.dropped.len(), 4, "{:#?}", merged.dropped);
    for (who, why) in [
        ("www/web2", "the file wins"),
        ("www/web3", "the file wins"),
        ("www/web4", "the file wins"),
        ("www/web4 disabled", "no longer in the config"),
    ] {
        assert!(
            merged
                .dropped
                .iter()
                .any(|d| d.starts_with(who) && d.contains(why)),
            "{who}: {why} missing from {:#?}",
            merged.dropped
        );
    }
    // The firewall prefix still applies; the kept state is what remains.
    assert_eq!(merged.config.firewall.deny.len(), 1);
    let kept = diff(&edited, &merged.config, &merged.admin);
    assert_eq!(
        kept.describe(),
        vec!["www/web1: drain", "[firewall]: deny 203.0.113.0/24 added"]
    );
}

#[test]
fn changes_the_config_no_longer_allows_are_dropped_alone() {
    let file = parse(SITE);
    let (running, admin) = changed(&file);
    let state = diff(&file, &running, &admin);
    // The file now uses web4's address for web1 (a runtime add would
    // duplicate it), the firewall denies the prefix itself, and the
    // service was renamed for the rest.
    let edited = parse(&SITE.replace("198.19.0.11:80", "198.19.0.14:80").replace(
        "[[service]]",
        "[firewall]\ndeny = [\"203.0.113.0/24\"]\n\n[[service]]",
    ));
    let merged = merge(&edited, &state, origin());
    let dropped = merged.dropped.join("\n");
    assert!(
        dropped.contains("www/web4") && dropped.contains("address"),
        "{dropped}"
    );
    assert!(dropped.contains("the config file says so now"), "{dropped}");
    // web1 is now another server: its drain is dropped too.
    assert!(dropped.contains("www/web1 drain"), "{dropped}");
    // The others still apply.
    let www = &merged.config.services[0];
    assert_eq!(
        www.backends
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>(),
        ["web1", "web2"]
    );
    assert_eq!(www.backends[1].weight, 5);

    let renamed = parse(&SITE.replace("name = \"www\"", "name = \"web\""));
    let merged = merge(&renamed, &state, origin());
    assert_eq!(merged.config.services, renamed.services);
    assert!(
        merged
            .dropped
            .iter()
            .all(|d| d.contains("no service www") || d.contains("[firewall]"))
    );
}

#[test]
fn the_write_is_atomic_and_a_bad_file_is_named() {
    let dir = scratch();
    let path = dir.join("lb.state.toml");
    let file = parse(SITE);
    let (running, admin) = changed(&file);
    let state = diff(&file, &running, &admin);
    save(&path, &state).expect("save");
    let first = std::fs::read_to_string(&path).expect("read");
    assert!(first.starts_with("# Runtime changes"), "{first}");
    // Replaced whole; no temporary file is left behind.
    let mut smaller = state.clone();
    smaller.backends.truncate(1);
    save(&path, &smaller).expect("save again");
    assert_eq!(load(&path).expect("load"), smaller);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["lb.state.toml"]);
    // A failed write leaves the old file as it was, and no temporary.
    let blocked = dir.join("blocked");
    std::fs::create_dir(blocked.join("").as_path()).expect("dir");
    std::fs::write(blocked.join("x"), "keep me non-empty").expect("x");
    let err = save(&blocked, &state).expect_err("rename over a directory");
    assert!(
        err.to_string()
            .starts_with(&format!("{}: cannot write", blocked.display())),
        "{err}"
    );
    assert_eq!(load(&path).expect("load"), smaller);
    assert!(!std::fs::read_dir(&dir).expect("list").any(|e| {
        e.expect("entry")
            .file_name()
            .to_string_lossy()
            .contains(".tmp.")
    }));
    // A symlink planted at the temporary names is never followed.
    let victim = dir.join("victim");
    std::fs::write(&victim, "untouched").expect("victim");
    for n in 0..2 {
        let name = format!(".lb.state.toml.tmp.{}.{n}", std::process::id());
        std::os::unix::fs::symlink(&victim, dir.join(name)).expect("symlink");
    }
    save(&path, &state).expect("save past the planted names");
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "untouched"
    );
    assert_eq!(load(&path).expect("load"), state);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    for n in 0..2 {
        std::fs::remove_file(dir.join(format!(".lb.state.toml.tmp.{}.{n}", std::process::id())))
            .expect("unplant");
    }
    std::fs::remove_file(&victim).expect("victim");
    // No runtime changes: no file.
    save(&path, &RuntimeState::default()).expect("empty");
    assert!(!path.exists());
    assert_eq!(load(&path).expect("no file"), RuntimeState::default());
    // A corrupt file is named with its reason, and set aside.
    std::fs::write(&path, "[[backend]]\nservice = 7\n").expect("write");
    let err = load(&path).expect_err("corrupt").to_string();
    assert!(
        err.starts_with(&format!("{}: not a state file", path.display())),
        "{err}"
    );
    let aside = set_aside(&path).expect("aside");
    assert!(aside.to_string_lossy().ends_with("lb.state.toml.corrupt"));
    assert!(!path.exists());
    assert_eq!(
        default_path(Path::new("/etc/lb/lb.toml")),
        Path::new("/etc/lb/lb.state.toml")
    );
    std::fs::remove_dir_all(dir).expect("cleanup");
}

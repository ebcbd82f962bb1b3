//! Kernel tier (issue 22): the one list of maps (lb-common/src/map_names.rs)
//! against the built object, and the adoption check of every pinned map: a
//! map pinned with another layout than the object's is refused, naming the
//! map, what was found, what is needed and `lb teardown`, before anything
//! is created, changed or attached.
//!
//! Needs root and BPF; without them the tests fail loudly.

use std::{collections::BTreeSet, path::Path};

use aya::maps::{MapData, MapInfo};
use aya_obj::{
    EbpfSectionKind,
    generated::bpf_map_type,
    maps::{LegacyMap, Map, PinningType, bpf_map_def},
};
use lb_tests::kernel_net::{Bpffs, TestNet, lab_config, pinned_files};
use lb_userspace::{
    dataplane::{Dataplane, DataplaneError, MapName},
    object::{EBPF_OBJECT, MapLayout, map_layouts},
};

/// The maps the built `lb` object declares (its map sections, not
/// `.data`/`.rodata`/`.bss`), as the adoption check reads them.
fn object_maps() -> BTreeSet<String> {
    assert!(
        !EBPF_OBJECT.is_empty(),
        "this lb was built without its eBPF object: run the tests with `cargo xtask test`"
    );
    map_layouts(EBPF_OBJECT)
        .expect("parse the lb object")
        .into_keys()
        .collect()
}

/// Every map of the object is in the list, pinned or deliberately unpinned
/// (with a reason), and every listed map is in the object: a `#[map]` added
/// to lb-ebpf without a line in map_names.rs fails here.
#[test]
fn every_map_of_the_object_is_listed_and_every_listed_map_exists() {
    let in_object = object_maps();
    let listed: BTreeSet<String> = MapName::ALL.iter().map(|m| m.name().to_owned()).collect();
    let unlisted: Vec<&String> = in_object.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "maps of the lb object missing from lb-common/src/map_names.rs (list each as pinned, \
         or unpinned with the reason): {unlisted:?}"
    );
    let gone: Vec<&String> = listed.difference(&in_object).collect();
    assert!(
        gone.is_empty(),
        "maps listed in lb-common/src/map_names.rs that the lb object no longer has: {gone:?}"
    );
    for map in MapName::ALL {
        if let lb_common::map_names::Pinning::Unpinned { why } = map.pinning() {
            assert!(!why.trim().is_empty(), "{map} is unpinned without a reason");
        }
    }
}

/// A loaded data plane pins exactly the list's pinned maps, and adopting
/// its own pins passes the layout check of every one of them.
#[test]
fn a_pinned_data_plane_pins_the_listed_maps_and_adopts_them() {
    let net = TestNet::new();
    let fs = Bpffs::new();
    let pins = fs.dir.join("lb");
    net.run(|| {
        let cfg = lab_config();
        let (first, adopted) = Dataplane::load_pinned(&cfg.dataplane, &pins).expect("load");
        assert!(!adopted);
        drop(first);
        let pinned: Vec<String> = {
            let mut v: Vec<String> = MapName::pinned().map(|m| m.name().to_owned()).collect();
            v.sort();
            v
        };
        assert_eq!(pinned_files(&pins), pinned);
        let (second, adopted) = Dataplane::load_pinned(&cfg.dataplane, &pins).expect("adopt");
        assert!(adopted);
        drop(second);
        Dataplane::teardown(&pins).expect("teardown");
    });
}

/// Creates a map of `layout` and pins it at `path`, as another version (or
/// anything else) could have left it.
fn pin_rogue(path: &Path, name: &str, layout: MapLayout) {
    let map = Map::Legacy(LegacyMap {
        def: bpf_map_def {
            map_type: layout.map_type,
            key_size: layout.key_size,
            value_size: layout.value_size,
            max_entries: layout.max_entries,
            map_flags: layout.flags,
            id: 0,
            pinning: PinningType::None,
        },
        inner_def: None,
        section_index: 0,
        section_kind: EbpfSectionKind::Maps,
        symbol_index: None,
        data: Vec::new(),
    });
    MapData::create(map, name, None)
        .unwrap_or_else(|e| panic!("create a rogue {name}: {e}"))
        .pin(path)
        .unwrap_or_else(|e| panic!("pin the rogue {name}: {e}"));
}

/// For each way a layout can differ (value size, entries, type, flags), a
/// map pinned that way in a fresh pin dir is refused: the error names the
/// map, the layout found and the one needed, and `lb teardown --pin-dir`;
/// the rogue map is left as it was and nothing else is pinned.
#[test]
fn a_pinned_map_of_another_layout_is_refused_before_anything_is_touched() {
    let wanted = map_layouts(EBPF_OBJECT).expect("the object's maps");
    let object = |map: MapName| wanted[map.name()].as_loaded();
    let cases = [
        (
            MapName::BACKENDS,
            MapLayout {
                value_size: object(MapName::BACKENDS).value_size + 8,
                ..object(MapName::BACKENDS)
            },
            format!(
                "of {}-byte entries",
                object(MapName::BACKENDS).value_size + 8
            ),
        ),
        (
            MapName::RINGS,
            MapLayout {
                max_entries: object(MapName::RINGS).max_entries / 2,
                ..object(MapName::RINGS)
            },
            format!("{} entries", object(MapName::RINGS).max_entries / 2),
        ),
        (
            MapName::NAT_BACKENDS,
            MapLayout {
                map_type: bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32,
                ..object(MapName::NAT_BACKENDS)
            },
            "a LruHash".to_string(),
        ),
        (
            MapName::VIPS,
            MapLayout {
                // BPF_F_NO_PREALLOC
                flags: 1,
                ..object(MapName::VIPS)
            },
            "flags 0x1".to_string(),
        ),
    ];
    let net = TestNet::new();
    let cfg = lab_config();
    for (map, rogue, found_part) in cases {
        let fs = Bpffs::new();
        let pins = fs.dir.join("lb");
        std::fs::create_dir_all(&pins).expect("pin dir");
        let path = pins.join(map.name());
        pin_rogue(&path, map.name(), rogue);
        let before = MapInfo::from_pin(&path).expect("the rogue map");
        net.run(|| {
            let err = match Dataplane::load_pinned(&cfg.dataplane, &pins) {
                Ok(_) => panic!("adopted a {map} of another layout: {rogue}"),
                Err(e) => e,
            };
            assert!(
                matches!(err, DataplaneError::OldVersion { map: name, .. } if name == map.name()),
                "{map}: {err:?}"
            );
            let message = err.to_string();
            let dir = pins.display().to_string();
            let needed = object(map).to_string();
            for part in [
                format!("its {map} is {rogue}"),
                found_part,
                format!("needs {needed}"),
                format!("`lb teardown --pin-dir {dir}`"),
            ] {
                assert!(message.contains(&part), "{part:?} not in: {message}");
            }
        });
        assert_eq!(
            pinned_files(&pins),
            vec![map.name().to_string()],
            "the refusal pinned something"
        );
        let after = MapInfo::from_pin(&path).expect("the rogue map, still pinned");
        assert_eq!(after.id(), before.id(), "{map} was replaced");
        assert_eq!(MapLayout::of(&after), rogue, "{map} was changed");
    }
}

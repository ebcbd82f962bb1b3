//! The lab over IPv6, for the end-to-end tests (v6_e2e.rs, v6_pmtu.rs):
//! the lab's config with its web services on the VIP6 too.

use lb_userspace::{
    config::Forwarding,
    harness::lab::{HTTP_PORT, UDP_PORT, VIP6, WEB_NAMES, lab_config, web_addr6},
};

/// The lab's config plus the same web services on the VIP6: TCP :80 and
/// UDP :5353 over web1..3's IPv6 addresses, round robin, the lab's mode.
pub fn config_v6(mode: Forwarding) -> String {
    let mut toml = lab_config(mode);
    for (name, protocol, port) in [("www6", "tcp", HTTP_PORT), ("www6-udp", "udp", UDP_PORT)] {
        let backends = (1..=WEB_NAMES.len())
            .map(|n| {
                format!(
                    "{{ address = \"[{}]:{port}\", name = \"web{n}\" }}",
                    web_addr6(n)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        toml.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"[{VIP6}]:{port}\"\nprotocol = \"{protocol}\"\n\
             scheduler = \"round-robin\"\nbackends = [ {backends} ]\n"
        ));
    }
    toml
}

//! `proxy-protocol = "v2"` per service: the data plane puts a PROXY
//! protocol v2 header (the client's address and port, the VIP's) at the
//! start of each TCP stream toward the backend (docs/architecture.md,
//! "PROXY protocol v2"; the rules: `lb_common::proxy`).

use serde::{Deserialize, Serialize};

use super::{ConfigError, Forwarding, Protocol, validate::Validator};

/// The PROXY protocol version a service's backends are sent.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, strum::IntoStaticStr, strum::Display,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum ProxyProtocol {
    V2,
}

impl ProxyProtocol {
    /// The service's `ServiceConf::enabled` flag for it.
    pub fn conf_flag(proxy: Option<ProxyProtocol>) -> u32 {
        match proxy {
            Some(ProxyProtocol::V2) => lb_common::SERVICE_PROXY_V2,
            None => 0,
        }
    }
}

impl Validator<'_> {
    /// `proxy-protocol` at `key`: only for TCP services whose replies come
    /// back through the LB (NAT, full NAT). The header lengthens the stream toward
    /// the backend, so every acknowledgement the backend sends must be
    /// shifted back on its way to the client: with DSR or a tunnel the
    /// backend answers the client directly and the LB never sees them.
    pub(super) fn proxy_protocol(
        &self,
        key: &str,
        proxy: Option<ProxyProtocol>,
        forwarding: Forwarding,
        protocol: Protocol,
    ) -> Result<Option<ProxyProtocol>, ConfigError> {
        let Some(proxy) = proxy else {
            return Ok(None);
        };
        if protocol != Protocol::Tcp {
            return Err(self.err(
                key,
                format!(
                    "proxy-protocol = \"{proxy}\" is for TCP services (the header starts a TCP \
                     stream); this service's protocol is \"{protocol}\""
                ),
            ));
        }
        if forwarding.answers_directly() {
            return Err(self.err(
                key,
                format!(
                    "proxy-protocol = \"{proxy}\" needs forwarding = \"nat\" or \"full-nat\": the header makes the \
                     backend's stream longer than the client's, so the LB shifts the sequence \
                     numbers of every packet both ways, and with forwarding = \"{}\" the backend \
                     answers the client directly, past the LB",
                    forwarding.name()
                ),
            ));
        }
        Ok(Some(proxy))
    }
}

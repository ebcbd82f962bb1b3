//! The `netdev` generic netlink family (Documentation/netlink/specs/netdev.yaml),
//! as far as the doctor asks it: a `dev-get` of one interface and the
//! `xdp-features` attribute of the reply. No netlink crate defines it.

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, ErrorContext, Nla, NlaBuffer, NlasIterator, Parseable,
    ParseableParametrized, emit_u32, emit_u64, parse_u32, parse_u64,
};
use netlink_packet_generic::{GenlFamily, GenlHeader};

const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;

/// A `dev-get` request or reply of the `netdev` family.
#[derive(Debug, Clone)]
pub(super) struct NetdevDev {
    cmd: u8,
    pub(super) attrs: Vec<NetdevAttr>,
}

impl NetdevDev {
    pub(super) fn get() -> Self {
        NetdevDev {
            cmd: NETDEV_CMD_DEV_GET,
            attrs: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) enum NetdevAttr {
    Ifindex(u32),
    XdpFeatures(u64),
    Other(DefaultNla),
}

impl Nla for NetdevAttr {
    fn value_len(&self) -> usize {
        match self {
            NetdevAttr::Ifindex(_) => 4,
            NetdevAttr::XdpFeatures(_) => 8,
            NetdevAttr::Other(a) => a.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            NetdevAttr::Ifindex(_) => NETDEV_A_DEV_IFINDEX,
            NetdevAttr::XdpFeatures(_) => NETDEV_A_DEV_XDP_FEATURES,
            NetdevAttr::Other(a) => a.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            // The buffer is value_len() long: the emits cannot fail.
            NetdevAttr::Ifindex(i) => emit_u32(buffer, *i).unwrap_or(()),
            NetdevAttr::XdpFeatures(f) => emit_u64(buffer, *f).unwrap_or(()),
            NetdevAttr::Other(a) => a.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for NetdevAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let value = buf.value();
        Ok(match buf.kind() {
            NETDEV_A_DEV_IFINDEX => {
                NetdevAttr::Ifindex(ErrorContext::context(parse_u32(value), "netdev ifindex")?)
            }
            NETDEV_A_DEV_XDP_FEATURES => NetdevAttr::XdpFeatures(ErrorContext::context(
                parse_u64(value),
                "netdev xdp-features",
            )?),
            _ => NetdevAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

impl GenlFamily for NetdevDev {
    fn family_name() -> &'static str {
        "netdev"
    }

    fn command(&self) -> u8 {
        self.cmd
    }

    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for NetdevDev {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer);
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NetdevDev {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let mut attrs = Vec::new();
        for nla in NlasIterator::new(buf) {
            attrs.push(NetdevAttr::parse(&ErrorContext::context(
                nla,
                "netdev attribute",
            )?)?);
        }
        Ok(NetdevDev {
            cmd: header.cmd,
            attrs,
        })
    }
}

//! The maps' keys and values, laid out exactly as `bpf/socklb.bpf.c` declares them (C layout,
//! network byte order for addresses and ports, IPv4 in the first word).

use std::net::{IpAddr, SocketAddr};

use aya::Pod;

pub(crate) const AF_INET: u8 = 2;
pub(crate) const AF_INET6: u8 = 10;

/// `struct endpoint`: an address and port.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) addr: [u32; 4],
    pub(crate) port: u16,
    pub(crate) family: u8,
    pub(crate) pad: u8,
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        let mut addr = [0u32; 4];
        let family = match a.ip() {
            IpAddr::V4(ip) => {
                addr[0] = u32::from_ne_bytes(ip.octets());
                AF_INET
            }
            IpAddr::V6(ip) => {
                for (word, bytes) in addr.iter_mut().zip(ip.octets().chunks_exact(4)) {
                    *word = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                }
                AF_INET6
            }
        };
        Endpoint {
            addr,
            port: u16::from_ne_bytes(a.port().to_be_bytes()),
            family,
            pad: 0,
        }
    }
}

/// `struct frontend_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrontendKey {
    pub(crate) service: Endpoint,
    pub(crate) protocol: u8,
    pub(crate) pad: [u8; 3],
}

/// `FRONTEND_RANDOM`: pick uniformly at random instead of in turn.
pub(crate) const FRONTEND_RANDOM: u32 = 1;

/// `struct frontend`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Frontend {
    pub(crate) id: u32,
    pub(crate) rev: u32,
    pub(crate) count: u32,
    pub(crate) flags: u32,
    pub(crate) affinity_ns: u64,
    /// Its own key, which the programs check after copying the value.
    pub(crate) key: FrontendKey,
}

/// `struct slot_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotKey {
    pub(crate) rev: u32,
    pub(crate) index: u32,
}

/// `struct slot`: a slot's endpoint and its own key.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot {
    pub(crate) endpoint: Endpoint,
    pub(crate) key: SlotKey,
}

/// `struct member_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct MemberKey {
    pub(crate) rev: u32,
    pub(crate) endpoint: Endpoint,
}

/// `struct cursor`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cursor {
    pub(crate) next: u64,
}

/// `struct stat_key`: a frontend's counters for one endpoint, or (all-zero endpoint) its own.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct StatKey {
    pub(crate) id: u32,
    pub(crate) endpoint: Endpoint,
}

/// `struct stat`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stat {
    pub(crate) connections: u64,
    pub(crate) datagrams: u64,
    pub(crate) refused: u64,
}

// SAFETY: each type is `repr(C)`, `Copy`, made only of integers with every bit pattern valid,
// and has no implicit padding (explicit `pad` fields fill the gaps), so any bytes the kernel
// returns are a valid value and no uninitialised byte is ever handed to it.
unsafe impl Pod for Endpoint {}
// SAFETY: as above.
unsafe impl Pod for FrontendKey {}
// SAFETY: as above.
unsafe impl Pod for Frontend {}
// SAFETY: as above.
unsafe impl Pod for SlotKey {}
// SAFETY: as above.
unsafe impl Pod for Slot {}
// SAFETY: as above.
unsafe impl Pod for MemberKey {}
// SAFETY: as above.
unsafe impl Pod for Cursor {}
// SAFETY: as above.
unsafe impl Pod for StatKey {}
// SAFETY: as above.
unsafe impl Pod for Stat {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_c_declarations() {
        use std::mem::size_of;
        assert_eq!(size_of::<Endpoint>(), 20);
        assert_eq!(size_of::<FrontendKey>(), 24);
        assert_eq!(size_of::<Frontend>(), 48);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<Slot>(), 28);
        assert_eq!(size_of::<MemberKey>(), 24);
        assert_eq!(size_of::<StatKey>(), 24);
        assert_eq!(size_of::<Stat>(), 24);
    }

    #[test]
    fn addresses_and_ports_are_in_network_order() {
        let e = Endpoint::from("198.18.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(e.addr[0].to_ne_bytes(), [198, 18, 0, 1]);
        assert_eq!(e.port.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(e.family, AF_INET);
        let e = Endpoint::from("[2001:db8::1]:53".parse::<SocketAddr>().unwrap());
        assert_eq!(e.addr[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(e.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_eq!(e.family, AF_INET6);
    }
}

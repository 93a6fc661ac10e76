//! IPv4 subnets: parsing, overlap, and the addresses a network hands out.

use std::fmt;
use std::net::Ipv4Addr;

/// The smallest network with room for a gateway and a few guests, and the
/// largest a node hands out.
const MIN_PREFIX: u8 = 16;
const MAX_PREFIX: u8 = 29;

/// An IPv4 network address with its prefix length: `10.80.3.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, String> {
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
            return Err(format!(
                "a network's prefix length must be between /{MIN_PREFIX} and /{MAX_PREFIX}, not /{prefix}"
            ));
        }
        let subnet = Subnet { network, prefix };
        let aligned = Ipv4Addr::from(u32::from(network) & subnet.mask());
        if aligned != network {
            return Err(format!(
                "{network}/{prefix} has host bits set; did you mean {aligned}/{prefix}?"
            ));
        }
        Ok(subnet)
    }

    pub fn network(self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(self) -> u8 {
        self.prefix
    }

    fn mask(self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    fn first(self) -> u32 {
        u32::from(self.network)
    }

    fn last(self) -> u32 {
        self.first() | !self.mask()
    }

    /// The host's own address on the network: the first one.
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from(self.first() + 1)
    }

    pub fn netmask(self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    /// What DHCP hands out: everything after the gateway up to the
    /// broadcast address.
    pub fn dhcp_range(self) -> (Ipv4Addr, Ipv4Addr) {
        (
            Ipv4Addr::from(self.first() + 2),
            Ipv4Addr::from(self.last() - 1),
        )
    }

    pub fn contains(self, address: Ipv4Addr) -> bool {
        (self.first()..=self.last()).contains(&u32::from(address))
    }

    pub fn overlaps(self, other: Subnet) -> bool {
        self.first() <= other.last() && other.first() <= self.last()
    }
}

impl std::str::FromStr for Subnet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let malformed = || format!("{text:?} is not an IPv4 subnet like 10.80.3.0/24");
        let (address, prefix) = text.split_once('/').ok_or_else(malformed)?;
        let network: Ipv4Addr = address.parse().map_err(|_| malformed())?;
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        let prefix: u8 = prefix.parse().map_err(|_| malformed())?;
        Subnet::new(network, prefix)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A route's destination as `ip -j route` prints it: `default`, an address,
/// or an address with a prefix. Default routes cover everything and are
/// not in the way of a new network; `None` for those.
pub fn route_destination(dst: &str) -> Option<(Ipv4Addr, u8)> {
    if dst == "default" {
        return None;
    }
    let (address, prefix) = dst.split_once('/').unwrap_or((dst, "32"));
    Some((
        address.parse().ok()?,
        prefix.parse().ok().filter(|p| *p <= 32)?,
    ))
}

/// Whether `subnet` overlaps a destination of any width (routes can be
/// wider or narrower than the range a network may have).
pub fn overlaps_route(subnet: Subnet, (address, prefix): (Ipv4Addr, u8)) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    let first = u32::from(address) & mask;
    let last = first | !mask;
    subnet.first() <= last && first <= subnet.last()
}

/// The first /24 in 10.80.0.0/16 - 10.95.255.0/24 that overlaps none of
/// `taken`: how a node picks a subnet no one asked for.
pub fn pick(taken: &[(Ipv4Addr, u8)]) -> Option<Subnet> {
    (80u8..96)
        .flat_map(|second| (0..=255u8).map(move |third| Ipv4Addr::new(10, second, third, 0)))
        .filter_map(|network| Subnet::new(network, 24).ok())
        .find(|candidate| !taken.iter().any(|route| overlaps_route(*candidate, *route)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(text: &str) -> Subnet {
        text.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_a_network() {
        let net = subnet("10.80.3.0/24");
        assert_eq!(net.to_string(), "10.80.3.0/24");
        assert_eq!(net.gateway(), Ipv4Addr::new(10, 80, 3, 1));
        assert_eq!(net.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(
            net.dhcp_range(),
            (Ipv4Addr::new(10, 80, 3, 2), Ipv4Addr::new(10, 80, 3, 254))
        );
        assert!(net.contains(Ipv4Addr::new(10, 80, 3, 77)));
        assert!(!net.contains(Ipv4Addr::new(10, 80, 4, 1)));
    }

    #[test]
    fn rejects_malformed_subnets_with_a_hint() {
        for bad in [
            "",
            "10.0.0.0",
            "10.0.0/24",
            "10.0.0.0/",
            "10.0.0.0/x",
            "300.0.0.0/24",
            "10.0.0.0/+8",
            "10.0.0.0/024",
            " 10.0.0.0/24",
        ] {
            let err = bad.parse::<Subnet>().unwrap_err();
            assert!(err.contains("not an IPv4 subnet"), "{bad}: {err}");
        }
        let err = "10.0.0.5/24".parse::<Subnet>().unwrap_err();
        assert!(err.contains("did you mean 10.0.0.0/24"), "{err}");
        assert!("10.0.0.0/8".parse::<Subnet>().unwrap_err().contains("/16"));
        assert!("10.0.0.0/30".parse::<Subnet>().unwrap_err().contains("/29"));
    }

    #[test]
    fn overlap_is_symmetric_and_covers_nesting() {
        let a = subnet("10.80.0.0/16");
        let b = subnet("10.80.7.0/24");
        let c = subnet("10.81.0.0/24");
        assert!(a.overlaps(b) && b.overlaps(a));
        assert!(!a.overlaps(c) && !c.overlaps(a));
        assert!(b.overlaps(b));
    }

    #[test]
    fn reads_route_destinations() {
        assert_eq!(route_destination("default"), None);
        assert_eq!(
            route_destination("192.0.2.0/24"),
            Some((Ipv4Addr::new(192, 0, 2, 0), 24))
        );
        assert_eq!(
            route_destination("192.0.2.9"),
            Some((Ipv4Addr::new(192, 0, 2, 9), 32))
        );
        assert_eq!(route_destination("fe80::/64"), None);
        assert_eq!(route_destination("10.0.0.0/33"), None);
    }

    #[test]
    fn routes_of_any_width_overlap() {
        let net = subnet("10.80.3.0/24");
        assert!(overlaps_route(net, (Ipv4Addr::new(10, 0, 0, 0), 8)));
        assert!(overlaps_route(net, (Ipv4Addr::new(10, 80, 3, 9), 32)));
        assert!(!overlaps_route(net, (Ipv4Addr::new(10, 80, 4, 0), 24)));
        assert!(overlaps_route(net, (Ipv4Addr::new(0, 0, 0, 0), 0)));
    }

    #[test]
    fn picks_the_first_free_slash_24() {
        assert_eq!(pick(&[]), Some(subnet("10.80.0.0/24")));
        let taken = [
            (Ipv4Addr::new(10, 80, 0, 0), 24),
            (Ipv4Addr::new(10, 80, 1, 7), 32),
        ];
        assert_eq!(pick(&taken), Some(subnet("10.80.2.0/24")));
        assert_eq!(pick(&[(Ipv4Addr::new(10, 0, 0, 0), 8)]), None);
    }
}

//! Which conntrack entries belong to Tandem. Pure.

use std::collections::HashSet;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use crate::entry::{Entry, Tuple};

/// A virtual service: flows whose original destination is `vip`, with IP
/// protocol `protocol` and a destination port in `ports` (ports are ignored
/// for protocols without them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Service {
    pub vip: IpAddr,
    pub protocol: u8,
    pub ports: RangeInclusive<u16>,
}

/// Decides which entries Tandem replicates or counts: those whose original
/// destination is one of its services, and never one that involves an
/// excluded address (the cluster link's own addresses: the sync traffic
/// and the peers' control connections must not be replicated, or the
/// backup would hold stale copies of its own link's flows).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    services: Vec<Service>,
    excluded: HashSet<IpAddr>,
}

impl Filter {
    pub fn new(
        services: impl IntoIterator<Item = Service>,
        excluded: impl IntoIterator<Item = IpAddr>,
    ) -> Filter {
        Filter {
            services: services.into_iter().collect(),
            excluded: excluded.into_iter().collect(),
        }
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// Whether an entry belongs to Tandem: its original destination is a
    /// service and none of its four addresses is excluded.
    pub fn matches(&self, entry: &Entry) -> bool {
        self.matches_tuples(&entry.original, Some(&entry.reply))
    }

    /// The same decision when only the original tuple is known (a destroy
    /// message from the peer, say), optionally with the reply tuple.
    pub fn matches_tuples(&self, original: &Tuple, reply: Option<&Tuple>) -> bool {
        let mut addresses = [Some(original.src), Some(original.dst), None, None];
        if let Some(r) = reply {
            addresses[2] = Some(r.src);
            addresses[3] = Some(r.dst);
        }
        if addresses
            .iter()
            .flatten()
            .any(|a| self.excluded.contains(&canonical(*a)))
        {
            return false;
        }
        let dst = canonical(original.dst);
        self.services.iter().any(|s| {
            canonical(s.vip) == dst
                && s.protocol == original.protocol
                && (!original.has_ports() || s.ports.contains(&original.dst_port))
        })
    }
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 address they carry.
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{proto, status};

    fn t(src: &str, sport: u16, dst: &str, dport: u16, protocol: u8) -> Tuple {
        Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol,
            src_port: sport,
            dst_port: dport,
        }
    }

    fn entry(original: Tuple, reply: Tuple) -> Entry {
        Entry {
            original,
            reply,
            status: status::CONFIRMED,
            timeout_s: 100,
            mark: 0,
            zone: 0,
            tcp: None,
        }
    }

    fn filter() -> Filter {
        Filter::new(
            [
                Service {
                    vip: "10.0.0.100".parse().unwrap(),
                    protocol: proto::TCP,
                    ports: 80..=80,
                },
                Service {
                    vip: "10.0.0.100".parse().unwrap(),
                    protocol: proto::UDP,
                    ports: 5000..=5010,
                },
                Service {
                    vip: "fd00::100".parse().unwrap(),
                    protocol: proto::TCP,
                    ports: 443..=443,
                },
            ],
            [
                "192.168.255.1".parse().unwrap(),
                "192.168.255.2".parse().unwrap(),
            ],
        )
    }

    #[test]
    fn a_flow_to_a_service_matches() {
        let o = t("10.0.0.50", 40000, "10.0.0.100", 80, proto::TCP);
        let r = t("10.1.0.11", 8080, "10.1.0.100", 40000, proto::TCP);
        assert!(filter().matches(&entry(o, r)));
        let o6 = t("fd00::50", 40000, "fd00::100", 443, proto::TCP);
        assert!(filter().matches(&entry(o6, o6.inverted())));
    }

    #[test]
    fn port_range_bounds_are_inclusive() {
        let f = filter();
        for (port, ok) in [(4999, false), (5000, true), (5010, true), (5011, false)] {
            let o = t("10.0.0.50", 1, "10.0.0.100", port, proto::UDP);
            assert_eq!(f.matches_tuples(&o, None), ok, "port {port}");
        }
    }

    #[test]
    fn other_vip_protocol_or_port_does_not_match() {
        let f = filter();
        let cases = [
            t("10.0.0.50", 1, "10.0.0.101", 80, proto::TCP),
            t("10.0.0.50", 1, "10.0.0.100", 80, proto::UDP),
            t("10.0.0.50", 1, "10.0.0.100", 81, proto::TCP),
            t("10.0.0.50", 1, "fd00::100", 80, proto::TCP),
            // The reply direction of a flow is not a flow to the VIP.
            t("10.0.0.100", 80, "10.0.0.50", 1, proto::TCP),
        ];
        for o in cases {
            assert!(!f.matches_tuples(&o, None), "{o}");
        }
    }

    #[test]
    fn an_excluded_address_anywhere_excludes_the_entry() {
        let f = filter();
        let o = t("192.168.255.2", 1, "10.0.0.100", 80, proto::TCP);
        assert!(!f.matches_tuples(&o, None));
        // Excluded address only in the reply (e.g. SNAT to the link address).
        let o = t("10.0.0.50", 1, "10.0.0.100", 80, proto::TCP);
        let r = t("10.1.0.11", 8080, "192.168.255.1", 1, proto::TCP);
        assert!(!f.matches(&entry(o, r)));
        assert!(f.matches_tuples(&o, None));
    }

    #[test]
    fn ipv4_mapped_addresses_are_the_ipv4_address() {
        let f = filter();
        let o = t("10.0.0.50", 1, "::ffff:10.0.0.100", 80, proto::TCP);
        assert!(f.matches_tuples(&o, None));
        let o = t("::ffff:192.168.255.1", 1, "10.0.0.100", 80, proto::TCP);
        assert!(!f.matches_tuples(&o, None));
    }

    #[test]
    fn icmp_ignores_ports_and_an_empty_filter_matches_nothing() {
        let f = Filter::new(
            [Service {
                vip: "10.0.0.100".parse().unwrap(),
                protocol: proto::ICMP,
                ports: 0..=0,
            }],
            [],
        );
        let o = t("10.0.0.50", 77, "10.0.0.100", 8 << 8, proto::ICMP);
        assert!(f.matches_tuples(&o, None));
        assert!(!Filter::default().matches_tuples(&o, None));
    }
}

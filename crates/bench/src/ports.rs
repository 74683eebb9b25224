//! The loopback port plan derived from `--base-port`, and the check that a
//! port is free before a cluster is started on it.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use anyhow::{bail, Context};

/// Offset of the etcd client ports from the base port (members 1..=3 use +0..+2).
pub const ETCD_CLIENT_OFFSET: u16 = 0;
/// Offset of the etcd peer ports from the base port.
pub const ETCD_PEER_OFFSET: u16 = 10;
/// Offset of the Meridian API ports from the base port.
pub const MERIDIAN_API_OFFSET: u16 = 20;
/// Offset of the Meridian peer ports from the base port.
pub const MERIDIAN_PEER_OFFSET: u16 = 30;
/// Highest offset used; `base_port + SPAN` must fit in a `u16`.
pub const SPAN: u16 = MERIDIAN_PEER_OFFSET + 2;

/// Every port used by one benchmark, all on 127.0.0.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortPlan {
    /// etcd client URLs, members e1..e3.
    pub etcd_client: [u16; 3],
    /// etcd peer URLs, members e1..e3.
    pub etcd_peer: [u16; 3],
    /// Meridian `api_addr` ports, nodes 1..=3.
    pub meridian_api: [u16; 3],
    /// Meridian `peer_addr` ports, nodes 1..=3.
    pub meridian_peer: [u16; 3],
}

impl PortPlan {
    /// Derives the plan from `base`, failing if the highest port would overflow.
    pub fn new(base: u16) -> anyhow::Result<Self> {
        if base == 0 || base.checked_add(SPAN).is_none() {
            bail!(
                "base port {base} is unusable: the benchmark needs ports {base}..={} on 127.0.0.1",
                u32::from(base) + u32::from(SPAN)
            );
        }
        let three = |off: u16| [base + off, base + off + 1, base + off + 2];
        Ok(Self {
            etcd_client: three(ETCD_CLIENT_OFFSET),
            etcd_peer: three(ETCD_PEER_OFFSET),
            meridian_api: three(MERIDIAN_API_OFFSET),
            meridian_peer: three(MERIDIAN_PEER_OFFSET),
        })
    }

    /// The ports the etcd cluster needs, each with a label for error messages.
    pub fn etcd_ports(&self) -> Vec<(String, u16)> {
        let mut v = Vec::with_capacity(6);
        for i in 0..3 {
            v.push((format!("etcd e{} client", i + 1), self.etcd_client[i]));
            v.push((format!("etcd e{} peer", i + 1), self.etcd_peer[i]));
        }
        v
    }

    /// The ports the Meridian region needs, each with a label for error messages.
    pub fn meridian_ports(&self) -> Vec<(String, u16)> {
        let mut v = Vec::with_capacity(6);
        for i in 0..3 {
            v.push((format!("meridian node {} api", i + 1), self.meridian_api[i]));
            v.push((format!("meridian node {} peer", i + 1), self.meridian_peer[i]));
        }
        v
    }
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Checks that each port can be bound on 127.0.0.1 right now (bind and drop).
pub fn ensure_free(ports: &[(String, u16)]) -> anyhow::Result<()> {
    for (label, port) in ports {
        TcpListener::bind(loopback(*port)).map(drop).with_context(|| {
            format!(
                "port {port} on 127.0.0.1 (needed for {label}) is not free; \
                     pick another --base-port or stop whatever is using it"
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_offsets() {
        let p = PortPlan::new(24000).unwrap();
        assert_eq!(p.etcd_client, [24000, 24001, 24002]);
        assert_eq!(p.etcd_peer, [24010, 24011, 24012]);
        assert_eq!(p.meridian_api, [24020, 24021, 24022]);
        assert_eq!(p.meridian_peer, [24030, 24031, 24032]);
    }

    #[test]
    fn plan_ports_are_distinct() {
        let p = PortPlan::new(1000).unwrap();
        let mut all: Vec<u16> = p.etcd_ports().into_iter().chain(p.meridian_ports()).map(|(_, port)| port).collect();
        assert_eq!(all.len(), 12);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 12);
    }

    #[test]
    fn plan_rejects_overflow_and_zero() {
        assert!(PortPlan::new(u16::MAX - SPAN).is_ok());
        assert!(PortPlan::new(u16::MAX - SPAN + 1).is_err());
        assert!(PortPlan::new(0).is_err());
    }

    #[test]
    fn busy_port_is_reported() {
        let held = TcpListener::bind(loopback(0)).unwrap();
        let port = held.local_addr().unwrap().port();
        let err = ensure_free(&[("thing".to_string(), port)]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&port.to_string()) && msg.contains("thing"), "{msg}");
        drop(held);
    }
}

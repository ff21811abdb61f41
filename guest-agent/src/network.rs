//! `ConfigureNetwork`: the guest side of pod networking. Each interface of
//! the request is found by its MAC (the VMM gave the virtio-net device the
//! pod interface's MAC), renamed to the pod's name, given its MTU,
//! brought up and given its addresses; then the routes are added, on-link
//! ones first. Plain synchronous route netlink (netlink-sys and
//! netlink-packet-route): no async runtime in the static agent.
//!
//! The DNS settings and addresses are remembered: containers that share
//! the guest's network namespace and whose spec mounts no
//! `/etc/resolv.conf` or `/etc/hosts` get files made from them
//! ([`etc_files`]).

use std::net::IpAddr;
use std::sync::Mutex;

use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use protocol::agent::NetworkConfig;

/// Errors configuring the guest network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed.
    #[error("invalid network config: {0}")]
    Invalid(String),
    /// No guest interface has the MAC.
    #[error("no guest interface has MAC {0}")]
    NoInterface(String),
    /// A netlink socket call failed.
    #[error("netlink: {0}")]
    Io(#[from] std::io::Error),
    /// The kernel refused a request.
    #[error("{what}: {source}")]
    Refused {
        /// The request.
        what: String,
        /// The kernel's answer.
        source: std::io::Error,
    },
}

/// What containers' /etc files are made from once the network is set up.
#[derive(Debug, Clone, Default)]
struct Applied {
    servers: Vec<String>,
    search: Vec<String>,
    options: Vec<String>,
    /// The first address of the first interface (for /etc/hosts).
    address: Option<IpAddr>,
}

static APPLIED: Mutex<Option<Applied>> = Mutex::new(None);

/// A synchronous route netlink socket.
struct Nl {
    sock: Socket,
    seq: u32,
}

impl Nl {
    fn new() -> Result<Nl, Error> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Nl { sock, seq: 0 })
    }

    /// Sends `msg` and collects the answers until the dump ends or the
    /// request is acknowledged.
    fn call(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, Error> {
        self.seq += 1;
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | flags;
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full()?;
            let mut off = 0;
            while off < data.len() {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])
                    .map_err(|e| Error::Invalid(format!("netlink answer: {e}")))?;
                let len = m.header.length as usize;
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(Error::Refused {
                                what: what.to_string(),
                                source: std::io::Error::from_raw_os_error(-code.get()),
                            }),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => {
                        out.push(inner);
                        if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, msg: RouteNetlinkMessage, flags: u16, what: &str) -> Result<(), Error> {
        self.call(msg, NLM_F_ACK | flags, what).map(drop)
    }

    /// (index, name, MAC) of every link.
    fn links(&mut self) -> Result<Vec<(u32, String, Vec<u8>)>, Error> {
        let msgs = self.call(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
            "list links",
        )?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => {
                    let mut name = String::new();
                    let mut mac = Vec::new();
                    for a in l.attributes {
                        match a {
                            LinkAttribute::IfName(n) => name = n,
                            LinkAttribute::Address(a) => mac = a,
                            _ => {}
                        }
                    }
                    Some((l.header.index, name, mac))
                }
                _ => None,
            })
            .collect())
    }

    /// Changes a link: `attrs`, and up if `up`.
    fn set_link(&mut self, index: u32, attrs: Vec<LinkAttribute>, up: bool) -> Result<(), Error> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if up {
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
        }
        m.attributes = attrs;
        self.ack(
            RouteNetlinkMessage::SetLink(m),
            0,
            &format!("set link {index}"),
        )
    }
}

/// `aa:bb:cc:dd:ee:ff`.
fn parse_mac(s: &str) -> Result<Vec<u8>, Error> {
    let bad = || Error::Invalid(format!("bad MAC {s:?}"));
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if bytes.len() != 6 {
        return Err(bad());
    }
    Ok(bytes)
}

/// `ADDR/PREFIX`.
fn parse_net(s: &str) -> Result<(IpAddr, u8), Error> {
    let bad = || Error::Invalid(format!("bad address {s:?} (ADDRESS/PREFIX)"));
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    if prefix > if addr.is_ipv4() { 32 } else { 128 } {
        return Err(bad());
    }
    Ok((addr, prefix))
}

fn family(ip: &IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// Sets up the guest's network as `cfg` says (see the module doc).
pub fn configure(cfg: &NetworkConfig) -> Result<(), Error> {
    if let Err(e) = crate::init::loopback_up() {
        log::warn!("loopback up: {e}");
    }
    let mut nl = Nl::new()?;
    let links = nl.links()?;
    let mut found = Vec::new();
    for i in &cfg.interfaces {
        let mac = parse_mac(&i.mac)?;
        let (index, name, _) = links
            .iter()
            .find(|(_, _, m)| *m == mac)
            .ok_or_else(|| Error::NoInterface(i.mac.clone()))?;
        found.push((*index, name.clone()));
    }
    // Renames in two steps, so that names may swap places.
    let renames: Vec<usize> = (0..found.len())
        .filter(|&n| !cfg.interfaces[n].name.is_empty() && cfg.interfaces[n].name != found[n].1)
        .collect();
    for &n in &renames {
        let tmp = format!("sbxtmp{n}");
        nl.set_link(found[n].0, vec![LinkAttribute::IfName(tmp)], false)?;
    }
    for &n in &renames {
        let name = cfg.interfaces[n].name.clone();
        nl.set_link(found[n].0, vec![LinkAttribute::IfName(name)], false)?;
    }
    let mut applied = Applied {
        servers: cfg.dns_servers.clone(),
        search: cfg.dns_search.clone(),
        options: cfg.dns_options.clone(),
        address: None,
    };
    for (i, (index, _)) in cfg.interfaces.iter().zip(&found) {
        let mut attrs = Vec::new();
        if i.mtu > 0 {
            attrs.push(LinkAttribute::Mtu(i.mtu));
        }
        nl.set_link(*index, attrs, true)?;
        for a in &i.addresses {
            let (ip, prefix) = parse_net(a)?;
            applied.address.get_or_insert(ip);
            add_address(&mut nl, *index, ip, prefix)?;
        }
        log::info!(
            "network: {} ({}) up, MTU {}, {}",
            if i.name.is_empty() { "?" } else { &i.name },
            i.mac,
            i.mtu,
            i.addresses.join(" ")
        );
    }
    // Names as they are now.
    let links = nl.links()?;
    for r in &cfg.routes {
        let index = links
            .iter()
            .find(|(_, name, _)| *name == r.device)
            .map(|(i, _, _)| *i)
            .ok_or_else(|| Error::Invalid(format!("route {}: no device {:?}", r.dest, r.device)))?;
        add_route(&mut nl, index, r)?;
    }
    *APPLIED.lock().unwrap_or_else(|e| e.into_inner()) = Some(applied);
    Ok(())
}

fn add_address(nl: &mut Nl, index: u32, ip: IpAddr, prefix: u8) -> Result<(), Error> {
    let mut m = AddressMessage::default();
    m.header.family = family(&ip);
    m.header.prefix_len = prefix;
    m.header.index = index;
    m.attributes.push(AddressAttribute::Address(ip));
    if ip.is_ipv4() {
        m.attributes.push(AddressAttribute::Local(ip));
    } else {
        // The pod's address, already checked on the pod's link: no DAD
        // wait before it can be used.
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    nl.ack(
        RouteNetlinkMessage::NewAddress(m),
        NLM_F_CREATE | NLM_F_REPLACE,
        &format!("add address {ip}/{prefix}"),
    )
}

fn add_route(nl: &mut Nl, index: u32, r: &protocol::agent::NetworkRoute) -> Result<(), Error> {
    let gateway: Option<IpAddr> = match r.gateway.as_str() {
        "" => None,
        g => Some(
            g.parse()
                .map_err(|_| Error::Invalid(format!("bad gateway {g:?}")))?,
        ),
    };
    let dest = match r.dest.as_str() {
        "default" | "default6" => None,
        d => Some(parse_net(d)?),
    };
    let v6 = match (dest, gateway) {
        (Some((ip, _)), _) | (None, Some(ip)) => ip.is_ipv6(),
        (None, None) => r.dest == "default6",
    };
    let mut m = RouteMessage::default();
    m.header.address_family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Boot;
    m.header.kind = RouteType::Unicast;
    m.header.scope = if gateway.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    if let Some((ip, prefix)) = dest {
        m.header.destination_prefix_length = prefix;
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(ip)));
    }
    if let Some(g) = gateway {
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(g)));
    }
    m.attributes.push(RouteAttribute::Oif(index));
    if !r.source.is_empty() {
        let s: IpAddr = r
            .source
            .parse()
            .map_err(|_| Error::Invalid(format!("bad source {:?}", r.source)))?;
        m.attributes
            .push(RouteAttribute::PrefSource(RouteAddress::from(s)));
    }
    if r.metric > 0 {
        m.attributes.push(RouteAttribute::Priority(r.metric));
    }
    nl.ack(
        RouteNetlinkMessage::NewRoute(m),
        NLM_F_CREATE | NLM_F_REPLACE,
        &format!("add route {} via {:?} dev {}", r.dest, r.gateway, r.device),
    )
}

/// The files a container sharing the guest's network namespace gets when
/// its spec mounts none there: (path in the rootfs, content). Empty until
/// the network was configured; no resolv.conf without DNS settings.
pub fn etc_files(hostname: Option<&str>) -> Vec<(&'static str, String)> {
    let applied = APPLIED.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(a) = applied else {
        return Vec::new();
    };
    let mut files = Vec::new();
    if !a.servers.is_empty() || !a.search.is_empty() {
        let mut text = String::new();
        for s in &a.servers {
            text.push_str(&format!("nameserver {s}\n"));
        }
        if !a.search.is_empty() {
            text.push_str(&format!("search {}\n", a.search.join(" ")));
        }
        if !a.options.is_empty() {
            text.push_str(&format!("options {}\n", a.options.join(" ")));
        }
        files.push(("etc/resolv.conf", text));
    }
    let mut hosts =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let (Some(ip), Some(h)) = (a.address, hostname) {
        hosts.push_str(&format!("{ip}\t{h}\n"));
    }
    files.push(("etc/hosts", hosts));
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_addresses_parse() {
        assert_eq!(
            parse_mac("02:ab:00:00:00:ff").unwrap(),
            [2, 0xab, 0, 0, 0, 0xff]
        );
        assert!(parse_mac("02:ab:00:00:00").is_err());
        assert!(parse_mac("zz:ab:00:00:00:00").is_err());
        assert_eq!(
            parse_net("fd00::2/64").unwrap(),
            ("fd00::2".parse().unwrap(), 64)
        );
        assert!(parse_net("10.0.0.1/33").is_err());
        assert!(parse_net("10.0.0.1").is_err());
    }

    #[test]
    fn etc_files_come_from_the_applied_config() {
        *APPLIED.lock().unwrap() = Some(Applied {
            servers: vec!["10.96.0.10".into()],
            search: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
            address: Some("10.88.0.2".parse().unwrap()),
        });
        let files = etc_files(Some("pod1"));
        assert_eq!(files[0].0, "etc/resolv.conf");
        assert_eq!(
            files[0].1,
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local\noptions ndots:5\n"
        );
        assert_eq!(files[1].0, "etc/hosts");
        assert!(files[1].1.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(files[1].1.ends_with("10.88.0.2\tpod1\n"));
        *APPLIED.lock().unwrap() = None;
        assert!(etc_files(Some("pod1")).is_empty());
    }
}

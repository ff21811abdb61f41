//! Netlink work inside a network namespace: a dedicated thread enters the
//! namespace (`setns`), and [`Nl`] gives it synchronous calls on an
//! `rtnetlink` connection driven by a small current-thread tokio runtime.
//! Links, addresses and routes are read; links set, removed; ingress
//! qdiscs and u32 match-all filters with a mirred egress redirect added
//! and removed.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use futures_util::stream::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressScope};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::{Error, IpNet, Route};

/// The priority of our mirred filters on an ingress qdisc: ours alone, so
/// that teardown removes exactly them and nothing a CNI plugin added.
pub const FILTER_PRIO: u16 = 0x5b0;
/// `ETH_P_ALL` in network byte order, as tc filters carry protocols.
const PROTO_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();

/// A link as netlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Hardware address (empty if none).
    pub mac: Vec<u8>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Loopback.
    pub loopback: bool,
    /// An Ethernet link (ARPHRD_ETHER).
    pub ether: bool,
    /// The link kind (`veth`, `tun`, ...), if it has one.
    pub kind: Option<String>,
}

/// An address of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    /// The link's index.
    pub index: u32,
    /// Address and prefix length.
    pub net: IpNet,
    /// Link-local or host scope (not carried into the guest).
    pub local_scope: bool,
}

/// Runs `f` in a new thread that has entered the network namespace at
/// `netns`, with a netlink connection opened there.
pub fn in_netns<T, F>(netns: &Path, f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce(&mut Nl) -> Result<T, Error> + Send + 'static,
{
    let path = netns.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("sbx-netns".into())
        .spawn(move || {
            enter(&path)?;
            let mut nl = Nl::new()?;
            f(&mut nl)
        })
        .map_err(|e| Error::Thread(e.to_string()))?;
    thread
        .join()
        .map_err(|_| Error::Thread("the netlink thread panicked".into()))?
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &Path) -> Result<(), Error> {
    let err = |source| Error::Netns {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| err(std::io::Error::from(e)))
}

/// The errno of a netlink error answer, if it is one.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |e| Error::Netlink {
        what,
        errno: errno(&e),
        reason: match &e {
            rtnetlink::Error::NetlinkError(m) => m
                .code
                .map(|c| std::io::Error::from_raw_os_error(-c.get()).to_string())
                .unwrap_or_else(|| e.to_string()),
            _ => e.to_string(),
        },
    }
}

/// A netlink connection in the current thread's network namespace.
pub struct Nl {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl Nl {
    /// Opens a route netlink socket (in this thread's namespace).
    pub fn new() -> Result<Nl, Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| Error::Thread(format!("tokio runtime: {e}")))?;
        let (conn, handle, _) = rt
            .block_on(async { rtnetlink::new_connection() })
            .map_err(|e| Error::Thread(format!("netlink socket: {e}")))?;
        rt.spawn(conn);
        Ok(Nl { rt, handle })
    }

    /// Every link.
    pub fn links(&mut self) -> Result<Vec<Link>, Error> {
        let h = self.handle.clone();
        let msgs: Vec<LinkMessage> = self
            .rt
            .block_on(async move { h.link().get().execute().try_collect().await })
            .map_err(nl_err("list links"))?;
        Ok(msgs.iter().map(link_of).collect())
    }

    /// The link called `name`, if there is one.
    pub fn link(&mut self, name: &str) -> Result<Option<Link>, Error> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    /// Every address of every link.
    pub fn addresses(&mut self) -> Result<Vec<Addr>, Error> {
        let h = self.handle.clone();
        let msgs: Vec<_> = self
            .rt
            .block_on(async move { h.address().get().execute().try_collect().await })
            .map_err(nl_err("list addresses"))?;
        let mut out = Vec::new();
        for m in msgs {
            let mut local = None;
            let mut address = None;
            for a in &m.attributes {
                match a {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    _ => {}
                }
            }
            // IPv4 point-to-point addresses have the peer in IFA_ADDRESS.
            let Some(addr) = local.or(address) else {
                continue;
            };
            out.push(Addr {
                index: m.header.index,
                net: IpNet {
                    addr,
                    prefix: m.header.prefix_len,
                },
                local_scope: !matches!(m.header.scope, AddressScope::Universe),
            });
        }
        Ok(out)
    }

    /// The routes of the main table that the guest needs (not the ones
    /// the kernel makes for addresses, nor router advertisements'), with
    /// device names from `links`.
    pub fn routes(&mut self, links: &[Link]) -> Result<Vec<Route>, Error> {
        let h = self.handle.clone();
        let msgs: Vec<RouteMessage> = self
            .rt
            .block_on(async move {
                let mut v: Vec<RouteMessage> = h
                    .route()
                    .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                    .execute()
                    .try_collect()
                    .await?;
                let v6: Vec<RouteMessage> = h
                    .route()
                    .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
                    .execute()
                    .try_collect()
                    .await?;
                v.extend(v6);
                Ok(v)
            })
            .map_err(nl_err("list routes"))?;
        Ok(msgs.iter().filter_map(|m| route_of(m, links)).collect())
    }

    /// Sets a link's MTU and brings it up.
    pub fn set_up(&mut self, index: u32, mtu: u32) -> Result<(), Error> {
        let h = self.handle.clone();
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        self.rt
            .block_on(async move { h.link().set(msg).execute().await })
            .map_err(nl_err(format!("set link {index} up with MTU {mtu}")))
    }

    /// Keeps the kernel from giving a link IPv6 addresses of its own (a
    /// tap's link-local address would chatter MLD and router solicitations
    /// at the guest). Set before the link goes up.
    pub fn no_ipv6_addresses(&mut self, index: u32) -> Result<(), Error> {
        use netlink_packet_route::link::{AfSpecInet6, AfSpecUnspec, In6AddrGenMode};
        let h = self.handle.clone();
        let msg = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]))
            .build();
        self.rt
            .block_on(async move { h.link().set(msg).execute().await })
            .map_err(nl_err(format!("link {index}: IPv6 address generation off")))
    }

    /// Removes a link.
    pub fn del_link(&mut self, index: u32) -> Result<(), Error> {
        let h = self.handle.clone();
        self.rt
            .block_on(async move { h.link().del(index).execute().await })
            .map_err(nl_err(format!("delete link {index}")))
    }

    /// The indexes of the links that have an ingress qdisc.
    pub fn ingress_qdiscs(&mut self) -> Result<Vec<u32>, Error> {
        let h = self.handle.clone();
        let msgs: Vec<TcMessage> = self
            .rt
            .block_on(async move { h.clone().qdisc().get().execute().try_collect().await })
            .map_err(nl_err("list qdiscs"))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.parent == TcHandle::INGRESS)
            .map(|m| m.header.index as u32)
            .collect())
    }

    /// Adds an ingress qdisc to a link.
    pub fn add_ingress_qdisc(&mut self, index: u32) -> Result<(), Error> {
        let h = self.handle.clone();
        self.rt
            .block_on(async move {
                h.clone()
                    .qdisc()
                    .add(index as i32)
                    .ingress()
                    .execute()
                    .await
            })
            .map_err(nl_err(format!("add an ingress qdisc to link {index}")))
    }

    /// Removes a link's ingress qdisc (and its filters).
    pub fn del_ingress_qdisc(&mut self, index: u32) -> Result<(), Error> {
        let mut msg = TcMessage::with_index(index as i32);
        msg.header.parent = TcHandle::INGRESS;
        msg.header.handle = TcHandle::from(0xffff_0000);
        msg.attributes.push(TcAttribute::Kind("ingress".into()));
        self.request(
            RouteNetlinkMessage::DelQueueDiscipline(msg),
            format!("delete the ingress qdisc of link {index}"),
        )
    }

    /// Redirects everything arriving on `from` to the egress of `to`: a
    /// u32 match-all filter on `from`'s ingress qdisc with a mirred
    /// egress redirect, at [`FILTER_PRIO`].
    pub fn add_redirect(&mut self, from: u32, to: u32) -> Result<(), Error> {
        let h = self.handle.clone();
        let req = h
            .traffic_filter(from as i32)
            .add()
            .ingress()
            .priority(FILTER_PRIO)
            .protocol(PROTO_ALL)
            .redirect(to)
            .map_err(nl_err("build a redirect filter"))?;
        self.rt
            .block_on(req.execute())
            .map_err(nl_err(format!("redirect link {from} to link {to}")))
    }

    /// Removes the filters at [`FILTER_PRIO`] from a link's ingress qdisc.
    pub fn del_redirect(&mut self, from: u32) -> Result<(), Error> {
        let mut msg = TcMessage::with_index(from as i32);
        msg.header.parent = TcHandle {
            major: 0xffff,
            minor: TcHandle::MIN_INGRESS,
        };
        msg.header.info = (u32::from(FILTER_PRIO) << 16) | u32::from(PROTO_ALL);
        msg.attributes.push(TcAttribute::Kind("u32".into()));
        self.request(
            RouteNetlinkMessage::DelTrafficFilter(msg),
            format!("delete the redirect filter of link {from}"),
        )
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, msg: RouteNetlinkMessage, what: String) -> Result<(), Error> {
        let mut h = self.handle.clone();
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        self.rt
            .block_on(async move {
                let mut answers = h.request(req)?;
                while let Some(m) = futures_util::StreamExt::next(&mut answers).await {
                    if let NetlinkPayload::Error(e) = m.payload {
                        if e.code.is_some() {
                            return Err(rtnetlink::Error::NetlinkError(e));
                        }
                    }
                }
                Ok(())
            })
            .map_err(nl_err(what))
    }
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
        up: m
            .header
            .flags
            .contains(netlink_packet_route::link::LinkFlags::Up),
        loopback: m
            .header
            .flags
            .contains(netlink_packet_route::link::LinkFlags::Loopback),
        ether: m.header.link_layer_type == LinkLayerType::Ether,
        kind: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(mac) => l.mac = mac.clone(),
            LinkAttribute::Mtu(mtu) => l.mtu = *mtu,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(match k {
                            InfoKind::Tun => "tun".into(),
                            InfoKind::Veth => "veth".into(),
                            other => other.to_string(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    l
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The route the guest needs from a dumped one, or None if it is not one
/// (other tables, kernel-made, multicast, link-local, no single device).
pub fn route_of(m: &RouteMessage, links: &[Link]) -> Option<Route> {
    let h = &m.header;
    let mut table = u32::from(h.table);
    let mut dest = None;
    let mut gateway = None;
    let mut oif = None;
    let mut source = None;
    let mut metric = 0;
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => dest = ip_of(d),
            RouteAttribute::Gateway(g) => gateway = ip_of(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::PrefSource(s) => source = ip_of(s),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || h.kind != RouteType::Unicast
        || matches!(h.protocol, RouteProtocol::Kernel | RouteProtocol::Ra)
    {
        return None;
    }
    let device = links.iter().find(|l| Some(l.index) == oif)?.name.clone();
    let dest = match (dest, h.destination_prefix_length) {
        (_, 0) => None,
        (Some(addr), prefix) => Some(IpNet { addr, prefix }),
        (None, _) => return None,
    };
    if let Some(IpNet {
        addr: IpAddr::V6(v6),
        ..
    }) = dest
    {
        // Multicast and link-local routes: the guest kernel makes its own.
        if v6.is_multicast() || (v6.segments()[0] & 0xffc0) == 0xfe80 {
            return None;
        }
    }
    let family_ok = matches!(
        (h.address_family, dest.map(|d| d.addr).or(gateway)),
        (AddressFamily::Inet, Some(IpAddr::V4(_)) | None)
            | (AddressFamily::Inet6, Some(IpAddr::V6(_)) | None)
    );
    if !family_ok {
        return None;
    }
    Some(Route {
        dest,
        ipv6: h.address_family == AddressFamily::Inet6,
        gateway,
        device,
        source,
        metric,
    })
}

//! What capture changes in the node's network stack, through rtnetlink (no `ip` process): the
//! dummy interface, the service addresses on it (or on the loopback interface), and the policy
//! routing of marked packets (a rule `fwmark MARK lookup TABLE` and a route `local` to every
//! address in that table, per family).
//!
//! [`Netlink`] is synchronous: it runs each request to completion on a private single-thread
//! runtime. Errors carry the kernel's errno (`io::Error::raw_os_error`), so callers can tell an
//! address that is already there (`EEXIST`) from a real failure.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkDummy, LinkUnspec, RouteMessageBuilder};
use rustix::io::Errno;

/// A route netlink connection.
pub struct Netlink {
    runtime: tokio::runtime::Runtime,
    handle: Handle,
}

fn io_error(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(message) => message.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

/// The error of `what`, saying what it was.
fn doing(what: &str) -> impl Fn(rtnetlink::Error) -> io::Error + '_ {
    move |e| io::Error::other(format!("{what}: {}", io_error(e)))
}

/// What deleting something that is not there says.
fn is_absent(e: &io::Error) -> bool {
    const ABSENT: [Errno; 4] = [Errno::NOENT, Errno::NODEV, Errno::SRCH, Errno::ADDRNOTAVAIL];
    e.raw_os_error()
        .is_some_and(|code| ABSENT.iter().any(|a| a.raw_os_error() == code))
}

impl Netlink {
    /// Opens the connection.
    pub fn new() -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let (connection, handle, _) = runtime.block_on(async { rtnetlink::new_connection() })?;
        runtime.spawn(connection);
        Ok(Self { runtime, handle })
    }

    /// The index of interface `name`, if there is one.
    pub fn link_index(&self, name: &str) -> io::Result<Option<u32>> {
        let found = self.runtime.block_on(async {
            let mut links = self
                .handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute();
            links.try_next().await
        });
        match found.map_err(io_error) {
            Ok(link) => Ok(link.map(|l| l.header.index)),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates dummy interface `name`, up; its index.
    pub fn add_dummy(&self, name: &str) -> io::Result<u32> {
        self.runtime
            .block_on(
                self.handle
                    .link()
                    .add(LinkDummy::new(name).up().build())
                    .execute(),
            )
            .map_err(doing(&format!("ip link add {name} type dummy")))?;
        let index = self.link_index(name)?;
        let index = index.ok_or_else(|| io::Error::other(format!("{name} vanished")))?;
        self.runtime
            .block_on(
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).up().build())
                    .execute(),
            )
            .map_err(io_error)?;
        Ok(index)
    }

    /// Deletes interface `name`, if there is one.
    pub fn delete_link(&self, name: &str) -> io::Result<()> {
        let Some(index) = self.link_index(name)? else {
            return Ok(());
        };
        let deleted = self
            .runtime
            .block_on(self.handle.link().del(index).execute())
            .map_err(io_error);
        deleted.or_else(|e| if is_absent(&e) { Ok(()) } else { Err(e) })
    }

    /// Adds (`true`) or removes (`false`) each host address of `changes` on interface
    /// `index`, IPv4 ones added with `label` when given; the errors, by index into `changes`.
    /// Adding an address that is there, or removing one that is not, is not an error.
    pub fn change_addresses(
        &self,
        index: u32,
        changes: &[(IpAddr, bool)],
        label: Option<&str>,
    ) -> Vec<(usize, io::Error)> {
        let change = |i: usize, ip: IpAddr, add: bool| {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            let address = self.handle.address();
            async move {
                let result = if add {
                    let mut request = address.add(index, ip, prefix).replace();
                    if let (Some(label), true) = (label, ip.is_ipv4()) {
                        let attributes = &mut request.message_mut().attributes;
                        attributes.push(AddressAttribute::Label(label.to_string()));
                    }
                    request.execute().await.map_err(io_error)
                } else {
                    let mut message = AddressMessage::default();
                    message.header.family = match ip {
                        IpAddr::V4(_) => AddressFamily::Inet,
                        IpAddr::V6(_) => AddressFamily::Inet6,
                    };
                    message.header.index = index;
                    message.header.prefix_len = prefix;
                    message.attributes.push(AddressAttribute::Local(ip));
                    let deleted = address.del(message).execute().await.map_err(io_error);
                    deleted.or_else(|e| if is_absent(&e) { Ok(()) } else { Err(e) })
                };
                result.err().map(|e| (i, e))
            }
        };
        // One at a time: the kernel's work per address dominates (sending 64 at once was no
        // faster for 10,000).
        self.runtime.block_on(async {
            let mut failed = Vec::new();
            for (i, &(ip, add)) in changes.iter().enumerate() {
                failed.extend(change(i, ip, add).await);
            }
            failed
        })
    }

    /// Removes every IPv4 address of interface `index` labelled `label` (what a crashed run
    /// left).
    pub fn flush_label(&self, index: u32, label: &str) -> io::Result<()> {
        self.runtime.block_on(async {
            let mut addresses = self
                .handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute();
            let mut labelled = Vec::new();
            while let Some(message) = addresses.try_next().await.map_err(io_error)? {
                let has_label = message
                    .attributes
                    .iter()
                    .any(|a| matches!(a, AddressAttribute::Label(l) if l == label));
                if has_label {
                    labelled.push(message);
                }
            }
            for message in labelled {
                self.handle
                    .address()
                    .del(message)
                    .execute()
                    .await
                    .map_err(io_error)?;
            }
            Ok(())
        })
    }

    /// Installs the policy routing of packets marked `mark` for both families: the rule
    /// `fwmark mark lookup table` (replacing a leftover one) and a `local` route to every
    /// address through interface `lo_index` in `table`.
    pub fn add_mark_routing(&self, mark: u32, table: u32, lo_index: u32) -> io::Result<()> {
        self.delete_mark_routing(mark, table)?;
        self.runtime.block_on(async {
            let rule = self.handle.rule();
            let what = format!("ip rule add fwmark {mark:#x} lookup {table}");
            let add = rule.add().fw_mark(mark).table_id(table);
            let add = add.action(RuleAction::ToTable);
            let added = add.clone().v4().execute().await;
            added.map_err(doing(&what))?;
            let added = add.v6().execute().await;
            added.map_err(doing(&format!("IPv6 {what}")))?;
            let everything_v4 = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .table_id(table)
                .output_interface(lo_index)
                .build();
            let everything_v6 = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .table_id(table)
                .output_interface(lo_index)
                .build();
            let what = format!("ip route replace local default dev lo table {table}");
            for route in [everything_v4, everything_v6] {
                let added = self.handle.route().add(route).replace().execute().await;
                added.map_err(doing(&what))?;
            }
            Ok(())
        })
    }

    /// Removes what [`Netlink::add_mark_routing`] installs: every rule for `mark` looking up
    /// `table`, and every route of `table`, in both families.
    pub fn delete_mark_routing(&self, mark: u32, table: u32) -> io::Result<()> {
        self.runtime.block_on(async {
            for version in [IpVersion::V4, IpVersion::V6] {
                let rules: Vec<RuleMessage> = self
                    .handle
                    .rule()
                    .get(version.clone())
                    .execute()
                    .try_collect()
                    .await
                    .map_err(io_error)?;
                let ours = rules.into_iter().filter(|r| {
                    r.attributes.contains(&RuleAttribute::FwMark(mark))
                        && r.attributes.contains(&RuleAttribute::Table(table))
                });
                for rule in ours {
                    let deleted = self.handle.rule().del(rule).execute().await;
                    deleted.map_err(io_error)?;
                }
                let query = match version {
                    IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
                    IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
                };
                let routes: Vec<RouteMessage> = self
                    .handle
                    .route()
                    .get(query)
                    .execute()
                    .try_collect()
                    .await
                    .map_err(io_error)?;
                let ours = routes
                    .into_iter()
                    .filter(|r| r.attributes.contains(&RouteAttribute::Table(table)));
                for route in ours {
                    let deleted = self.handle.route().del(route).execute().await;
                    deleted.map_err(io_error)?;
                }
            }
            Ok(())
        })
    }
}

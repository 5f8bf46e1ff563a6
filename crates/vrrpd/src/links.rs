//! Tracked interfaces, watched through rtnetlink link events: an interface
//! counts as up when it is administratively up and has carrier.

use std::collections::BTreeMap;
use std::io;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::MulticastGroup;
use tokio::sync::watch;

/// Each tracked interface and whether it is up.
pub type LinkStates = BTreeMap<String, bool>;

/// The names of the tracked interfaces that are down.
pub fn down(states: &LinkStates) -> Vec<&str> {
    states
        .iter()
        .filter(|(_, up)| !**up)
        .map(|(n, _)| n.as_str())
        .collect()
}

fn name_and_up(msg: &LinkMessage) -> Option<(String, bool)> {
    let name = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    let flags = msg.header.flags;
    Some((
        name,
        flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp),
    ))
}

/// Starts watching `names`; the returned receiver holds the current states
/// (read once at start, then updated on every link event).
pub async fn watch_links(names: Vec<String>) -> io::Result<watch::Receiver<LinkStates>> {
    let (conn, handle, mut events) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
    tokio::spawn(conn);
    let mut states: LinkStates = names.iter().map(|n| (n.clone(), false)).collect();
    for name in &names {
        let mut dump = handle.link().get().match_name(name.clone()).execute();
        // A missing interface is down; it may appear later.
        if let Ok(Some(msg)) = dump.try_next().await
            && let Some((_, up)) = name_and_up(&msg)
        {
            states.insert(name.clone(), up);
        }
    }
    let (tx, rx) = watch::channel(states);
    tokio::spawn(async move {
        while let Some((msg, _)) = events.next().await {
            let (name, up) = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    match name_and_up(&l) {
                        Some(x) => x,
                        None => continue,
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                    match name_and_up(&l) {
                        Some((n, _)) => (n, false),
                        None => continue,
                    }
                }
                _ => continue,
            };
            tx.send_if_modified(|s| match s.get_mut(&name) {
                Some(old) if *old != up => {
                    *old = up;
                    true
                }
                _ => false,
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    Ok(rx)
}

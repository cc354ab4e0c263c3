//! Checks of a registration's nodes: ids that name one node each, and addresses a go-micro
//! client can dial.
//!
//! go-micro registers `host:port` (`mnet.HostPort`: an IPv6 address in brackets), and its
//! clients split the address at the last colon and dial it: anything else in the registry is a
//! node every caller fails on. Two nodes with one id would be one etcd key, the second
//! silently replacing the first.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::{ApiError, check_name};
use crate::model::Node;

/// Longest host name (DNS's limit).
const MAX_HOST: usize = 253;

/// Checks every node of a registration: its id (see `check_name`), that no id appears twice,
/// and its address ([`check_address`]).
pub(super) fn check_nodes(nodes: &[Node]) -> Result<(), ApiError> {
    let mut ids = HashSet::with_capacity(nodes.len());
    for node in nodes {
        check_name("node id", &node.id)?;
        if !ids.insert(node.id.as_str()) {
            return Err(ApiError::bad_request(format!(
                "node id {:?} appears more than once in this registration: each node needs \
                 its own id",
                node.id
            )));
        }
        check_address(&node.address).map_err(|reason| {
            ApiError::bad_request(format!(
                "node {:?} has an invalid address {:?}: {reason}",
                node.id, node.address
            ))
        })?;
    }
    Ok(())
}

/// Checks `host:port`: the host a name (letters, digits, `-`, `_`, dot-separated labels), an
/// IPv4 address, or an IPv6 address in brackets (with an optional `%zone`); the port from 1
/// to 65535.
fn check_address(address: &str) -> Result<(), &'static str> {
    const SHAPE: &str = "use host:port, [ipv6]:port for IPv6, with a port from 1 to 65535";
    if address.is_empty() {
        return Err("it is empty");
    }
    let (host, port) = address.rsplit_once(':').ok_or(SHAPE)?;
    // Digits only: `parse` alone would take `+80`.
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SHAPE);
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err("the port must be from 1 to 65535"),
        Ok(_) => {}
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or(SHAPE)?;
        let (ip, zone) = match inner.split_once('%') {
            Some((ip, zone)) => (ip, Some(zone)),
            None => (inner, None),
        };
        let zone_ok = zone.is_none_or(|z| {
            !z.is_empty()
                && z.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
        return match ip.parse::<Ipv6Addr>() {
            Ok(_) if zone_ok => Ok(()),
            _ => Err("not an IPv6 address between the brackets"),
        };
    }
    if host.contains(':') {
        return Err("an IPv6 address needs brackets: [ipv6]:port");
    }
    // All digits and dots reads as an IPv4 address, and must be one (not `10.0.0.256`).
    if !host.is_empty() && host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return host
            .parse::<Ipv4Addr>()
            .map(drop)
            .map_err(|_| "not an IPv4 address");
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    };
    if host.len() <= MAX_HOST && host.split('.').all(label_ok) {
        Ok(())
    } else {
        Err("the host is neither a host name nor an IP address")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Metadata;

    #[test]
    fn addresses_go_micro_registers_pass() {
        for good in [
            "10.0.0.7:41231",
            "127.0.0.1:8080",
            "10.0.0.1:1",
            "0.0.0.0:65535",
            "localhost:9001",
            "greeter-6b0a.default.svc.cluster.local:8080",
            "my_host:80",
            "[::1]:8080",
            "[2001:db8::7]:443",
            "[fe80::1%eth0]:8080",
        ] {
            assert_eq!(check_address(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn other_addresses_are_refused() {
        for bad in [
            "",
            "10.0.0.1",
            "10.0.0.1:",
            ":8080",
            "10.0.0.1:0",
            "10.0.0.1:65536",
            "10.0.0.1:+80",
            "10.0.0.1:80a",
            "10.0.0.256:80",
            "1.2.3:80",
            "::1:8080",
            "[::1]",
            "[::1:8080",
            "[not-v6]:80",
            "[::1%]:80",
            "http://10.0.0.1:80",
            "host name:80",
            "-host:80",
            "host..local:80",
            "host/x:80",
        ] {
            assert!(check_address(bad).is_err(), "{bad:?}");
        }
        let long = format!("{}:80", "a.".repeat(MAX_HOST / 2 + 1) + "a");
        assert!(check_address(&long).is_err());
    }

    fn node(id: &str, address: &str) -> Node {
        Node {
            id: id.into(),
            address: address.into(),
            metadata: Metadata::default(),
        }
    }

    #[test]
    fn node_ids_are_unique_within_a_registration() {
        let ok = [node("a", "10.0.0.1:1"), node("b", "10.0.0.1:1")];
        assert!(check_nodes(&ok).is_ok(), "one address may serve two nodes");
        let twice = [node("a", "10.0.0.1:1"), node("a", "10.0.0.2:1")];
        let err = check_nodes(&twice).unwrap_err();
        assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(err.body.message.contains("more than once"), "{err:?}");
        let bad = [node("a", "10.0.0.1:1"), node("b", "10.0.0.1")];
        let err = check_nodes(&bad).unwrap_err();
        assert!(err.body.message.contains("\"b\""), "{err:?}");
        assert!(check_nodes(&[node("a/b", "10.0.0.1:1")]).is_err());
    }
}

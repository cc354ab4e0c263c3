//! How a registry lays services out in etcd: the prefix, the shape of a node's key and the codec
//! of its value. go-micro's is the one served today; Kratos' and go-zero's layouts differ in
//! exactly these three things, so they are one implementation of [`Layout`] each, and nothing
//! that serves keys (the etcd endpoint) changes.

use crate::model::{DecodeError, Service, key_segment};

/// Where a key falls in a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPlace<'a> {
    /// The key of one node of a service.
    Node {
        /// The service's key segment.
        service: &'a str,
        /// The node's key segment.
        node: &'a str,
    },
    /// Under the prefix, but not the shape of a node's key.
    Other,
    /// Outside the prefix.
    Outside,
}

/// A registry's key layout and value codec.
pub trait Layout: Send + Sync + 'static {
    /// The prefix every key of the registry starts with.
    fn prefix(&self) -> &str;

    /// The key of `node_id` of `service`.
    fn node_key(&self, service: &str, node_id: &str) -> String;

    /// The prefix of every node key of `service` (a prefix range of it is the service).
    fn service_prefix(&self, service: &str) -> String;

    /// Where `key` falls.
    fn place<'a>(&self, key: &'a str) -> KeyPlace<'a>;

    /// The value stored for `service`, which has one node.
    fn encode(&self, service: &Service) -> Vec<u8>;

    /// Reads a value stored at a node's key: a service with that one node.
    fn decode(&self, value: &[u8]) -> Result<Service, DecodeError>;
}

/// go-micro's layout: `{prefix}{service}/{node id}` (with `/` in either replaced by `-`), the
/// value a JSON service holding the one node.
#[derive(Debug, Clone)]
pub struct GoMicro {
    prefix: String,
}

impl GoMicro {
    /// The layout under `prefix` (go-micro's default is `/micro/registry/`).
    pub fn new(prefix: impl Into<String>) -> Self {
        GoMicro {
            prefix: prefix.into(),
        }
    }
}

impl Layout for GoMicro {
    fn prefix(&self) -> &str {
        &self.prefix
    }

    fn node_key(&self, service: &str, node_id: &str) -> String {
        format!(
            "{}{}/{}",
            self.prefix,
            key_segment(service),
            key_segment(node_id)
        )
    }

    fn service_prefix(&self, service: &str) -> String {
        format!("{}{}/", self.prefix, key_segment(service))
    }

    fn place<'a>(&self, key: &'a str) -> KeyPlace<'a> {
        let Some(rest) = key.strip_prefix(self.prefix.as_str()) else {
            return KeyPlace::Outside;
        };
        match rest.split_once('/') {
            Some((service, node))
                if !service.is_empty() && !node.is_empty() && !node.contains('/') =>
            {
                KeyPlace::Node { service, node }
            }
            _ => KeyPlace::Other,
        }
    }

    fn encode(&self, service: &Service) -> Vec<u8> {
        service.encode()
    }

    fn decode(&self, value: &[u8]) -> Result<Service, DecodeError> {
        Service::decode(value)
    }
}

/// The end of the range of keys starting with `prefix` (etcd's `WithPrefix`): the prefix with
/// its last byte below 0xff incremented; all 0xff is etcd's "every key from here".
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(
            prefix_end(b"/micro/registry/"),
            b"/micro/registry0".to_vec()
        );
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }

    #[test]
    fn keys_are_placed_by_shape_under_the_prefix() {
        let layout = GoMicro::new("/micro/registry/");
        assert_eq!(layout.node_key("a/b", "n/1"), "/micro/registry/a-b/n-1");
        assert_eq!(layout.service_prefix("greeter"), "/micro/registry/greeter/");
        assert_eq!(
            layout.place("/micro/registry/greeter/n1"),
            KeyPlace::Node {
                service: "greeter",
                node: "n1"
            }
        );
        for other in [
            "/micro/registry/",
            "/micro/registry/greeter",
            "/micro/registry/greeter/",
            "/micro/registry/greeter/n1/x",
            "/micro/registry//n1",
        ] {
            assert_eq!(layout.place(other), KeyPlace::Other, "{other}");
        }
        assert_eq!(layout.place("/micro/other"), KeyPlace::Outside);
    }
}

//! The service model shared with go-micro, and its JSON codec.
//!
//! regcache reads and writes etcd values in go-micro's exact layout so that existing fleets can
//! adopt it without migrating: the value under `<prefix><service>/<node>` is the JSON of a
//! [`Service`] carrying exactly one [`Node`].
//!
//! Decoding follows Go's `encoding/json`, not serde's defaults: object keys match
//! case-insensitively (`"Name"` and `"name"` are the same field), `null` stands for an empty map
//! or list, and unknown fields are ignored. Encoding writes the lowercase names go-micro's struct
//! tags give, so what regcache writes decodes in Go too.

mod metadata;

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value as Json};

pub use metadata::Metadata;

/// Largest etcd value regcache will decode. go-micro values are a few KiB; a larger one is a
/// mistake or an attack, and decoding it would only cost memory.
pub const MAX_VALUE_BYTES: usize = 256 * 1024;

/// A service as go-micro describes it: one version of a named service and its nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Service {
    /// The service name, e.g. `greeter`.
    pub name: String,
    /// The version; `get_service` groups nodes by it.
    pub version: String,
    /// Free-form metadata of the service.
    pub metadata: Metadata,
    /// The endpoints the service offers.
    pub endpoints: Vec<Endpoint>,
    /// The nodes (instances) of this version.
    pub nodes: Vec<Node>,
}

/// One instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Node {
    /// Unique id of the node within its service.
    pub id: String,
    /// Where to reach it, `host:port`.
    pub address: String,
    /// Free-form metadata of the node.
    pub metadata: Metadata,
}

/// An endpoint (RPC method) of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Endpoint {
    /// The endpoint name, e.g. `Greeter.Hello`.
    pub name: String,
    /// The request type, if described.
    pub request: Option<Value>,
    /// The response type, if described.
    pub response: Option<Value>,
    /// Free-form metadata of the endpoint.
    pub metadata: Metadata,
}

/// A (possibly nested) type description of an endpoint's request or response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Value {
    /// Field or type name.
    pub name: String,
    /// Type name, e.g. `string`.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Nested fields.
    pub values: Vec<Value>,
}

/// Why a registry value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The value is larger than [`MAX_VALUE_BYTES`].
    #[error("value of {0} bytes exceeds the {MAX_VALUE_BYTES}-byte limit")]
    TooLarge(usize),
    /// The bytes are not JSON.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// A field has the wrong JSON type.
    #[error("field `{field}` should be {expected}")]
    WrongType {
        /// Dotted path of the field.
        field: String,
        /// What it should have been.
        expected: &'static str,
    },
    /// A required field is missing or empty.
    #[error("field `{0}` is missing or empty")]
    Missing(&'static str),
}

/// How deep `Value`s may nest; Go's encoder has no limit, but a malicious value could exhaust
/// the stack of a recursive decoder.
const MAX_VALUE_DEPTH: usize = 32;

impl Service {
    /// Decodes a go-micro service value as found in etcd.
    pub fn decode(bytes: &[u8]) -> Result<Service, DecodeError> {
        if bytes.len() > MAX_VALUE_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let json: Json =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        Service::from_json(&json)
    }

    /// Decodes a service from parsed JSON with [`Service::decode`]'s rules but no size limit:
    /// for services that merge many etcd values (a cache snapshot holds a whole service, of
    /// thousands of nodes, as one value), whose size the caller bounds.
    pub fn from_json(json: &Json) -> Result<Service, DecodeError> {
        let obj = as_object(json, "service")?;
        let name = string_field(obj, "name")?;
        if name.is_empty() {
            return Err(DecodeError::Missing("name"));
        }
        let nodes = list_field(obj, "nodes")?
            .iter()
            .map(decode_node)
            .collect::<Result<Vec<_>, _>>()?;
        let endpoints = list_field(obj, "endpoints")?
            .iter()
            .map(decode_endpoint)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Service {
            name,
            version: string_field(obj, "version")?,
            metadata: map_field(obj, "metadata")?,
            endpoints,
            nodes,
        })
    }

    /// Encodes the service as go-micro writes it.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a Service always serialises")
    }

    /// Returns a copy of this service carrying only `node`, the shape of one etcd value.
    pub fn with_single_node(&self, node: &Node) -> Service {
        Service {
            nodes: vec![node.clone()],
            ..self.without_nodes()
        }
    }

    /// Returns a copy of this service with no nodes.
    pub fn without_nodes(&self) -> Service {
        Service {
            name: self.name.clone(),
            version: self.version.clone(),
            metadata: self.metadata.clone(),
            endpoints: self.endpoints.clone(),
            nodes: Vec::new(),
        }
    }
}

/// Replaces `/` by `-`, as go-micro does for the service and node parts of a key.
pub fn key_segment(name: &str) -> String {
    name.replace('/', "-")
}

/// Groups single-node services of any names by name, then by version as [`group_by_version`]
/// does: a listing of the whole registry.
pub fn group_services(services: impl IntoIterator<Item = Service>) -> Vec<Service> {
    let mut by_name: BTreeMap<String, Vec<Service>> = BTreeMap::new();
    for service in services {
        by_name
            .entry(service.name.clone())
            .or_default()
            .push(service);
    }
    by_name.into_values().flat_map(group_by_version).collect()
}

/// Groups single-node services (as read from etcd) by version, merging their nodes the way
/// go-micro's `GetService` does. The output is sorted by version for stable answers.
pub fn group_by_version(services: impl IntoIterator<Item = Service>) -> Vec<Service> {
    let mut by_version: BTreeMap<String, Service> = BTreeMap::new();
    for service in services {
        match by_version.get_mut(&service.version) {
            Some(merged) => merged.nodes.extend(service.nodes),
            None => {
                by_version.insert(service.version.clone(), service);
            }
        }
    }
    by_version.into_values().collect()
}

fn decode_node(json: &Json) -> Result<Node, DecodeError> {
    let obj = as_object(json, "nodes[]")?;
    let id = string_field(obj, "id")?;
    if id.is_empty() {
        return Err(DecodeError::Missing("nodes[].id"));
    }
    Ok(Node {
        id,
        address: string_field(obj, "address")?,
        metadata: map_field(obj, "metadata")?,
    })
}

fn decode_endpoint(json: &Json) -> Result<Endpoint, DecodeError> {
    let obj = as_object(json, "endpoints[]")?;
    Ok(Endpoint {
        name: string_field(obj, "name")?,
        request: value_field(obj, "request", 0)?,
        response: value_field(obj, "response", 0)?,
        metadata: map_field(obj, "metadata")?,
    })
}

fn value_field(
    obj: &Map<String, Json>,
    name: &str,
    depth: usize,
) -> Result<Option<Value>, DecodeError> {
    match field(obj, name) {
        None => Ok(None),
        Some(json) => decode_value(json, depth).map(Some),
    }
}

fn decode_value(json: &Json, depth: usize) -> Result<Value, DecodeError> {
    if depth > MAX_VALUE_DEPTH {
        return Err(DecodeError::WrongType {
            field: "values".into(),
            expected: "nested at most 32 deep",
        });
    }
    let obj = as_object(json, "value")?;
    let values = list_field(obj, "values")?
        .iter()
        .map(|v| decode_value(v, depth + 1))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Value {
        name: string_field(obj, "name")?,
        type_name: string_field(obj, "type")?,
        values,
    })
}

/// Looks a field up the way Go's `encoding/json` does: an exact match first, then any key equal
/// ignoring case. `null` reads as absent.
fn field<'a>(obj: &'a Map<String, Json>, name: &str) -> Option<&'a Json> {
    obj.get(name)
        .or_else(|| {
            obj.iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_null())
}

fn as_object<'a>(json: &'a Json, what: &str) -> Result<&'a Map<String, Json>, DecodeError> {
    json.as_object().ok_or_else(|| DecodeError::WrongType {
        field: what.to_string(),
        expected: "an object",
    })
}

fn string_field(obj: &Map<String, Json>, name: &str) -> Result<String, DecodeError> {
    match field(obj, name) {
        None => Ok(String::new()),
        Some(Json::String(s)) => Ok(s.clone()),
        Some(_) => Err(DecodeError::WrongType {
            field: name.to_string(),
            expected: "a string",
        }),
    }
}

fn list_field<'a>(obj: &'a Map<String, Json>, name: &str) -> Result<&'a [Json], DecodeError> {
    match field(obj, name) {
        None => Ok(&[]),
        Some(Json::Array(items)) => Ok(items),
        Some(_) => Err(DecodeError::WrongType {
            field: name.to_string(),
            expected: "a list",
        }),
    }
}

fn map_field(obj: &Map<String, Json>, name: &str) -> Result<Metadata, DecodeError> {
    let Some(json) = field(obj, name) else {
        return Ok(Metadata::new());
    };
    let wrong = || DecodeError::WrongType {
        field: name.to_string(),
        expected: "a map of strings",
    };
    json.as_object()
        .ok_or_else(wrong)?
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_str().ok_or_else(wrong)?.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_go_micro_json_with_nulls_mixed_case_and_extra_fields() {
        let raw = br#"{"Name":"greeter","VERSION":"1.0","metadata":null,"endpoints":null,
            "nodes":[{"Id":"greeter-1","address":"10.0.0.1:8080","Metadata":{"zone":"a"},"extra":1}],
            "unknown":{"x":[1,2]}}"#;
        let service = Service::decode(raw).unwrap();
        assert_eq!(service.name, "greeter");
        assert_eq!(service.version, "1.0");
        assert!(service.metadata.is_empty() && service.endpoints.is_empty());
        assert_eq!(service.nodes[0].id, "greeter-1");
        assert_eq!(service.nodes[0].metadata.get("zone"), Some("a"));
    }

    #[test]
    fn exact_key_wins_over_case_insensitive_match() {
        let raw = br#"{"NAME":"wrong","name":"right","nodes":[]}"#;
        assert_eq!(Service::decode(raw).unwrap().name, "right");
    }

    #[test]
    fn round_trips_nested_endpoint_values() {
        let service = Service {
            name: "a".into(),
            version: "v".into(),
            endpoints: vec![Endpoint {
                name: "A.Call".into(),
                request: Some(Value {
                    name: "Req".into(),
                    type_name: "Req".into(),
                    values: vec![Value {
                        name: "id".into(),
                        type_name: "string".into(),
                        values: vec![],
                    }],
                }),
                response: None,
                metadata: Metadata::new(),
            }],
            nodes: vec![Node {
                id: "n".into(),
                address: "127.0.0.1:1".into(),
                metadata: Metadata::new(),
            }],
            ..Default::default()
        };
        let encoded = service.encode();
        let text = String::from_utf8(encoded.clone()).unwrap();
        assert!(text.contains(r#""type":"Req""#), "{text}");
        assert!(text.contains(r#""response":null"#), "{text}");
        assert_eq!(Service::decode(&encoded).unwrap(), service);
    }

    #[test]
    fn rejects_malformed_values_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "not JSON"),
            (b"not json", "not JSON"),
            (b"[]", "should be an object"),
            (br#"{"nodes":[]}"#, "`name` is missing"),
            (br#"{"name":7}"#, "`name` should be a string"),
            (
                br#"{"name":"a","nodes":{"id":"x"}}"#,
                "`nodes` should be a list",
            ),
            (
                br#"{"name":"a","nodes":[{"address":"x"}]}"#,
                "`nodes[].id` is missing",
            ),
            (br#"{"name":"a","metadata":{"k":1}}"#, "map of strings"),
        ];
        for (raw, want) in cases {
            let err = Service::decode(raw).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(raw)
            );
        }
        let huge = vec![b' '; MAX_VALUE_BYTES + 1];
        assert!(matches!(
            Service::decode(&huge),
            Err(DecodeError::TooLarge(_))
        ));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let mut raw = String::from(r#"{"name":"a","endpoints":[{"name":"e","request":"#);
        for _ in 0..10_000 {
            raw.push_str(r#"{"name":"v","values":["#);
        }
        // serde_json's own recursion limit (128) or ours must refuse it.
        assert!(Service::decode(raw.as_bytes()).is_err());
    }

    #[test]
    fn groups_nodes_by_version() {
        let node = |id: &str| Node {
            id: id.into(),
            ..Default::default()
        };
        let svc = |version: &str, id: &str| Service {
            name: "s".into(),
            version: version.into(),
            nodes: vec![node(id)],
            ..Default::default()
        };
        let grouped = group_by_version([svc("2", "c"), svc("1", "a"), svc("1", "b")]);
        assert_eq!(grouped.len(), 2);
        assert_eq!(grouped[0].version, "1");
        assert_eq!(grouped[0].nodes.len(), 2);
        assert_eq!(grouped[1].nodes[0].id, "c");
    }

    #[test]
    fn key_segments_replace_slashes() {
        assert_eq!(key_segment("go.micro/srv/a"), "go.micro-srv-a");
    }
}

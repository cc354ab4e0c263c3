//! The keys this host registered ([`Owned`]), which of them a write puts ([`Puts`],
//! [`targets`]) and what a write found, recorded on them ([`settle`]).
//!
//! Pure bookkeeping: the writes themselves are the lease keeper's ([`lease`](super::lease)) and
//! their transactions [`ownership`](super::ownership)'s.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use super::ownership::{Foreign, Target};
use crate::model::Service;
use crate::registry::Takeover;

/// A key this host registered: the single-node service and its encoded value.
#[derive(Debug, Clone)]
pub(crate) struct Owned {
    pub(super) service: Service,
    pub(super) value: Vec<u8>,
    /// Until this host first writes the node: what its registration said about someone else
    /// holding it, which still applies then (the registration was answered before its write,
    /// during an outage). `None` once written: the node is this host's, and someone else
    /// taking it is a conflict.
    pub(super) unwritten: Option<Takeover>,
    /// Someone else's lease that holds the key now (0: a value on no lease): it is not written
    /// back while so.
    pub(super) conflict: Option<i64>,
    /// Which registration this is, so that what a write found is recorded only on the
    /// registration it wrote, not on one that replaced it meanwhile.
    pub(super) serial: u64,
}

impl Owned {
    pub(super) fn new(service: Service, unwritten: Option<Takeover>) -> Owned {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        Owned {
            value: service.encode(),
            service,
            unwritten,
            conflict: None,
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Whether this host wrote the node in this run.
    pub(crate) fn is_written(&self) -> bool {
        self.unwritten.is_none()
    }

    /// What a write other than its registration's own answer does about someone else holding
    /// the key: until the node is first written, what the registration asked (a refused one is
    /// yielded, then dropped by [`settle`]); then yield.
    pub(super) fn foreign(&self) -> Foreign {
        match self.unwritten {
            Some(Takeover::Force) => Foreign::Take,
            _ => Foreign::Yield,
        }
    }
}

/// Which owned keys a write puts.
#[derive(Debug, Clone)]
pub(crate) enum Puts {
    /// A registration's keys, answered now: someone else holding one fails it
    /// ([`Takeover::Refuse`]) or is taken over ([`Takeover::Force`]).
    Registration(Vec<String>, Takeover),
    /// Owned keys to check and put back: the watch saw them changed, or their registration
    /// was answered before they could be written.
    Repair(Vec<String>),
    /// Every owned key (a new lease).
    All,
}

/// The owned keys `puts` writes (every one when `everything`: a new lease holds none), each
/// with what to do about someone else holding it: a registration's own keys as it asked, any
/// other as [`Owned::foreign`] says. Keys no longer owned (deregistered) are left out.
pub(super) fn targets(
    owned: &BTreeMap<String, Owned>,
    puts: &Puts,
    everything: bool,
) -> Vec<Target> {
    let (keys, asked): (&[String], _) = match puts {
        Puts::Registration(keys, takeover) => (keys, Some(*takeover)),
        Puts::Repair(keys) => (keys, None),
        Puts::All => (&[], None),
    };
    let keys: BTreeSet<&String> = keys.iter().collect();
    let target = |key: &String, owned: &Owned| Target {
        key: key.clone(),
        owned: owned.clone(),
        foreign: match asked {
            Some(takeover) if keys.contains(key) => Foreign::from(takeover),
            _ => owned.foreign(),
        },
    };
    if everything || matches!(puts, Puts::All) {
        owned.iter().map(|(k, o)| target(k, o)).collect()
    } else {
        keys.iter()
            .filter_map(|k| owned.get(*k).map(|o| target(k, o)))
            .collect()
    }
}

/// What a write found that changes this host's registrations.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Settled {
    /// Written nodes someone else holds now, with its lease, newly (a conflict is reported
    /// once, when it starts).
    pub(super) conflicts: Vec<(String, i64)>,
    /// Nodes never written whose registration refused someone else's node: dropped.
    pub(super) refused: Vec<(String, i64)>,
}

/// Records in `owned` what a write of the `checked` keys (with the serial each was written
/// as) found: the keys not `yielded` hold this host's value on its lease, so they are written
/// and in no conflict; a yielded key is a conflict if its node was written before, and is
/// dropped if it never was (its registration refused someone else's node). A key registered
/// again meanwhile (another serial) is left to that registration's own write.
pub(super) fn settle(
    owned: &mut BTreeMap<String, Owned>,
    checked: &[(String, u64)],
    yielded: &[(String, i64)],
) -> Settled {
    let yielded: BTreeMap<&str, i64> = yielded.iter().map(|(k, l)| (k.as_str(), *l)).collect();
    let mut settled = Settled::default();
    for (key, serial) in checked {
        let Some(entry) = owned.get_mut(key).filter(|e| e.serial == *serial) else {
            continue;
        };
        match yielded.get(key.as_str()).copied() {
            None => {
                entry.unwritten = None;
                entry.conflict = None;
            }
            Some(owner) if entry.is_written() => {
                if entry.conflict != Some(owner) {
                    settled.conflicts.push((key.clone(), owner));
                }
                entry.conflict = Some(owner);
            }
            Some(owner) => {
                owned.remove(key);
                settled.refused.push((key.clone(), owner));
            }
        }
    }
    settled
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(node: &str, unwritten: Option<Takeover>) -> (String, Owned) {
        let service = Service {
            name: "greeter".into(),
            nodes: vec![crate::model::Node {
                id: node.into(),
                address: "10.0.0.1:80".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        (node.to_string(), Owned::new(service, unwritten))
    }

    fn policies(targets: &[Target]) -> Vec<(&str, Foreign)> {
        targets
            .iter()
            .map(|t| (t.key.as_str(), t.foreign))
            .collect()
    }

    /// A registration answered now refuses someone else's node for its own keys only: when a
    /// new lease makes it write every key, the others keep what their own registrations
    /// asked (a 409 must never name a node of another registration).
    #[test]
    fn a_registration_refuses_for_its_own_keys_only() {
        let map: BTreeMap<String, Owned> = [
            owned("mine", Some(Takeover::Refuse)),
            owned("written", None),
            owned("kept", Some(Takeover::Refuse)),
            owned("forced", Some(Takeover::Force)),
        ]
        .into_iter()
        .collect();
        let puts = Puts::Registration(vec!["mine".into()], Takeover::Refuse);
        assert_eq!(
            policies(&targets(&map, &puts, false)),
            [("mine", Foreign::Refuse)]
        );
        assert_eq!(
            policies(&targets(&map, &puts, true)),
            [
                ("forced", Foreign::Take),
                ("kept", Foreign::Yield),
                ("mine", Foreign::Refuse),
                ("written", Foreign::Yield),
            ],
            "a new lease: every key, each with its own registration's policy"
        );
        let repair = Puts::Repair(vec!["forced".into(), "gone".into(), "written".into()]);
        assert_eq!(
            policies(&targets(&map, &repair, false)),
            [("forced", Foreign::Take), ("written", Foreign::Yield)],
            "a forced registration stays forced until written; a key no longer owned is skipped"
        );
    }

    /// A registration answered during an outage and refused when written is dropped, not kept
    /// as a conflict (which would put it back once the owner deletes its node); a written one
    /// someone took is a conflict; one registered again meanwhile is left to its own write.
    #[test]
    fn what_a_write_found_settles_the_registrations() {
        let mut map: BTreeMap<String, Owned> = [
            owned("unwritten", Some(Takeover::Refuse)),
            owned("written", None),
            owned("fine", Some(Takeover::Refuse)),
            owned("replaced", Some(Takeover::Refuse)),
        ]
        .into_iter()
        .collect();
        let checked: Vec<(String, u64)> = map.iter().map(|(k, o)| (k.clone(), o.serial)).collect();
        let again = owned("replaced", Some(Takeover::Refuse)).1;
        let again_serial = again.serial;
        map.insert("replaced".into(), again);
        let yielded = [
            ("unwritten".to_string(), 7),
            ("written".to_string(), 8),
            ("replaced".to_string(), 9),
        ];
        let settled = settle(&mut map, &checked, &yielded);
        assert_eq!(
            settled,
            Settled {
                conflicts: vec![("written".into(), 8)],
                refused: vec![("unwritten".into(), 7)],
            }
        );
        assert!(!map.contains_key("unwritten"));
        assert_eq!(map["written"].conflict, Some(8));
        assert!(map["fine"].is_written() && map["fine"].conflict.is_none());
        let replaced = &map["replaced"];
        assert_eq!(
            (replaced.serial, replaced.unwritten, replaced.conflict),
            (again_serial, Some(Takeover::Refuse), None)
        );
        // A conflict is reported once, when it starts.
        let checked = [("written".to_string(), map["written"].serial)];
        let settled = settle(&mut map, &checked, &[("written".into(), 8)]);
        assert_eq!(settled, Settled::default());
    }
}

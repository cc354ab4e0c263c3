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
    /// Registrations answered by this write (one or several written together): someone else
    /// holding one of a registration's nodes fails that registration ([`Takeover::Refuse`]) or
    /// is taken over ([`Takeover::Force`]).
    Registrations(Vec<Asked>),
    /// Owned keys to check and put back: the watch saw them changed, or their registration
    /// was answered before they could be written.
    Repair(Vec<String>),
    /// Every owned key (a new lease).
    All,
}

/// One registration in a write: its keys, each with the serial of the entry it put in
/// `owned`, and what it asked about someone else holding them.
#[derive(Debug, Clone)]
pub(crate) struct Asked {
    pub(crate) keys: Vec<(String, u64)>,
    /// `None`: its caller is no longer waiting (answered [`Later`](crate::registry::Registered)
    /// at its deadline, or gone), so its keys are written as those of a registration answered
    /// before its write are: as [`Owned::foreign`] says.
    pub(crate) takeover: Option<Takeover>,
}

/// The owned keys `puts` writes (every one when `everything`: a new lease holds none), each
/// with what to do about someone else holding it: a registration's own keys as it asked, and
/// marked as its (by its index in `puts`), any other as [`Owned::foreign`] says. Keys no
/// longer owned (deregistered) are left out, and so is a registration's key that a later
/// registration of the node replaced: the write is that registration's. A registration's keys
/// come together, in the order of `puts`, before any other.
pub(super) fn targets(
    owned: &BTreeMap<String, Owned>,
    puts: &Puts,
    everything: bool,
) -> Vec<Target> {
    let target = |key: &str, owned: &Owned, asked: Option<(usize, Takeover)>| Target {
        key: key.to_string(),
        owned: owned.clone(),
        foreign: asked.map_or_else(|| owned.foreign(), |(_, takeover)| takeover.into()),
        registration: asked.map(|(i, _)| i),
    };
    let mut chosen = Vec::new();
    let mut seen = BTreeSet::new();
    match puts {
        Puts::Registrations(registrations) => {
            for (i, asked) in registrations.iter().enumerate() {
                for (key, serial) in &asked.keys {
                    let Some(o) = owned.get(key).filter(|o| o.serial == *serial) else {
                        continue;
                    };
                    if seen.insert(key.as_str()) {
                        chosen.push(target(key, o, asked.takeover.map(|t| (i, t))));
                    }
                }
            }
        }
        Puts::Repair(keys) => {
            for key in keys {
                if let Some(o) = owned.get(key)
                    && seen.insert(key.as_str())
                {
                    chosen.push(target(key, o, None));
                }
            }
        }
        Puts::All => {}
    }
    if everything || matches!(puts, Puts::All) {
        let rest = owned.iter().filter(|(k, _)| !seen.contains(k.as_str()));
        chosen.extend(rest.map(|(k, o)| target(k, o, None)));
    }
    chosen
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

    fn policies(targets: &[Target]) -> Vec<(&str, Foreign, Option<usize>)> {
        targets
            .iter()
            .map(|t| (t.key.as_str(), t.foreign, t.registration))
            .collect()
    }

    fn asked(map: &BTreeMap<String, Owned>, keys: &[&str], takeover: Option<Takeover>) -> Asked {
        let keys = keys
            .iter()
            .map(|k| (k.to_string(), map[*k].serial))
            .collect();
        Asked { keys, takeover }
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
        let puts = Puts::Registrations(vec![asked(&map, &["mine"], Some(Takeover::Refuse))]);
        assert_eq!(
            policies(&targets(&map, &puts, false)),
            [("mine", Foreign::Refuse, Some(0))]
        );
        assert_eq!(
            policies(&targets(&map, &puts, true)),
            [
                ("mine", Foreign::Refuse, Some(0)),
                ("forced", Foreign::Take, None),
                ("kept", Foreign::Yield, None),
                ("written", Foreign::Yield, None),
            ],
            "a new lease: every key, each with its own registration's policy"
        );
        let repair = Puts::Repair(vec!["forced".into(), "gone".into(), "written".into()]);
        assert_eq!(
            policies(&targets(&map, &repair, false)),
            [
                ("forced", Foreign::Take, None),
                ("written", Foreign::Yield, None)
            ],
            "a forced registration stays forced until written; a key no longer owned is skipped"
        );
    }

    /// Registrations written together: each key is marked as its registration's and keeps
    /// what that one asked, a registration's keys stay together, one whose caller left is
    /// written as a repair, and a node registered again since is left to the later
    /// registration (written once, as its).
    #[test]
    fn registrations_written_together_keep_their_own_policies() {
        let mut map: BTreeMap<String, Owned> = [
            owned("a1", Some(Takeover::Refuse)),
            owned("a2", Some(Takeover::Refuse)),
            owned("b1", Some(Takeover::Force)),
            owned("c1", Some(Takeover::Refuse)),
            owned("shared", Some(Takeover::Refuse)),
        ]
        .into_iter()
        .collect();
        let first = asked(&map, &["a2", "shared", "a1"], Some(Takeover::Refuse));
        map.insert("shared".into(), owned("shared", Some(Takeover::Force)).1);
        let puts = Puts::Registrations(vec![
            first,
            asked(&map, &["b1", "shared"], Some(Takeover::Force)),
            asked(&map, &["c1"], None),
        ]);
        assert_eq!(
            policies(&targets(&map, &puts, false)),
            [
                ("a2", Foreign::Refuse, Some(0)),
                ("a1", Foreign::Refuse, Some(0)),
                ("b1", Foreign::Take, Some(1)),
                ("shared", Foreign::Take, Some(1)),
                ("c1", Foreign::Yield, None),
            ]
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

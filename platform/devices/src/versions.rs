//! KubeEdge's twin versions and its conflict rule for desired values.
//!
//! A property's desired value can be set in two places: in the cloud (the Device's
//! `spec.properties[].desired`, by `kubectl`) and on the node (a local app publishing an
//! `expected` value on `$hw/events/device/<ns>/<name>/twin/update`). Each side counts its own
//! changes, as KubeEdge's `expected_version {cloud, edge}` does: the cloud's count is the
//! Device's `metadata.generation` at the change, the edge's is bumped by every local change.
//!
//! The node reports the desired value in force, and the versions behind it, in the Device's
//! status (`twins[].observedDesired`, metadata `source`, `cloudVersion`, `edgeVersion`), and the
//! cloud sends that status back with the next spec change: that is the cloud's view of the edge
//! version. A new cloud value is then:
//! - **applied** if the cloud had seen every edge change (its view of the edge version is at
//!   least the node's): the usual case, and the cloud's later word wins;
//! - **ignored** if the node changed the value locally since the cloud last heard from it (the
//!   two changed it concurrently, e.g. across a link cut): the node's newer local value stays
//!   and is reported, and a user who still wants the cloud's value sets it again once the
//!   node's change shows in the status;
//! - **ignored** if it is older than the cloud change already applied (a replay).
//!
//! Only properties whose cloud value changed are considered, so changing one property in the
//! cloud never undoes a local change to another.

use serde::{Deserialize, Serialize};

/// Who set the desired value in force.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The Device's spec.
    Cloud,
    /// A local app, over MQTT.
    Edge,
}

impl Source {
    /// `cloud` or `edge`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cloud => "cloud",
            Source::Edge => "edge",
        }
    }
}

/// A twin's versions: the cloud's and the node's change counts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Version {
    /// The Device generation of the last cloud change applied.
    pub cloud: u64,
    /// Local changes made on the node.
    pub edge: u64,
}

/// The desired value in force on the node for one property.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Expected {
    /// The value (none: no desired value).
    pub value: Option<String>,
    /// Who set it.
    pub source: Source,
    /// The versions behind it.
    pub version: Version,
    /// The last value the cloud sent for the property, applied or not (so a spec change to
    /// another property does not send it again).
    pub cloud_value: Option<String>,
    /// When it was set (ms since the epoch).
    pub timestamp: i64,
}

/// What became of a cloud value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudUpdate {
    /// The cloud's value for the property did not change.
    Unchanged,
    /// It is now the desired value in force.
    Applied,
    /// Older than the cloud change already applied: ignored.
    Stale,
    /// The node changed the value since the cloud last heard from it: the node's value stays.
    EdgeNewer,
}

/// The cloud's `value` for a property, from a Device at `generation` whose status showed the
/// node's edge version as `seen_edge`, against what is in force (`current`). Returns what
/// became of it and the new state (none: unchanged).
pub fn cloud(
    current: Option<&Expected>,
    value: Option<&str>,
    generation: u64,
    seen_edge: u64,
    now_ms: i64,
) -> (CloudUpdate, Option<Expected>) {
    let Some(c) = current else {
        return match value {
            None => (CloudUpdate::Unchanged, None),
            Some(v) => (
                CloudUpdate::Applied,
                Some(Expected {
                    value: Some(v.to_string()),
                    source: Source::Cloud,
                    version: Version {
                        cloud: generation,
                        edge: 0,
                    },
                    cloud_value: Some(v.to_string()),
                    timestamp: now_ms,
                }),
            ),
        };
    };
    if c.cloud_value.as_deref() == value {
        return (CloudUpdate::Unchanged, None);
    }
    if c.version.cloud > generation {
        return (CloudUpdate::Stale, None);
    }
    if c.version.edge > seen_edge {
        let mut kept = c.clone();
        kept.cloud_value = value.map(String::from);
        return (CloudUpdate::EdgeNewer, Some(kept));
    }
    (
        CloudUpdate::Applied,
        Some(Expected {
            value: value.map(String::from),
            source: Source::Cloud,
            version: Version {
                cloud: generation,
                edge: c.version.edge,
            },
            cloud_value: value.map(String::from),
            timestamp: now_ms,
        }),
    )
}

/// A local app's `value` for a property: always taken, and the edge version bumped.
pub fn edge(current: Option<&Expected>, value: &str, now_ms: i64) -> Expected {
    let version = current.map(|c| c.version).unwrap_or_default();
    Expected {
        value: Some(value.to_string()),
        source: Source::Edge,
        version: Version {
            cloud: version.cloud,
            edge: version.edge + 1,
        },
        cloud_value: current.and_then(|c| c.cloud_value.clone()),
        timestamp: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(value: &str, generation: u64) -> Expected {
        cloud(None, Some(value), generation, 0, 1).1.unwrap()
    }

    #[test]
    fn a_first_cloud_value_is_applied_and_none_is_nothing() {
        assert_eq!(cloud(None, None, 1, 0, 1), (CloudUpdate::Unchanged, None));
        let e = applied("20", 1);
        assert_eq!(e.value.as_deref(), Some("20"));
        assert_eq!(e.source, Source::Cloud);
        assert_eq!(e.version, Version { cloud: 1, edge: 0 });
    }

    #[test]
    fn the_same_cloud_value_again_is_unchanged_even_at_a_new_generation() {
        let e = applied("20", 1);
        assert_eq!(
            cloud(Some(&e), Some("20"), 2, 0, 2).0,
            CloudUpdate::Unchanged
        );
    }

    #[test]
    fn a_new_cloud_value_wins_when_the_cloud_saw_every_edge_change() {
        let e = edge(Some(&applied("20", 1)), "25", 2);
        assert_eq!(e.version, Version { cloud: 1, edge: 1 });
        let (what, next) = cloud(Some(&e), Some("30"), 2, 1, 3);
        assert_eq!(what, CloudUpdate::Applied);
        let next = next.unwrap();
        assert_eq!(next.value.as_deref(), Some("30"));
        assert_eq!(next.source, Source::Cloud);
        assert_eq!(next.version, Version { cloud: 2, edge: 1 });
    }

    #[test]
    fn a_concurrent_cloud_value_loses_to_a_newer_edge_change_and_is_remembered() {
        // The cloud saw edge version 1; the node has made change 2 since.
        let e = edge(Some(&edge(Some(&applied("20", 1)), "25", 2)), "26", 3);
        let (what, kept) = cloud(Some(&e), Some("30"), 2, 1, 4);
        assert_eq!(what, CloudUpdate::EdgeNewer);
        let kept = kept.unwrap();
        assert_eq!(kept.value.as_deref(), Some("26"));
        assert_eq!(kept.source, Source::Edge);
        assert_eq!(kept.cloud_value.as_deref(), Some("30"));
        // Sent again (another property changed): not re-applied.
        assert_eq!(
            cloud(Some(&kept), Some("30"), 3, 2, 5).0,
            CloudUpdate::Unchanged
        );
        // Once the cloud has seen change 2, its next value wins.
        let (what, next) = cloud(Some(&kept), Some("31"), 4, 2, 6);
        assert_eq!(what, CloudUpdate::Applied);
        assert_eq!(next.unwrap().value.as_deref(), Some("31"));
    }

    #[test]
    fn an_older_cloud_value_is_stale() {
        let e = applied("30", 5);
        assert_eq!(
            cloud(Some(&e), Some("20"), 4, 0, 1),
            (CloudUpdate::Stale, None)
        );
    }

    #[test]
    fn removing_the_cloud_value_clears_it_unless_the_edge_is_newer() {
        let e = applied("30", 1);
        let (what, next) = cloud(Some(&e), None, 2, 0, 2);
        assert_eq!(what, CloudUpdate::Applied);
        assert_eq!(next.unwrap().value, None);
        let local = edge(Some(&e), "31", 3);
        assert_eq!(cloud(Some(&local), None, 2, 0, 4).0, CloudUpdate::EdgeNewer);
    }
}

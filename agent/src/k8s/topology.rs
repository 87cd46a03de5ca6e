//! Node objects → peer targets: a pure fold over watcher events, so the rules (which
//! address, what a relist means, who is ourselves) are tested with synthetic events.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Node;

/// Annotation a mesh agent puts on its own Node: the `ip:port` its peers should dial
/// (wins over the InternalIP, for nodes whose mesh address is not the InternalIP).
pub const ADDRESS_ANNOTATION: &str = "mesh.dev/address";
/// Annotations published for operators (`kubectl describe node`).
pub const PEER_ID_ANNOTATION: &str = "mesh.dev/peer-id";
pub const BACKEND_ANNOTATION: &str = "mesh.dev/backend";

/// What the mesh needs to know of one Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    pub internal_ip: Option<IpAddr>,
    /// `mesh.dev/address` when present and well-formed.
    pub mesh_address: Option<SocketAddr>,
}

impl NodeFacts {
    /// Reads a Node object; malformed addresses are treated as absent (never a panic:
    /// the object comes from outside).
    pub fn of(node: &Node) -> Option<NodeFacts> {
        let name = node.metadata.name.clone()?;
        let internal_ip = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| {
                a.iter()
                    .filter(|a| a.type_ == "InternalIP")
                    .find_map(|a| a.address.parse::<IpAddr>().ok())
            });
        let mesh_address = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ADDRESS_ANNOTATION))
            .and_then(|v| v.parse::<SocketAddr>().ok());
        Some(NodeFacts {
            name,
            internal_ip,
            mesh_address,
        })
    }

    /// Where to dial this node's agent: its own annotation, else InternalIP on the port
    /// every agent listens on.
    pub fn target(&self, port: u16) -> Option<String> {
        self.mesh_address
            .or_else(|| self.internal_ip.map(|ip| SocketAddr::new(ip, port)))
            .map(|a| a.to_string())
    }
}

/// The watcher's events, reduced to what the fold needs (`kube::runtime::watcher::Event`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEvent {
    Apply(NodeFacts),
    Delete(String),
    /// A (re)list begins: the objects until `InitDone` replace everything known.
    Init,
    InitApply(NodeFacts),
    InitDone,
}

/// What one event changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The set of dial targets is different now.
    pub targets_changed: bool,
    /// Nodes that are gone (deleted, or missing from a relist).
    pub deleted: Vec<String>,
    /// Nodes seen for the first time.
    pub added: Vec<String>,
}

/// Every Node this agent knows of, and the peer targets they make.
#[derive(Debug)]
pub struct NodeBook {
    me: String,
    port: u16,
    nodes: BTreeMap<String, NodeFacts>,
    relist: Option<BTreeMap<String, NodeFacts>>,
    synced: bool,
}

impl NodeBook {
    /// `me` is this node's name (never a target); `port` the agents' listen port.
    pub fn new(me: &str, port: u16) -> NodeBook {
        NodeBook {
            me: me.to_string(),
            port,
            nodes: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }

    /// True once a full list has arrived: only then is "not a Node" a fact.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.nodes.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Option<&NodeFacts> {
        self.nodes.get(name)
    }

    /// Dial targets: every other Node with a usable address.
    pub fn targets(&self) -> BTreeSet<String> {
        self.nodes
            .values()
            .filter(|n| n.name != self.me)
            .filter_map(|n| n.target(self.port))
            .collect()
    }

    pub fn apply(&mut self, event: NodeEvent) -> Changes {
        let before = self.targets();
        let mut changes = Changes::default();
        match event {
            NodeEvent::Apply(facts) => {
                if !self.nodes.contains_key(&facts.name) {
                    changes.added.push(facts.name.clone());
                }
                self.nodes.insert(facts.name.clone(), facts);
            }
            NodeEvent::Delete(name) => {
                if self.nodes.remove(&name).is_some() {
                    changes.deleted.push(name);
                }
            }
            NodeEvent::Init => self.relist = Some(BTreeMap::new()),
            NodeEvent::InitApply(facts) => {
                self.relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(facts.name.clone(), facts);
            }
            NodeEvent::InitDone => {
                let fresh = self.relist.take().unwrap_or_default();
                changes.deleted = self
                    .nodes
                    .keys()
                    .filter(|n| !fresh.contains_key(*n))
                    .cloned()
                    .collect();
                changes.added = fresh
                    .keys()
                    .filter(|n| !self.nodes.contains_key(*n))
                    .cloned()
                    .collect();
                self.nodes = fresh;
                self.synced = true;
            }
        }
        changes.targets_changed = self.targets() != before;
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn facts(name: &str, ip: &str) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            internal_ip: ip.parse().ok(),
            mesh_address: None,
        }
    }

    fn listed(book: &mut NodeBook, nodes: &[NodeFacts]) -> Changes {
        book.apply(NodeEvent::Init);
        for n in nodes {
            book.apply(NodeEvent::InitApply(n.clone()));
        }
        book.apply(NodeEvent::InitDone)
    }

    #[test]
    fn initial_list_makes_targets_of_every_other_node() {
        let mut book = NodeBook::new("a", 6783);
        assert!(!book.synced());
        let c = listed(
            &mut book,
            &[
                facts("a", "10.0.0.1"),
                facts("b", "10.0.0.2"),
                facts("c", "10.0.0.3"),
            ],
        );
        assert!(book.synced());
        assert!(c.targets_changed);
        assert_eq!(c.added, vec!["a", "b", "c"]);
        assert!(c.deleted.is_empty());
        let t: Vec<_> = book.targets().into_iter().collect();
        assert_eq!(t, vec!["10.0.0.2:6783", "10.0.0.3:6783"]);
    }

    #[test]
    fn a_node_added_later_becomes_a_target_and_a_deleted_one_stops_being_one() {
        let mut book = NodeBook::new("a", 6783);
        listed(&mut book, &[facts("a", "10.0.0.1"), facts("b", "10.0.0.2")]);
        let c = book.apply(NodeEvent::Apply(facts("c", "10.0.0.3")));
        assert_eq!(c.added, vec!["c"]);
        assert!(c.targets_changed);
        assert!(book.targets().contains("10.0.0.3:6783"));
        // A status update (same address) changes nothing.
        let c = book.apply(NodeEvent::Apply(facts("c", "10.0.0.3")));
        assert_eq!(c, Changes::default());
        let c = book.apply(NodeEvent::Delete("b".into()));
        assert_eq!(c.deleted, vec!["b"]);
        assert!(c.targets_changed);
        assert!(!book.contains("b"));
        // Deleting what is not there reports nothing.
        assert_eq!(
            book.apply(NodeEvent::Delete("b".into())),
            Changes::default()
        );
    }

    #[test]
    fn relist_after_a_watch_gap_reports_nodes_deleted_meanwhile() {
        let mut book = NodeBook::new("a", 6783);
        listed(
            &mut book,
            &[
                facts("a", "10.0.0.1"),
                facts("b", "10.0.0.2"),
                facts("c", "10.0.0.3"),
            ],
        );
        // The watch broke; b was deleted and d created while we were not looking.
        let c = listed(
            &mut book,
            &[
                facts("a", "10.0.0.1"),
                facts("c", "10.0.0.3"),
                facts("d", "10.0.0.4"),
            ],
        );
        assert_eq!(c.deleted, vec!["b"]);
        assert_eq!(c.added, vec!["d"]);
        assert!(c.targets_changed);
        // Until InitDone, the old view stays in force.
        book.apply(NodeEvent::Init);
        book.apply(NodeEvent::InitApply(facts("a", "10.0.0.1")));
        assert!(book.contains("c"));
    }

    #[test]
    fn annotation_wins_over_internal_ip_and_bad_addresses_are_ignored() {
        let mut book = NodeBook::new("a", 6783);
        let mut b = facts("b", "10.0.0.2");
        b.mesh_address = Some("192.168.9.2:7000".parse().unwrap());
        let no_address = facts("c", "not-an-ip");
        listed(&mut book, &[facts("a", "10.0.0.1"), b, no_address]);
        let t: Vec<_> = book.targets().into_iter().collect();
        assert_eq!(t, vec!["192.168.9.2:7000"]);
        assert!(
            book.contains("c"),
            "a node without an address is still a node"
        );
    }

    #[test]
    fn facts_read_from_a_node_object() {
        let mut annotations = std::collections::BTreeMap::new();
        annotations.insert(ADDRESS_ANNOTATION.to_string(), "garbage".to_string());
        let node = Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                annotations: Some(annotations),
                ..Default::default()
            },
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: "n1".into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "192.168.77.1".into(),
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let f = NodeFacts::of(&node).unwrap();
        assert_eq!(f.name, "n1");
        assert_eq!(f.internal_ip, Some("192.168.77.1".parse().unwrap()));
        assert_eq!(f.mesh_address, None, "a malformed annotation is ignored");
        assert_eq!(f.target(6783).as_deref(), Some("192.168.77.1:6783"));
        assert_eq!(NodeFacts::of(&Node::default()), None, "no name, no node");
    }
}

//! Who may put packets into the overlay. The kernel decapsulates any VXLAN datagram that
//! reaches the port — from a pod on this node (to its gateway), or from any host on the
//! underlay — and routes the inner packet, whatever its source, to local pods, across the
//! mesh or through kube-proxy. So every node keeps a table of its own, `ip mesh_guard`,
//! with two sets the agent rewrites as members come and go (never one rule per node):
//!
//! - `members`: the underlay addresses of current mesh members (and of block owners the
//!   data plane still remembers). A datagram to the VXLAN port from anywhere else is
//!   dropped before the kernel's VXLAN socket (or the userspace backend) sees it.
//! - `sources` (kernel backend): (inner source, inner source MAC) pairs — each remote
//!   node's blocks and its own underlay address, with its VTEP MAC. After decapsulation
//!   the inner frame's source MAC is the sending node's VTEP MAC, so a packet from node A
//!   claiming an address of node B's blocks (or of no block at all) is dropped at
//!   prerouting, before conntrack and kube-proxy's DNAT. The userspace backend makes the
//!   same check per packet against the datagram's outer source (`udp::table`).
//!
//! The table is replaced as a whole in one `nft` transaction (JSON through the
//! `nftables` crate), when the sets change and every 10 s to repair edits made behind our
//! back; `--uninstall` deletes it.
//!
//! What it cannot stop: a host that spoofs a member's underlay address *and* that
//! member's VTEP MAC (UDP has no handshake; the underlay must not let hosts forge
//! addresses — or use the encrypted data plane), and a member node that is itself
//! compromised forging its own VTEP's traffic for addresses it owns.

use std::borrow::Cow;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, Element, NfListObject, Nftables, Rule, Set, SetTypeValue, Table};
use nftables::stmt::{Counter, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::Desired;
use crate::netlink::format_mac;

pub const TABLE: &str = "mesh_guard";
const MEMBERS: &str = "members";
const SOURCES: &str = "sources";
/// Before conntrack (-200) and kube-proxy's DNAT (-100): a forged packet leaves no trace.
const PRIORITY_RAW: i32 = -300;
const REPAIR_EVERY: Duration = Duration::from_secs(10);

/// Everything the table is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardSpec {
    /// The VXLAN port we listen on.
    pub port: u16,
    /// Our underlay address: VXLAN to any other local address is dropped (a pod's datagram
    /// to another address of this node, masqueraded by its own node to a member's source,
    /// must not get in).
    pub local: Ipv4Addr,
    /// The kernel VXLAN device whose decapsulated packets are checked (`None` for the
    /// userspace backend, which checks in its forwarder).
    pub decap_device: Option<&'static str>,
    /// Underlay addresses allowed to send to `port`, sorted, unique.
    pub members: Vec<Ipv4Addr>,
    /// (address, prefix length, VTEP MAC) allowed as inner sources, sorted.
    pub sources: Vec<(Ipv4Addr, u8, [u8; 6])>,
    /// Whether entries may be removed: not before this run's first full sync with the
    /// mesh (`Desired::prune`) — a restarted agent adds to the table the previous run
    /// left, and refuses no member it merely has not heard of yet.
    pub prune: bool,
}

impl GuardSpec {
    pub fn new(
        port: u16,
        local: Ipv4Addr,
        decap_device: Option<&'static str>,
        want: &Desired,
    ) -> GuardSpec {
        let mut members: Vec<Ipv4Addr> = want
            .nodes
            .iter()
            .copied()
            .chain(want.remotes.iter().map(|r| r.underlay))
            .collect();
        members.sort_unstable();
        members.dedup();
        let mut sources: Vec<(Ipv4Addr, u8, [u8; 6])> = want
            .remotes
            .iter()
            .flat_map(|r| {
                r.blocks
                    .iter()
                    .map(|b| (Ipv4Addr::from(b.start), b.prefix, r.mac))
                    .chain(std::iter::once((r.underlay, 32, r.mac)))
            })
            .collect();
        sources.sort_unstable();
        sources.dedup();
        GuardSpec {
            port,
            local,
            decap_device,
            members,
            sources,
            prune: want.prune,
        }
    }
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, op, right })
}

fn base_chain(name: &'static str, hook: NfHook) -> Chain<'static> {
    Chain {
        family: NfFamily::IP,
        table: Cow::Borrowed(TABLE),
        name: Cow::Borrowed(name),
        _type: Some(NfChainType::Filter),
        hook: Some(hook),
        prio: Some(PRIORITY_RAW),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }
}

fn rule(
    chain: &'static str,
    expr: Vec<Statement<'static>>,
    comment: &'static str,
) -> Rule<'static> {
    Rule {
        family: NfFamily::IP,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Borrowed(chain),
        expr: Cow::Owned(expr),
        comment: Some(Cow::Borrowed(comment)),
        ..Rule::default()
    }
}

fn member_elements(spec: &GuardSpec) -> Vec<Expression<'static>> {
    spec.members
        .iter()
        .map(|a| Expression::String(Cow::Owned(a.to_string())))
        .collect()
}

fn source_elements(spec: &GuardSpec) -> Vec<Expression<'static>> {
    spec.sources
        .iter()
        .map(|(addr, len, mac)| {
            Expression::Named(NamedExpression::Concat(vec![
                Expression::Named(NamedExpression::Prefix(Prefix {
                    addr: Box::new(Expression::String(Cow::Owned(addr.to_string()))),
                    len: u32::from(*len),
                })),
                Expression::String(Cow::Owned(format_mac(mac))),
            ]))
        })
        .collect()
}

/// Only additions to the sets of a table that exists (before the first sync): what the
/// previous run allowed stays allowed. Pure.
pub fn additions(spec: &GuardSpec) -> Nftables<'static> {
    let mut batch = Batch::new();
    let mut add = |name: &'static str, elem: Vec<Expression<'static>>| {
        if !elem.is_empty() {
            batch.add(NfListObject::Element(Element {
                family: NfFamily::IP,
                table: Cow::Borrowed(TABLE),
                name: Cow::Borrowed(name),
                elem: Cow::Owned(elem),
            }));
        }
    };
    add(MEMBERS, member_elements(spec));
    if spec.decap_device.is_some() {
        add(SOURCES, source_elements(spec));
    }
    batch.to_nftables()
}

/// The whole table as one transaction: created if absent, deleted, then built again (so
/// a table edited by hand, or from an older agent, is replaced, never merged). Pure.
pub fn ruleset(spec: &GuardSpec) -> Nftables<'static> {
    let table = Table {
        family: NfFamily::IP,
        name: Cow::Borrowed(TABLE),
        ..Table::default()
    };
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table.clone()));
    batch.delete(NfListObject::Table(table.clone()));
    batch.add(NfListObject::Table(table));

    let members = member_elements(spec);
    batch.add(NfListObject::Set(Box::new(Set {
        family: NfFamily::IP,
        table: Cow::Borrowed(TABLE),
        name: Cow::Borrowed(MEMBERS),
        set_type: SetTypeValue::Single(nftables::schema::SetType::Ipv4Addr),
        elem: (!members.is_empty()).then(|| Cow::Owned(members)),
        ..Set::default()
    })));
    batch.add(NfListObject::Chain(base_chain("vxlan_in", NfHook::Input)));
    // VXLAN to our port is dropped unless it comes from a member and to our own address.
    let vxlan_dropped_if = |condition: Statement<'static>, comment: &'static str| {
        rule(
            "vxlan_in",
            vec![
                matches(
                    payload("udp", "dport"),
                    Operator::EQ,
                    Expression::Number(u32::from(spec.port)),
                ),
                condition,
                Statement::Counter(Counter::Anonymous(None)),
                Statement::Drop(None),
            ],
            comment,
        )
    };
    batch.add(NfListObject::Rule(vxlan_dropped_if(
        matches(
            payload("ip", "saddr"),
            Operator::NEQ,
            Expression::String(Cow::Owned(format!("@{MEMBERS}"))),
        ),
        "mesh: VXLAN only from mesh members",
    )));
    batch.add(NfListObject::Rule(vxlan_dropped_if(
        matches(
            payload("ip", "daddr"),
            Operator::NEQ,
            Expression::String(Cow::Owned(spec.local.to_string())),
        ),
        "mesh: VXLAN only to our underlay address",
    )));

    if let Some(device) = spec.decap_device {
        let sources = source_elements(spec);
        batch.add(NfListObject::Set(Box::new(Set {
            family: NfFamily::IP,
            table: Cow::Borrowed(TABLE),
            name: Cow::Borrowed(SOURCES),
            set_type: SetTypeValue::Concatenated(Cow::Borrowed(&[
                nftables::schema::SetType::Ipv4Addr,
                nftables::schema::SetType::EtherAddr,
            ])),
            flags: Some([nftables::schema::SetFlag::Interval].into_iter().collect()),
            elem: (!sources.is_empty()).then(|| Cow::Owned(sources)),
            ..Set::default()
        })));
        batch.add(NfListObject::Chain(base_chain("decap", NfHook::Prerouting)));
        batch.add(NfListObject::Rule(rule(
            "decap",
            vec![
                matches(
                    Expression::Named(NamedExpression::Meta(Meta {
                        key: MetaKey::Iifname,
                    })),
                    Operator::EQ,
                    Expression::String(Cow::Borrowed(device)),
                ),
                matches(
                    Expression::Named(NamedExpression::Concat(vec![
                        payload("ip", "saddr"),
                        payload("ether", "saddr"),
                    ])),
                    Operator::NEQ,
                    Expression::String(Cow::Owned(format!("@{SOURCES}"))),
                ),
                Statement::Counter(Counter::Anonymous(None)),
                Statement::Drop(None),
            ],
            "mesh: inner source must be the sending node's",
        )));
    }
    batch.to_nftables()
}

/// Brings the table to `spec` (blocking: runs `nft`; call it off the async workers):
/// replaced whole, or — before the first sync, when a previous run's table exists — only
/// added to (falling back to a replacement if that table lacks a set this run needs).
pub fn apply(spec: &GuardSpec) -> Result<(), String> {
    if !spec.prune && table_exists() {
        let added = additions(spec);
        if added.objects.is_empty() || nftables::helper::apply_ruleset(&added).is_ok() {
            return Ok(());
        }
    }
    nftables::helper::apply_ruleset(&ruleset(spec)).map_err(|e| {
        format!("cannot install the overlay guard (nftables table {TABLE}; is nftables installed?): {e}")
    })
}

fn table_exists() -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "ip", TABLE])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Deletes the table (uninstall); absent is fine.
pub fn remove() {
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "ip", TABLE])
        .stderr(std::process::Stdio::null())
        .status();
}

/// Keeps the table in place from a backend's reconcile loop.
#[derive(Debug, Default)]
pub struct Keeper {
    applied: Option<(GuardSpec, Instant)>,
}

impl Keeper {
    pub fn tick(&mut self, spec: &GuardSpec) -> Result<(), String> {
        let due = self
            .applied
            .as_ref()
            .is_none_or(|(s, at)| s != spec || at.elapsed() >= REPAIR_EVERY);
        if due {
            apply(spec)?;
            self.applied = Some((spec.clone(), Instant::now()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::test_remote;

    fn spec() -> GuardSpec {
        let want = Desired {
            remotes: vec![
                test_remote(2, &["10.32.0.0/26", "10.32.1.0/24"]),
                test_remote(3, &["10.32.2.0/24"]),
            ],
            nodes: vec![Ipv4Addr::new(192, 168, 1, 1), Ipv4Addr::new(192, 168, 1, 9)],
            ..Desired::default()
        };
        GuardSpec::new(
            8472,
            Ipv4Addr::new(192, 168, 1, 1),
            Some("mesh-vxlan"),
            &want,
        )
    }

    #[test]
    fn members_are_every_node_and_every_remembered_owner_once() {
        let s = spec();
        let shown: Vec<String> = s.members.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            shown,
            ["192.168.1.1", "192.168.1.2", "192.168.1.3", "192.168.1.9"]
        );
    }

    #[test]
    fn sources_bind_each_block_and_underlay_to_its_owners_mac() {
        let s = spec();
        assert_eq!(s.sources.len(), 5);
        assert!(s
            .sources
            .contains(&(Ipv4Addr::new(10, 32, 1, 0), 24, [0x0a, 0x76, 0, 0, 0, 2])));
        assert!(s
            .sources
            .contains(&(Ipv4Addr::new(192, 168, 1, 3), 32, [0x0a, 0x76, 0, 0, 0, 3])));
        assert!(!s
            .sources
            .contains(&(Ipv4Addr::new(10, 32, 2, 0), 24, [0x0a, 0x76, 0, 0, 0, 2])));
    }

    #[test]
    fn the_ruleset_replaces_the_table_and_drops_strangers_and_forged_sources() {
        let json = serde_json::to_value(ruleset(&spec())).unwrap();
        let cmds = json["nftables"].as_array().unwrap();
        // add, delete, add: one transaction that replaces whatever was there.
        assert!(cmds[0]["add"]["table"].is_object());
        assert!(cmds[1]["delete"]["table"].is_object());
        let text = json.to_string();
        assert!(text.contains(r#""right":"@members""#), "{text}");
        assert!(text.contains(r#""op":"!=""#), "{text}");
        assert!(
            text.contains(r#""dport""#) && text.contains("8472"),
            "{text}"
        );
        assert!(text.contains(r#""right":"@sources""#), "{text}");
        assert!(text.contains(r#""mesh-vxlan""#), "{text}");
        assert!(text.contains(r#""prio":-300"#), "{text}");
        assert!(
            text.contains(r#""daddr""#) && text.contains("192.168.1.1"),
            "{text}"
        );
        // The userspace backend checks inner sources itself: no decap chain.
        let userspace = GuardSpec {
            decap_device: None,
            ..spec()
        };
        let text = serde_json::to_string(&ruleset(&userspace)).unwrap();
        assert!(!text.contains("@sources") && text.contains("@members"));
    }

    #[test]
    fn before_the_first_sync_elements_are_only_added() {
        let json = serde_json::to_value(additions(&spec())).unwrap();
        let cmds = json["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 2, "{json}");
        assert!(
            cmds.iter().all(|c| c["add"]["element"].is_object()),
            "{json}"
        );
        assert!(!json.to_string().contains("delete"));
    }
}

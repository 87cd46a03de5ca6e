//! What the simulator checks: per-step invariants of one node's view, and the cluster-wide
//! predicates the campaigns wait for (converged, crash detected, restart accepted).

use std::collections::BTreeSet;

use mesh_proto::gossip::Liveness;
use mesh_proto::PeerId;

use super::Sim;

impl Sim {
    /// Per-step invariants for the members a step could have changed.
    pub(super) fn check_node(&mut self, node: usize, touched: &[PeerId]) {
        let Some(core) = self.nodes[node].core.as_ref() else {
            return;
        };
        let me = self.ids[node];
        let own = core.member(&me).expect("own entry");
        if own.liveness.state != Liveness::Alive {
            self.fail(format!(
                "node {node} believes itself {:?}",
                own.liveness.state
            ));
        }
        if own.record.incarnation > self.nodes[node].stored_incarnation {
            self.fail(format!(
                "node {node} uses incarnation {} but stored only {}",
                own.record.incarnation, self.nodes[node].stored_incarnation
            ));
        }
        let mut errors = Vec::new();
        let mut seen_updates = Vec::new();
        for id in touched.iter().chain(std::iter::once(&me)) {
            let Some(m) = core.member(id) else { continue };
            let key = (m.record.content_key(), m.liveness.key());
            if let Some(prev) = self.nodes[node].seen.get(id) {
                if key.0 < prev.0 || key.1 < prev.1 {
                    errors.push(format!(
                        "node {node}'s view of {id} went back from {prev:?} to {key:?}"
                    ));
                }
            }
            // Durability: nobody can know an incarnation its owner has not stored.
            let owner = self.index[id];
            if m.record.incarnation > self.nodes[owner].stored_incarnation {
                errors.push(format!(
                    "node {node} holds incarnation {} of node {owner}, which stored only {}",
                    m.record.incarnation, self.nodes[owner].stored_incarnation
                ));
            }
            seen_updates.push((*id, key));
        }
        if let Some(e) = errors.into_iter().next() {
            self.fail(e);
        }
        let seen = &mut self.nodes[node].seen;
        for (id, key) in seen_updates {
            seen.insert(id, key);
        }
    }

    /// Every running node sees the same up members with the same keys, and the up members
    /// are exactly the running nodes.
    pub fn converged(&self) -> bool {
        let running: BTreeSet<PeerId> = (0..self.len())
            .filter(|i| self.is_up(*i))
            .map(|i| self.ids[i])
            .collect();
        let mut reference = None;
        for i in 0..self.len() {
            let Some(core) = self.core(i) else { continue };
            let up: Vec<_> = core
                .members()
                .filter(|m| m.is_up())
                .map(|m| (m.record.id, m.record.content_key(), m.liveness))
                .collect();
            if up.len() != running.len()
                || up
                    .iter()
                    .any(|(id, _, l)| !running.contains(id) || l.state != Liveness::Alive)
            {
                return false;
            }
            match &reference {
                None => reference = Some(up),
                Some(r) if *r != up => return false,
                Some(_) => {}
            }
        }
        true
    }

    /// Every running node knows every running node as up (alive or suspect). Weaker than
    /// `converged`: under loss, false suspicions and their refutations keep big clusters
    /// from ever being perfectly quiet.
    pub fn all_know_all(&self) -> bool {
        let running = (0..self.len()).filter(|i| self.is_up(*i)).count();
        (0..self.len())
            .filter_map(|i| self.core(i))
            .all(|c| c.members().filter(|m| m.is_up()).count() == running)
    }

    /// True when every running node other than `node` holds it as dead (or never knew it).
    pub fn all_see_down(&self, node: usize) -> bool {
        let id = self.ids[node];
        (0..self.len())
            .filter(|i| *i != node)
            .filter_map(|i| self.core(i))
            .all(|c| c.member(&id).is_none_or(|m| m.liveness.state.is_down()))
    }

    /// True when every running node holds `node` as alive at its current incarnation.
    pub fn all_see_alive(&self, node: usize) -> bool {
        let id = self.ids[node];
        let Some(inc) = self.core(node).map(|c| c.own_record().incarnation) else {
            return false;
        };
        (0..self.len()).filter_map(|i| self.core(i)).all(|c| {
            c.member(&id)
                .is_some_and(|m| m.liveness.state == Liveness::Alive && m.record.incarnation == inc)
        })
    }

    /// Largest control-connection degree of any running node.
    pub fn max_degree(&self) -> usize {
        (0..self.len())
            .filter_map(|i| self.core(i))
            .map(|c| c.connected().len())
            .max()
            .unwrap_or(0)
    }
}

//! Timing and sizing knobs of the mesh core. Defaults follow memberlist's LAN profile.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// One SWIM protocol period: one direct probe per period.
    pub probe_interval: Duration,
    /// How long to wait for a direct ack before asking relays (indirect probes).
    pub probe_timeout: Duration,
    /// Relays asked per indirect probe (SWIM's k). 5 rather than memberlist's 3: under 10%
    /// message loss it cuts false suspicions (and the refutation churn they cause) about 8x.
    pub indirect_probes: usize,
    /// Suspicion lasts `suspicion_mult * max(1, log10 n) * probe_interval` before dead.
    pub suspicion_mult: u32,
    /// How often pending deltas are pushed to `fanout(n)` neighbours.
    pub gossip_interval: Duration,
    /// Each delta is sent `retransmit_mult * ceil(log10(n + 1))` times.
    pub retransmit_mult: u32,
    /// How often a digest summary is exchanged with one peer.
    pub anti_entropy_interval: Duration,
    /// How long a dead or departed peer is remembered, so late gossip cannot resurrect it.
    pub dead_retention: Duration,
    /// Ring successors kept as neighbours.
    pub ring_neighbours: usize,
    /// Additional rendezvous-hashed neighbours.
    pub random_neighbours: usize,
    /// Most member updates in one message.
    pub max_updates_per_message: usize,
    /// Updates piggybacked on a probe or ack.
    pub piggyback_updates: usize,
    /// Seed of the core's random choices (the simulator sets it; the agent uses the peer id).
    pub seed: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(500),
            indirect_probes: 5,
            suspicion_mult: 4,
            gossip_interval: Duration::from_millis(200),
            retransmit_mult: 4,
            anti_entropy_interval: Duration::from_secs(5),
            dead_retention: Duration::from_secs(3600),
            ring_neighbours: 2,
            random_neighbours: 3,
            max_updates_per_message: 32,
            piggyback_updates: 4,
            seed: 0,
        }
    }
}

impl CoreConfig {
    /// Delta fan-out: about `ln n`, at least 2.
    pub fn fanout(&self, members: usize) -> usize {
        ((members.max(2) as f64).ln().ceil() as usize).max(2)
    }

    pub fn suspicion_timeout(&self, members: usize) -> Duration {
        let scale = (members.max(1) as f64).log10().max(1.0);
        self.probe_interval
            .mul_f64(f64::from(self.suspicion_mult) * scale)
    }
}

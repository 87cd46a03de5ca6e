//! `mesh-agent` configuration: flags with `MESH_*` environment fallbacks, validated once at
//! start. Names follow ARCHITECTURE.md (Interfaces).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

pub const DEFAULT_PORT: u16 = 6783;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dataplane {
    /// The kernel's VXLAN device (traffic keeps flowing while the agent restarts).
    Vxlan,
    /// Userspace: a TUN device and the agent's own forwarder, on the same VXLAN wire.
    Udp,
    /// `vxlan` when the kernel can make a VXLAN device, `udp` otherwise.
    Auto,
    /// Control plane only: needs no root.
    None,
}

impl Dataplane {
    pub fn as_str(self) -> &'static str {
        match self {
            Dataplane::Vxlan => "vxlan",
            Dataplane::Udp => "udp",
            Dataplane::Auto => "auto",
            Dataplane::None => "none",
        }
    }
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum AgentCommand {
    /// The state database under --state-dir.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum StoreCommand {
    /// Read the database without changing it: schema, identity, counts, every problem
    /// and its way out. Exits 1 when it finds a problem.
    Inspect,
    /// Keep a copy, let redb repair its structure, drop the data-plane cache if damaged,
    /// and remove what --discard names (nothing else). Exits 1 if problems remain.
    Repair {
        /// What to give up (repeatable); each says its cost in `--help`.
        #[arg(long, value_enum)]
        discard: Vec<crate::store::Discard>,
    },
}

#[derive(Clone, Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "mesh node agent: gossip, IPAM and data plane for one node"
)]
pub struct AgentConfig {
    /// This node's name (the Kubernetes Node name in a cluster). Default: the hostname.
    #[arg(long, env = "MESH_NODE_NAME")]
    pub node_name: Option<String>,

    /// QUIC control-plane listener.
    #[arg(long, env = "MESH_LISTEN", default_value = "0.0.0.0:6783")]
    pub listen: SocketAddr,

    /// Underlay address peers use to reach us. Default: the listen address if it is
    /// specific, else the address of the default-route interface.
    #[arg(long, env = "MESH_ADVERTISE_ADDR")]
    pub advertise_addr: Option<IpAddr>,

    /// Initial peers: HOST[:PORT],... (port defaults to 6783).
    #[arg(long, env = "MESH_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// File holding the cluster secret (at least 16 bytes). Required unless --insecure-no-auth.
    #[arg(long, env = "MESH_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,

    /// How the CA is derived from the secret; the same on every node. `argon2id` makes
    /// offline guessing of the secret memory-hard; `hkdf` is what earlier versions use.
    #[arg(long, env = "MESH_SECRET_KDF", value_enum, default_value = "hkdf")]
    pub secret_kdf: crate::transport::tls::SecretKdf,

    /// Run without authentication: anyone who can reach the port can join. Shown in `meshctl status`.
    #[arg(long, env = "MESH_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// Durable state (identity, ring, allocations).
    #[arg(
        long,
        env = "MESH_STATE_DIR",
        default_value = "/var/lib/mesh",
        global = true
    )]
    pub state_dir: PathBuf,

    /// Local API unix socket (mode 0600).
    #[arg(long, env = "MESH_SOCKET", default_value = "/run/mesh/mesh.sock")]
    pub socket: PathBuf,

    /// Prometheus metrics listener (loopback unless you ask otherwise).
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = "127.0.0.1:6782")]
    pub metrics_addr: SocketAddr,

    /// Cluster pod range.
    #[arg(long, env = "MESH_IPALLOC_RANGE", default_value = "10.32.0.0/12")]
    pub ipalloc_range: String,

    /// First IPAM split: consensus=N or seed=NAME,NAME (used once IPAM lands).
    #[arg(long, env = "MESH_IPALLOC_INIT")]
    pub ipalloc_init: Option<String>,

    /// Data plane backend.
    #[arg(long, env = "MESH_DATAPLANE", value_enum, default_value = "auto")]
    pub dataplane: Dataplane,

    /// The node bridge pods attach to (mesh-cni's `bridge` key must name the same).
    #[arg(long, env = "MESH_BRIDGE", default_value = "mesh0")]
    pub bridge: String,

    /// VXLAN UDP port.
    #[arg(long, env = "MESH_VXLAN_PORT", default_value_t = 8472)]
    pub vxlan_port: u16,

    /// TUN queues for the udp backend, each with two forwarder threads (default: one per
    /// core, at most 4).
    #[arg(long, env = "MESH_UDP_QUEUES")]
    pub udp_queues: Option<usize>,

    /// Pod MTU (default: underlay MTU minus 50).
    #[arg(long, env = "MESH_MTU")]
    pub mtu: Option<u32>,

    /// Kubernetes integration: Node objects are the peer list, a Lease elects the writer of
    /// the first IPAM split and of reclaims for deleted Nodes, NetworkUnavailable is set.
    #[arg(long, env = "MESH_KUBE")]
    pub kube: bool,

    /// Kubeconfig for --kube (default: the in-cluster service account, else $KUBECONFIG).
    #[arg(long, env = "MESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Namespace of the mesh Lease (the DaemonSet passes its own namespace).
    #[arg(long, env = "MESH_KUBE_NAMESPACE", default_value = "mesh-system")]
    pub kube_namespace: String,

    /// Most control connections this node holds (inbound beyond it are refused).
    #[arg(long, env = "MESH_MAX_CONNECTIONS", default_value_t = 64)]
    pub max_connections: usize,

    /// Masquerade pod traffic leaving the cluster range (like Flannel's --ip-masq). Off
    /// means no NAT rules, and no connection tracking cost, from mesh.
    #[arg(long, env = "MESH_MASQUERADE", default_value_t = true, action = clap::ArgAction::Set)]
    pub masquerade: bool,

    /// Remove the data plane from this node (iptables chains, VXLAN device and routes,
    /// the bridge) and exit, instead of running.
    #[arg(long)]
    pub uninstall: bool,

    /// Instead of running: look after the state database (the agent must be stopped).
    #[command(subcommand)]
    pub command: Option<AgentCommand>,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `mesh_agent=debug`.
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    pub log: String,

    /// Override the protocol versions spoken (testing only), e.g. `2..3`.
    #[arg(long, env = "MESH_PROTOCOL_RANGE", hide = true)]
    pub protocol_range: Option<String>,
}

/// The validated, resolved form.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub node_name: String,
    pub advertise: SocketAddr,
    /// `--peers` as dial targets `host:port`; names are resolved on every dial attempt, so a
    /// peer whose name does not resolve yet does not stop the agent.
    pub peers: Vec<String>,
    /// How many distinct targets `--peers` named, this node included if listed: the
    /// default `consensus=N` is this plus one, the same on every node given the same list.
    pub peers_listed: usize,
    pub secret: Option<Vec<u8>>,
    pub protocol: (u16, u16),
}

impl AgentConfig {
    pub fn resolve(&self) -> Result<Resolved> {
        let node_name = match &self.node_name {
            Some(n) if !n.trim().is_empty() => n.trim().to_string(),
            Some(_) => bail!("--node-name is empty"),
            None => hostname().context("cannot read the hostname; pass --node-name")?,
        };
        let secret = match (&self.secret_file, self.insecure_no_auth) {
            (Some(_), true) => bail!("--secret-file and --insecure-no-auth exclude each other: pick one"),
            (None, false) => bail!(
                "no cluster secret: pass --secret-file FILE (create one with `head -c 32 /dev/urandom | base64 > FILE`), \
                 or --insecure-no-auth to run without authentication"
            ),
            (None, true) => None,
            (Some(path), false) => {
                let raw = std::fs::read(path).with_context(|| format!("cannot read --secret-file {}", path.display()))?;
                let trimmed = raw.trim_ascii().to_vec();
                if trimmed.len() < 16 {
                    bail!(
                        "cluster secret in {} is {} bytes; use at least 16 (e.g. `head -c 32 /dev/urandom | base64`)",
                        path.display(),
                        trimmed.len()
                    );
                }
                if let Err(guesses) = crate::transport::tls::strength(&trimmed) {
                    bail!(
                        "cluster secret in {} is too easy to guess (estimated 10^{guesses:.0} guesses, at least 10^{:.0} needed; \
                         anyone who reaches the mesh port can test guesses offline): use a random one, \
                         e.g. `head -c 32 /dev/urandom | base64 > {}`",
                        path.display(),
                        crate::transport::tls::MIN_GUESSES_LOG10,
                        path.display()
                    );
                }
                Some(trimmed)
            }
        };
        let ip = match self.advertise_addr {
            Some(ip) => ip,
            None if !self.listen.ip().is_unspecified() => self.listen.ip(),
            None => default_route_address().context(
                "cannot find the default-route interface's address; pass --advertise-addr",
            )?,
        };
        let advertise = SocketAddr::new(ip, self.listen.port());
        if self.kube && self.ipalloc_init.is_some() {
            bail!("--ipalloc-init and --kube exclude each other: with --kube the first split is made by the holder of the mesh Lease");
        }
        if !self.kube && self.kubeconfig.is_some() {
            bail!("--kubeconfig is only used with --kube");
        }
        let mut peers = Vec::new();
        for p in &self.peers {
            let p = p.trim();
            if p.is_empty() {
                continue;
            }
            peers.push(parse_peer(p)?);
        }
        peers.sort();
        peers.dedup();
        let peers_listed = peers.len();
        let (me_advertised, me_listen) = (advertise.to_string(), self.listen.to_string());
        peers.retain(|p| *p != me_advertised && *p != me_listen);
        let protocol = match &self.protocol_range {
            None => (
                mesh_proto::wire::PROTOCOL_MIN,
                mesh_proto::wire::PROTOCOL_MAX,
            ),
            Some(r) => {
                let (a, b) = r
                    .split_once("..")
                    .context("--protocol-range must look like 1..2")?;
                (
                    a.parse().context("--protocol-range")?,
                    b.parse().context("--protocol-range")?,
                )
            }
        };
        Ok(Resolved {
            node_name,
            advertise,
            peers,
            peers_listed,
            secret,
            protocol,
        })
    }
}

/// `host`, `host:port`, `ip`, `ip:port`, `[v6]:port` as a dial target `host:port`.
/// Checks the syntax only; names are resolved when dialed.
pub fn parse_peer(s: &str) -> Result<String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a.to_string());
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT).to_string());
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .with_context(|| format!("peer {s:?}: {p:?} is not a port number"))?,
        ),
        None => (s, DEFAULT_PORT),
    };
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !valid {
        bail!("peer {s:?} is neither an IP address nor a host name");
    }
    Ok(format!("{host}:{port}"))
}

fn hostname() -> Result<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    let h = h.trim();
    if h.is_empty() {
        bail!("empty hostname");
    }
    Ok(h.to_string())
}

/// The IPv4 address of the interface that holds the default route (from /proc/net/route),
/// found without sending anything.
fn default_route_address() -> Result<IpAddr> {
    let routes = std::fs::read_to_string("/proc/net/route")?;
    let iface = routes
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[1] == "00000000").then(|| f[0].to_string())
        })
        .next()
        .context("no default route")?;
    interface_ipv4(&iface)?.with_context(|| format!("interface {iface} has no IPv4 address"))
}

fn interface_ipv4(name: &str) -> Result<Option<IpAddr>> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut found = None;
    let mut cur = addrs;
    while !cur.is_null() {
        // SAFETY: cur is a valid node of the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && !ifa.ifa_name.is_null() {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
            // SAFETY: ifa_addr is non-null; sa_family tells which sockaddr it is.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if ifname == name && family == libc::AF_INET {
                // SAFETY: family AF_INET means the address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                found = Some(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ));
                break;
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: addrs came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(addrs) };
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_with_and_without_port() {
        assert_eq!(parse_peer("10.0.0.1").unwrap(), "10.0.0.1:6783");
        assert_eq!(parse_peer("10.0.0.1:7000").unwrap(), "10.0.0.1:7000");
        assert_eq!(parse_peer("node-2:7001").unwrap(), "node-2:7001");
        assert_eq!(parse_peer("node-2.example").unwrap(), "node-2.example:6783");
        assert_eq!(parse_peer("[::1]:7000").unwrap(), "[::1]:7000");
        assert!(parse_peer("no such host").is_err());
        assert!(parse_peer("host:99999").is_err());
    }

    #[test]
    fn refuses_to_start_without_a_secret_or_an_explicit_opt_out() {
        let cfg = AgentConfig::try_parse_from([
            "mesh-agent",
            "--node-name",
            "a",
            "--listen",
            "127.0.0.1:1",
        ])
        .unwrap();
        let err = cfg.resolve().unwrap_err().to_string();
        assert!(err.contains("--insecure-no-auth"), "{err}");
    }

    #[test]
    fn short_secrets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "short\n").unwrap();
        let cfg = AgentConfig::try_parse_from([
            "mesh-agent",
            "--node-name",
            "a",
            "--listen",
            "127.0.0.1:1",
            "--secret-file",
            f.to_str().unwrap(),
        ])
        .unwrap();
        assert!(cfg
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("at least 16"));
    }
}

//! The data-plane suite (`overlay`) with every node on the userspace (TUN) backend.

mod overlay;

fn main() {
    overlay::run(
        "udp multi node data plane, 3 nodes",
        "ud",
        ["udp", "udp", "udp"],
    );
}

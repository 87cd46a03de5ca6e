//! The data-plane suite (`overlay`) with node 1 userspace, nodes 2 and 3 kernel VXLAN: both directions between the backends.

mod overlay;

fn main() {
    overlay::run(
        "mixed multi node data plane, 3 nodes",
        "mx",
        ["udp", "vxlan", "vxlan"],
    );
}

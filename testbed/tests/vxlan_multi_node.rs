//! The data-plane suite (`overlay`) with every node on the kernel VXLAN backend.

mod overlay;

fn main() {
    overlay::run(
        "vxlan multi node data plane, 3 nodes",
        "vx",
        ["vxlan", "vxlan", "vxlan"],
    );
}

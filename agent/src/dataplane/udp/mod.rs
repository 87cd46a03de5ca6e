//! The `udp` backend: a userspace data plane on the same VXLAN wire as the kernel's, so
//! nodes on either backend talk to each other. Only the framing exists so far (`frame`);
//! the TUN device, batched UDP I/O and offloads are still to come, and until then
//! `--dataplane udp` attaches pods on the node but carries nothing between nodes.

pub mod frame;

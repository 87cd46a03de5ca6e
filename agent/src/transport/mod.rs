//! The QUIC control-plane transport: mutual TLS from the cluster secret (`tls`), framing
//! (`framing`) and one task pair per connection (`connection`). Policy lives in the driver.

pub mod admission;
pub mod connection;
pub mod framing;
pub mod tls;

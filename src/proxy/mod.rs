//! The data path: listeners' accept loops (TCP) and flow tables (UDP), and
//! the byte forwarding between a client and its backend.

pub mod forward;
pub mod tcp;
pub mod udp;

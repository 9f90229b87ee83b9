//! The stable hash behind `ip_hash` and the session table: FNV-1a (64-bit)
//! over the address bytes, then the MurmurHash3 64-bit finaliser.
//!
//! Explicitly specified (see `docs/scheduling.md`) so that every slb
//! instance, on any platform and Rust version, maps a client the same way;
//! `std`'s `DefaultHasher` promises none of that.

use std::net::{IpAddr, SocketAddr};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Seeds that make independent hash functions out of one.
pub const SEED_CLIENT: u64 = 0;
pub const SEED_OFFSET: u64 = 0x9e37_79b9_7f4a_7c15;
pub const SEED_SKIP: u64 = 0xc2b2_ae3d_27d4_eb4f;

/// The address a client is known by: an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`) is the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// `fmix64(fnv1a64(bytes) with the offset basis xor seed)`.
pub fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    fmix64(fnv1a64(bytes, FNV_OFFSET ^ seed))
}

fn fnv1a64(bytes: &[u8], basis: u64) -> u64 {
    bytes
        .iter()
        .fold(basis, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// Hash of a client IP: its canonical octets (4 for IPv4, 16 for IPv6).
pub fn hash_ip(ip: IpAddr, seed: u64) -> u64 {
    match canonical(ip) {
        IpAddr::V4(v4) => hash_bytes(&v4.octets(), seed),
        IpAddr::V6(v6) => hash_bytes(&v6.octets(), seed),
    }
}

/// Hash of a backend address: canonical IP octets, then the port big-endian.
pub fn hash_addr(addr: SocketAddr, seed: u64) -> u64 {
    let mut buf = [0u8; 18];
    let n = match canonical(addr.ip()) {
        IpAddr::V4(v4) => {
            buf[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            buf[..16].copy_from_slice(&v6.octets());
            16
        }
    };
    buf[n..n + 2].copy_from_slice(&addr.port().to_be_bytes());
    hash_bytes(&buf[..n + 2], seed)
}

/// MurmurHash3's 64-bit finaliser: every input bit flips each output bit
/// with probability about 1/2, which FNV alone does not give in the low bits.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_pinned_so_instances_agree() {
        // The published FNV-1a 64 test vector.
        assert_eq!(fnv1a64(b"a", FNV_OFFSET), 0xaf63_dc4c_8601_ec8c);
        // Golden value: changing it remaps every ip_hash client.
        let a = hash_ip("10.1.2.3".parse().unwrap(), SEED_CLIENT);
        assert_eq!(a, hash_bytes(&[10, 1, 2, 3], 0));
        assert_eq!(a, 0xb8b3_87fa_0a1c_d4e9_u64, "{a:#x}");
    }

    #[test]
    fn mapped_ipv6_hashes_as_ipv4() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(hash_ip(v4, 1), hash_ip(mapped, 1));
        assert_eq!(canonical(mapped), v4);
    }
}

//! Loopback ports for a test to hand to a server it starts.
//!
//! A port the kernel picked for `bind(":0")` and that was then released comes from the ephemeral
//! range, and the kernel hands it out again to the next `bind(":0")` or outgoing connection: a
//! server started with it can find it taken by a broker or client of the very process it was
//! meant for (CI saw `sedge up`'s MQTT broker get the port a test had picked for the
//! local-controller endpoint). [`free`] picks at random below the ephemeral range instead, where
//! the kernel never allocates on its own, and checks that TCP and UDP are free there.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};

use rand::Rng;

/// The lowest port this module picks.
const LOW: u16 = 10_000;

/// The start of the kernel's ephemeral range (Linux's default when it cannot be read).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A loopback port that was free for TCP and UDP a moment ago and that the kernel does not hand
/// out to `bind(":0")` or to outgoing connections.
pub fn free() -> u16 {
    let high = ephemeral_start();
    if high <= LOW + 1_000 {
        // An ephemeral range that starts this low leaves no room: fall back to the kernel's pick.
        return TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("cannot bind a loopback port");
    }
    let mut rng = rand::rng();
    for _ in 0..1_000 {
        let port = rng.random_range(LOW..high);
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, port));
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{high} after 1,000 tries")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picked_port_is_below_the_ephemeral_range_and_can_be_bound() {
        let port = free();
        if ephemeral_start() > LOW + 1_000 {
            assert!((LOW..ephemeral_start()).contains(&port), "{port}");
        }
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("the picked port binds");
    }
}

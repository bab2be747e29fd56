//! `broker`: accepts agents, authenticates them, relays their traffic.
//!
//! The network service arrives with the end-to-end issue; until then this binary
//! only explains itself.

fn main() {
    println!(
        "broker [--listen ADDR] [--data-dir DIR]\n\nThe keyferry broker (not yet runnable: see README.md)."
    );
}

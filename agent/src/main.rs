//! `agent`: the sender and receiver roles of keyferry.
//!
//! The command line arrives with the end-to-end issue; until then this binary
//! only explains itself.

fn main() {
    println!(
        "agent --role receiver|sender ...\n\nThe keyferry agent (not yet runnable: see README.md)."
    );
}

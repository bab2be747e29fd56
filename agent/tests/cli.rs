//! Snapshots of what a user sees from `agent` without a broker: `--help`, a
//! usage error, an unreachable broker, an unreadable file, an unusable key
//! (trycmd, as rage does; the cases are `tests/cmd/*.toml`, regenerate with
//! `TRYCMD=overwrite`). The error lines that need a broker are pinned in
//! `exit_codes.rs`.

#[test]
fn cli() {
    trycmd::TestCases::new().case("tests/cmd/*.toml");
}

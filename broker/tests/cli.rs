//! Snapshots of what a user sees from `broker`: `--help` and its start-up
//! refusals (trycmd; the cases are `tests/cmd/*.toml`, regenerate with
//! `TRYCMD=overwrite`).

#[test]
fn cli() {
    trycmd::TestCases::new().case("tests/cmd/*.toml");
}

//! Zoned's system tests live in `tests/`, one file a subject: real
//! processes on loopback (`cluster`, `membership`, `agent`, `sync`,
//! `config_files`, `cpu`: tier 3) and in network namespaces (`netns`: tier
//! 4). The harness they share is the `testbed` crate. They start the
//! workspace's binaries, which must be built first
//! (`cargo build --workspace --bins`; `cargo xtask test` does it).
